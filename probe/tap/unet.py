"""Moved to :mod:`probe.families.unet` (this path is kept for one release)."""

import warnings

from probe.families.unet import *  # noqa: F403
from probe.families.unet import UNet  # noqa: F401

warnings.warn("probe.tap.unet moved to probe.families.unet", DeprecationWarning, stacklevel=2)
