"""Moved to :mod:`probe.analysis.maps`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.analysis.maps")

warnings.warn("probe.maps moved to probe.analysis.maps", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
