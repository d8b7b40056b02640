"""Moved to :mod:`probe.analysis.probes`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.analysis.probes")

warnings.warn("probe.probes moved to probe.analysis.probes", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
