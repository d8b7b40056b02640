"""probe: see, measure and steer the attention of text-to-image diffusion models."""

__version__ = "0.1.0"

import logging  # noqa: E402


class _NoImageProcessorFallbackNote(logging.Filter):
    """Drop transformers' note that it uses PIL image processors without torchvision.

    The pipelines here carry no image processor in use (no safety checker), so the note, printed
    on every import, says nothing to a user of this library.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNote())

from probe.models import load  # noqa: E402
from probe.record import estimate, open_recording, record, save  # noqa: E402
from probe.record.sweep import sweep as sweep  # noqa: E402
from probe.tap import Consumer, Tap  # noqa: E402
from probe.ui.explore import explore  # noqa: E402

__all__ = ["Consumer", "Tap", "estimate", "explore", "load", "open_recording", "record", "save", "__version__"]
