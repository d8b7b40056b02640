"""Moved to :mod:`probe.analysis.overlap`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.analysis.overlap")

warnings.warn("probe.overlap moved to probe.analysis.overlap", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
