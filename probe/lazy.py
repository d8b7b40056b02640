"""Moved to :mod:`probe.analysis.lazy`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.analysis.lazy")

warnings.warn("probe.lazy moved to probe.analysis.lazy", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
