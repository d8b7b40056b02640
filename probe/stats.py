"""Statistics the studies share: intervals that respect how the data were drawn.

Images of one prompt are not independent (a prompt fixes much of what fails), so intervals resample prompts, not
images: the cluster bootstrap draws prompts with replacement and keeps all of each drawn prompt's images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clustered_bootstrap(values: Sequence[float], clusters: Sequence, n_resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile interval with whole clusters (prompts) resampled.

    For paired designs pass the per-pair differences: the mean is then the paired effect.
    """
    values = np.asarray(values, dtype=float)
    labels, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    if len(values) == 0:
        raise ValueError("no values to summarise")
    sums = np.bincount(index, weights=values, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(n_resamples, len(labels)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)
