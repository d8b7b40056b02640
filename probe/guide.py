"""Moved to :mod:`probe.steer.guide`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.steer.guide")

warnings.warn("probe.guide moved to probe.steer.guide", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
