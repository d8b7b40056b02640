"""The attention tap: one wrapper per attention module, shared by every consumer (see :mod:`probe.tap.core`).

How each kind of denoiser lays out its attention is its family's (:mod:`probe.families`, in the terms of
:mod:`probe.families.layout`); :mod:`probe.tap.layers` lists and chooses the layers of a pipeline.
"""

from probe.families import family_of
from probe.families.layout import denoiser
from probe.tap.core import PASSES, Call, Consumer, Tap, TapError, attention_probs
from probe.tap.layers import Layer, attention_layers, latent_size, select_layers

__all__ = ["PASSES", "Call", "Consumer", "Layer", "Tap", "TapError", "attention_layers", "attention_probs",
           "denoiser", "family_of", "latent_size", "select_layers"]
