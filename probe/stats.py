"""Moved to :mod:`probe.analysis.stats`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.analysis.stats")

warnings.warn("probe.stats moved to probe.analysis.stats", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
