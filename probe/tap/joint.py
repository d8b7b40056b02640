"""Moved to :mod:`probe.families.sd3` (this path is kept for one release)."""

import warnings

from probe.families.sd3 import *  # noqa: F403
from probe.families.sd3 import Joint  # noqa: F401

warnings.warn("probe.tap.joint moved to probe.families.sd3", DeprecationWarning, stacklevel=2)
