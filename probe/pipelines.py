"""Moved to :mod:`probe.steer.pipelines`; this path is kept for one release."""

import importlib
import sys
import warnings

_moved = importlib.import_module("probe.steer.pipelines")

warnings.warn("probe.pipelines moved to probe.steer.pipelines", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
