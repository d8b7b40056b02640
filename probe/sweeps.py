"""Moved to :mod:`probe.record.sweep`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.record.sweep")

warnings.warn("probe.sweeps moved to probe.record.sweep", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
