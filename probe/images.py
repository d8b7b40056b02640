"""Images as the library keeps them: H×W×3 uint8, converted from the pipelines' floats in 0–1 as diffusers'
``numpy_to_pil`` does (round(x·255)), so a stored image is the one the pipeline would have saved."""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """Floats in 0–1 (any leading dims) as uint8 (round(x·255), clipped); integer arrays and PIL images pass
    through as uint8."""
    array = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.uint8)
    return (array * 255).round().clip(0, 255).astype(np.uint8)
