"""The Z-Image family (``ZImageTransformer2DModel``, ``ZImagePipeline``): a single-stream DiT. Its attention modules
are diffusers ``Attention`` with ``ZSingleStreamAttnProcessor`` (QK RMS norms and complex rotary embeddings, then
``dispatch_attention_fn`` in (batch, tokens, heads, dim)), in three places:

- ``noise_refiner.*``: the image tokens alone (self-attention);
- ``context_refiner.*``: the caption tokens alone (text → text);
- ``layers.*``: one softmax over [image tokens; caption tokens] (image first), for image and text queries alike.

Each sample's image tokens (2×2 latent pixels each) and caption tokens are each padded to a multiple of 32 with pad
tokens that are *not* masked (the padded image tokens are keys of every image softmax); a batch whose samples differ
in caption length is padded again, with a key mask. So the image block is the first h·w tokens, the caption starts
after the padded image tokens. The caption is the chat-templated prompt's tokens with the tokenizer's padding
dropped (the pipeline keeps ``embeds[mask]``).

Classifier-free guidance runs as one batch [conditional; unconditional] (conditional first), with
``pred = cond + s·(cond − uncond)``: a scale of 0 (not 1) is the conditional branch alone. The transformer predicts
the negative velocity at ``(1000 − t) / 1000``.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.families import tiny as parts
from probe.families import words
from probe.families.base import Family, Velocity, set_shifted_sigmas
from probe.families.keys import TextKeys, templated, verbatim
from probe.families.layout import TEXT_QUERIES, Split, TapError, attention_modules, every_module

PATCH = 2  # ZImagePipeline calls the transformer with patch_size=2: one token per 2×2 latent pixels
SEQ_MULTIPLE = 32  # each part of a sample's sequence is padded to a multiple of this (the transformer's SEQ_MULTI_OF)
DEFAULT_SIDE = 1024  # ZImagePipeline's default height and width in pixels
ROLES = {"noise_refiner": ("self",), "context_refiner": ("text_text",), "layers": ("cross", "self", *TEXT_QUERIES)}


class ZImage(Family):
    name = "zimage"
    title = "Z-Image"
    flow = True
    conditional_first = True
    max_sequence = 512  # the pipeline's own max_sequence_length default

    def matches(self, net) -> bool:
        from diffusers import ZImageTransformer2DModel

        return isinstance(net, ZImageTransformer2DModel)

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        found = {name: ROLES[name.split(".")[0]] for name in attention_modules(net)
                 if name.split(".")[0] in ROLES and name.endswith(".attention")}
        return every_module(net, found, self.title, " (the omni model's SigLIP refiner?)")

    def latent(self, pipe) -> tuple[int, int]:
        side = DEFAULT_SIDE // pipe.vae_scale_factor
        return side, side

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * PATCH

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // PATCH, latent_hw[1] // PATCH

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        x = args[0] if args else kwargs["x"]
        if isinstance(x[0], list):
            raise TapError("Z-Image in omni mode (several images per sample, SigLIP features): its token layout "
                           "(caption, images, SigLIP tokens) is not one the tap splits; record text-to-image runs")
        t = args[1] if len(args) > 1 else kwargs["t"]  # the pipeline hands (1000 − timestep) / 1000
        state.zimage_t = float(t.flatten()[0])
        p = kwargs.get("patch_size", PATCH)
        state.image_grid = (x[0].shape[-2] // p, x[0].shape[-1] // p)
        if getattr(state, "zimage_roles", None) is None:  # module → its place, read once per tap
            state.zimage_roles = {id(m): name.split(".")[0] for name, m in attention_modules(net).items()}

    def cfg_call(self, pipe, state) -> bool:
        """The pipeline's own rule: past ``cfg_truncation`` (a fraction of the schedule) it runs the conditional
        branch alone."""
        truncation = getattr(pipe, "_cfg_truncation", None)
        late = truncation is not None and float(truncation) <= 1 and getattr(state, "zimage_t", 0.0) > truncation
        return super().cfg_call(pipe, state) and not late

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        h, w = state.image_grid
        n_image = h * w
        role = state.zimage_roles[id(attn)]
        if role == "noise_refiner":
            return Split(slice(0, n_image), slice(0, n_image), None)
        if role == "context_refiner":
            return Split(slice(0, 0), None, slice(0, None), slice(0, None))
        caption = n_image + (-n_image) % SEQ_MULTIPLE  # after the padded image tokens
        return Split(slice(0, n_image), slice(0, n_image), slice(caption, None), slice(caption, None))

    def runtime_grid(self, layer, hidden_states, state) -> tuple[int, int]:
        return state.image_grid or layer.grid

    # -- text --
    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        length = max_sequence_length or self.max_sequence
        tok = pipe.tokenizer

        def render(prompt: str) -> str:
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True)

        keys = templated(tok, verbatim(render), length, pad_multiple=SEQ_MULTIPLE)  # the pipeline keeps embeds[mask]
        return [("llm", TextKeys(tok, keys, length), length)]

    # -- the denoiser outside the pipeline's loop --
    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net = pipe.transformer
        seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _ = pipe.encode_prompt(prompt, device=pipe._execution_device, do_classifier_free_guidance=False,
                                       **seq)

        def call(latents, t):
            n = latents.shape[0]
            x = list(latents.to(net.dtype).unsqueeze(2).unbind(0))
            out = net(x, (1000 - t.expand(n)) / 1000, embeds * n, return_dict=False)[0]
            return -torch.stack([o.float() for o in out]).squeeze(2)  # the pipeline's velocity is the negative
        return call

    def set_timesteps(self, pipe, steps: int, height: int, width: int) -> None:
        """ZImagePipeline's sigmas linspace(1, 1/T) and FLUX's resolution-dependent shift."""
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        step = pipe.vae_scale_factor * PATCH
        set_shifted_sigmas(pipe, get_default_z_image_sigmas(steps), (height // step) * (width // step))

    def initial_noise(self, pipe, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        return randn_tensor((1, pipe.transformer.in_channels, *latent_hw), generator=generator,
                            device=pipe._execution_device, dtype=torch.float32)  # the pipeline draws float32

    def tiny(self) -> dict:
        return {"tiny-zimage": tiny_zimage}

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """Z-Image inverts on the conditional branch alone, which its pipeline runs at guidance_scale=0."""
        return 0.0


def tiny_zimage():
    """A small random ZImagePipeline (noise and context refiners, single-stream layers, a Qwen3-style chat LLM whose
    second-to-last hidden states are the caption), the same weights on every call. A byte-level word tokenizer
    (:func:`probe.families.words.chat`) stands in for Qwen's. Its pipeline's own default size is 1024 px: give height
    and width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = words.chat()
    width = 16
    with parts.seeded():
        transformer = ZImageTransformer2DModel(
            all_patch_size=(PATCH,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
        )
        _perturb_pad_tokens(transformer)
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), transformer=transformer,
            text_encoder=parts.llm("qwen3-model", len(tok), width, 2, tok.pad_token_id), tokenizer=tok,
        )


def _perturb_pad_tokens(transformer) -> None:
    """Random pad tokens (they start at zero), so a test sees them take attention as a trained model's do."""
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()


def _vae():
    vae = parts.vae(flow=True)
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.5)  # Z-Image's autoencoder shifts and scales
    return vae
