"""Moved to :mod:`probe.ui.explore`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.ui.explore")

warnings.warn("probe.explore moved to probe.ui.explore", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
