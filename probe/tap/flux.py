"""Moved to :mod:`probe.families.flux` (this path is kept for one release)."""

import warnings

from probe.families.flux import *  # noqa: F403
from probe.families.flux import Flux  # noqa: F401

warnings.warn("probe.tap.flux moved to probe.families.flux", DeprecationWarning, stacklevel=2)
