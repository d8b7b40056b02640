"""Moved to :mod:`probe.ui.lab`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.ui.lab")

warnings.warn("probe.lab moved to probe.ui.lab", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
