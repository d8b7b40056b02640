"""The UNet family (``UNet2DConditionModel``: SD 1.x/2.x, SDXL, the built-in model): ``attn1`` modules are self-
attention over the image tokens, ``attn2`` modules cross-attention over the text tokens; one softmax each."""

from __future__ import annotations

import math

from probe.tap.layers import Family, Layer, Split, attention_modules

ALL = Split(slice(None), slice(None), None)
CROSS = Split(slice(None), None, slice(None))


def _kinds(module) -> tuple[str, ...]:
    if getattr(module, "add_k_proj", None) is not None and not module.only_cross_attention:
        return ("cross", "self")  # added-KV: one softmax over text and image keys
    return ("cross",) if module.is_cross_attention else ("self",)


class UNet(Family):
    name = "unet"

    def matches(self, net) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(net, UNet2DConditionModel)

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        return {name: _kinds(m) for name, m in attention_modules(net).items()}

    def latent(self, pipe) -> tuple[int, int]:
        size = pipe.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def pixel_multiple(self, pipe) -> int:  # Stable Diffusion pipelines also check multiples of 8
        return math.lcm(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        lh, lw = latent_hw
        top, *rest = name.split(".")
        blocks = len(net.config.block_out_channels)
        if top == "down_blocks":
            depth = int(rest[0])
        else:
            depth = blocks - 1 - (int(rest[0]) if top == "up_blocks" else 0)
        return -(-lh // 2**depth), -(-lw // 2**depth)  # ceil, as strided convolutions do

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.latent_hw = tuple(sample.shape[-2:])

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        if getattr(attn, "add_k_proj", None) is not None and encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]  # added-KV: the text keys first, then the image keys
            return Split(slice(None), None if attn.only_cross_attention else slice(n_text, None), slice(0, n_text))
        return CROSS if encoder_hidden_states is not None else ALL

    def runtime_grid(self, layer: Layer, hidden_states, state) -> tuple[int, int]:
        lh, lw = state.latent_hw
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        factor = round((lh * lw / queries) ** 0.5)
        return -(-lh // factor), -(-lw // factor)
