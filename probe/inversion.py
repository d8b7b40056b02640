"""Moved to :mod:`probe.steer.inversion`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.steer.inversion")

warnings.warn("probe.inversion moved to probe.steer.inversion", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
