"""The FLUX family: FLUX.1 (``FluxTransformer2DModel``); FLUX.2 (``Flux2Transformer2DModel``) and Qwen-Image (its
double-stream blocks alone) share its attention layout and subclass it (:mod:`probe.families.flux2`,
:mod:`probe.families.qwen`). Attention modules are ``FluxAttention`` / ``Flux2Attention``
and, in FLUX.2's single-stream blocks, ``Flux2ParallelSelfAttention`` (``AttentionModuleMixin``); text tokens come
first (``cat([text, image])``), q and k get RMS norms and rotary embeddings before the scores, and attention goes
through ``dispatch_attention_fn`` in (batch, tokens, heads, dim). Double-stream blocks project text and image
separately; single-stream blocks receive the concatenation, so the text length is read from the transformer's own
call, and the image grid from its position ids ((t, h, w) in FLUX.1, (t, h, w, l) in FLUX.2). FLUX.2's
reference-image tokens (KV cache) sit between text and image; a call with them is refused."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.families import tiny as parts
from probe.families.base import Family, Velocity, set_shifted_sigmas
from probe.families.layout import TEXT_QUERIES, Split, TapError, attention_modules, every_module

PACK = 2  # FLUX packs 2×2 latent pixels into one token


class Flux(Family):
    name = "flux"
    title = "FLUX"
    flow = True
    max_sequence = 512  # the pipeline's own max_sequence_length default

    def matches(self, net) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(net, FluxTransformer2DModel)

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        found = {name: ("cross", "self", *TEXT_QUERIES) for name in attention_modules(net)
                 if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn")}
        return every_module(net, found, self.title)

    def latent(self, pipe) -> tuple[int, int]:
        size = getattr(pipe, "default_sample_size", 128)
        return size, size

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * PACK

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // PACK, latent_hw[1] // PACK

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        if kwargs.get("num_ref_tokens") or kwargs.get("kv_cache") is not None:
            raise TapError("FLUX.2 with reference-image tokens (kv_cache / num_ref_tokens): they sit between the "
                           "text and image tokens of each softmax, a layout the tap does not split yet; record "
                           "without reference images")
        text = kwargs.get("encoder_hidden_states")
        state.text_tokens = None if text is None else text.shape[1]
        ids = kwargs.get("img_ids")
        if ids is not None:
            ids = ids[0] if ids.ndim == 3 else ids
            state.image_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        if encoder_hidden_states is not None:  # double stream: text keys first
            n_text = encoder_hidden_states.shape[1]
        else:  # single stream: hidden_states is already [text; image]
            n_text = state.text_tokens
        return Split(slice(n_text, None), slice(n_text, None), slice(0, n_text), slice(0, n_text))

    def runtime_grid(self, layer, hidden_states, state) -> tuple[int, int]:
        return state.image_grid or layer.grid

    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        return [("t5", pipe.tokenizer_2, max_sequence_length or self.max_sequence)]  # T5's positions alone

    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net, device = pipe.transformer, pipe._execution_device
        seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=device, **seq)
        scale = pipe.vae_scale_factor
        image_ids = pipe._prepare_latent_image_ids(1, height // scale // PACK, width // scale // PACK, device,
                                                   embeds.dtype)
        embedded = torch.full((1,), guidance, device=device) if net.config.guidance_embeds else None

        def call(latents, t):
            return net(hidden_states=latents, timestep=(t / 1000).expand(latents.shape[0]), guidance=embedded,
                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                       img_ids=image_ids, return_dict=False)[0]
        return call

    def set_timesteps(self, pipe, steps: int, height: int, width: int) -> None:
        """FluxPipeline's sigmas and its resolution-dependent shift."""
        step = pipe.vae_scale_factor * PACK
        set_shifted_sigmas(pipe, np.linspace(1.0, 1 / steps, steps), (height // step) * (width // step))

    def initial_noise(self, pipe, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        net = pipe.transformer
        channels = net.config.in_channels // PACK**2
        noise = randn_tensor((1, channels, *latent_hw), generator=generator, device=pipe._execution_device,
                             dtype=net.dtype)
        return pipe._pack_latents(noise, 1, channels, *latent_hw)

    def pack(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        return pipe._pack_latents(latent, 1, *latent.shape[1:])

    def unpack(self, pipe, latent: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        scale = pipe.vae_scale_factor
        side = round((latent.shape[1] * PACK**2) ** 0.5) * scale  # tokens = (h/2)·(w/2) latent pixels
        return pipe._unpack_latents(latent, height or side, width or side, scale)

    def tiny(self) -> dict:
        return {"tiny-flux": tiny_flux}

    def embeds_guidance(self, net) -> bool:
        return bool(net.config.guidance_embeds)  # FLUX.1-dev's guidance is an input, not CFG


def tiny_flux():
    """A small random FLUX.1-style pipeline (double- and single-stream blocks, RoPE, QK RMS norms, CLIP + T5 text),
    32 px, the same weights on every call. The project's CLIP tokenizer stands in for T5's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = parts.project_tokenizer()
    with parts.seeded():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        )
        pipe = FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=parts.vae(flow=True),
            text_encoder=parts.text_encoder(len(tok), 32), tokenizer=tok,
            text_encoder_2=parts.t5_encoder(len(tok), 32), tokenizer_2=parts.project_tokenizer(),
        )
    pipe.default_sample_size = 16
    return pipe
