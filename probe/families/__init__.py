"""Model families: one file each (:mod:`~probe.families.unet`, :mod:`~probe.families.sd3`,
:mod:`~probe.families.flux`, :mod:`~probe.families.flux2`, :mod:`~probe.families.zimage`,
:mod:`~probe.families.qwen`, :mod:`~probe.families.sana`), one line each in :data:`FAMILIES`. A family says
everything the library needs that differs between kinds of denoisers (see :class:`~probe.families.base.Family`);
nothing outside this package branches on a model's name or class.

To add one: subclass :class:`~probe.families.base.Family` in a new file here and add an instance to :data:`FAMILIES`.
"""

from __future__ import annotations

from probe.families.base import Family
from probe.families.flux import Flux
from probe.families.flux2 import Flux2
from probe.families.layout import denoiser
from probe.families.qwen import QwenImage
from probe.families.sana import Sana
from probe.families.sd3 import SD3
from probe.families.unet import UNet
from probe.families.zimage import ZImage

FAMILIES: list[Family] = [UNet(), SD3(), Flux(), Flux2(), ZImage(), QwenImage(), Sana()]


def families() -> list[Family]:
    """Every family the library knows, in the order they are matched."""
    return list(FAMILIES)


def family_of(net) -> Family:
    """The family of a denoiser (a UNet or a transformer)."""
    for family in FAMILIES:
        if family.matches(net):
            return family
    names = ", ".join(type(f).__name__ for f in FAMILIES)
    raise TypeError(f"the tap knows the attention of {names} denoisers, not {type(net).__name__}: its attention "
                    "layout (which keys are image and which are text) would have to be described first")


def family(pipe) -> Family:
    """The family of a pipeline's denoiser."""
    return family_of(denoiser(pipe))


__all__ = ["FAMILIES", "Family", "Flux", "Flux2", "QwenImage", "SD3", "Sana", "UNet", "ZImage", "families", "family",
           "family_of"]
