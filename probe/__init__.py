"""probe: see, measure and steer the attention of text-to-image diffusion models."""

__version__ = "0.1.0"

import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402


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


class _MovedExplore(types.ModuleType):
    """The old module path ``probe.explore`` (now :mod:`probe.ui.explore`). ``probe.explore`` on the package is the
    function, so the old path is registered here rather than as a file: importing it cannot put a module in the
    function's place. Each name read through it warns."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("probe.explore moved to probe.ui.explore", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("probe.ui.explore"), name)


sys.modules.setdefault("probe.explore", _MovedExplore("probe.explore"))
