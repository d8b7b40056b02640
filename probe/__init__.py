"""probe: see, measure and steer the attention of text-to-image diffusion models."""

__version__ = "0.1.0"

from probe.models import load  # noqa: E402
from probe.record import estimate, open_recording, record, save  # noqa: E402
from probe.tap import Consumer, Tap  # noqa: E402

__all__ = ["Consumer", "Tap", "estimate", "load", "open_recording", "record", "save", "__version__"]
