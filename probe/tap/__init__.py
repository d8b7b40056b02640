"""The attention tap: one wrapper per attention module, shared by every consumer (see :mod:`probe.tap.core`).

Families (how each kind of denoiser lays out its attention) live beside it: :mod:`probe.tap.unet`
(``UNet2DConditionModel``), :mod:`probe.tap.joint` (SD3 / SD3.5 joint attention), :mod:`probe.tap.flux`
(FLUX.1 double- and single-stream blocks).
"""

from probe.tap.core import PASSES, Call, Consumer, Tap, TapError, attention_probs
from probe.tap.layers import Layer, attention_layers, denoiser, family_of, latent_size, select_layers

__all__ = ["PASSES", "Call", "Consumer", "Layer", "Tap", "TapError", "attention_layers", "attention_probs",
           "denoiser", "family_of", "latent_size", "select_layers"]
