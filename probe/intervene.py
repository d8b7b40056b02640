"""Moved to :mod:`probe.steer.intervene`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.steer.intervene")

warnings.warn("probe.intervene moved to probe.steer.intervene", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
