"""Moved to :mod:`probe.steer.edit`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.steer.edit")

warnings.warn("probe.edit moved to probe.steer.edit", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
