"""The UNet family (``UNet2DConditionModel``: SD 1.x/2.x, SDXL, the built-in model): ``attn1`` modules are self-
attention over the image tokens, ``attn2`` modules cross-attention over the text tokens; one softmax each."""

from __future__ import annotations

import math

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from probe.families import tiny as parts
from probe.families.base import Family, Velocity
from probe.families.layout import Layer, Split, attention_modules

ALL = Split(slice(None), slice(None), None)
CROSS = Split(slice(None), None, slice(None))


def _kinds(module) -> tuple[str, ...]:
    if getattr(module, "add_k_proj", None) is not None and not module.only_cross_attention:
        return ("cross", "self")  # added-KV: one softmax over text and image keys
    return ("cross",) if module.is_cross_attention else ("self",)


class UNet(Family):
    name = "unet"
    title = "UNet (SD 1.x/2.x, SDXL)"
    self_qk = True

    def matches(self, net) -> bool:
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

    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        return [("clip", pipe.tokenizer, pipe.tokenizer.model_max_length)]  # SDXL's two encoders share positions

    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        embeds, extra = conditioning(pipe, prompt, height, width)
        net = pipe.unet

        def call(latents, t):
            scheduler = pipe.scheduler
            scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            return net(scaled, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
        return call

    def tiny(self) -> dict:
        return {"tiny": tiny_pipeline, "tiny-xl": lambda: tiny_pipeline(xl=True)}

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """Null-text inversion makes SD 1.x/2.x consistent with the edit's guidance; SDXL inverts without it."""
        return 1.0 if _is_xl(pipe) else float(guidance_scale)


def _is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")  # SDXL: two text encoders, pooled embeddings and size ids


def conditioning(pipe, prompt: str, height: int, width: int) -> tuple:
    """A UNet pipeline's conditional text embeddings (no CFG) and its extra denoiser kwargs (SDXL's pooled
    embeddings and size ids)."""
    device = pipe._execution_device
    if _is_xl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 else int(pooled.shape[-1])
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype, proj).to(device)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    if not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"{type(pipe).__name__} has no encode_prompt: a Stable Diffusion (1.x/2.x, XL) pipeline "
                        "is needed here")
    return pipe.encode_prompt(prompt, device, 1, False)[0], {}


def tiny_pipeline(xl: bool = False):
    """A small random SD (or SDXL) pipeline, the same weights on every call and machine."""
    tok = parts.project_tokenizer()
    with parts.seeded():
        if not xl:
            unet = UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=16,
            )
            return StableDiffusionPipeline(
                vae=parts.vae(), text_encoder=parts.text_encoder(len(tok), 32), tokenizer=tok, unet=unet,
                scheduler=parts.ddim(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=16,
        )
        return StableDiffusionXLPipeline(
            vae=parts.vae(), text_encoder=parts.text_encoder(len(tok), 32), tokenizer=tok,
            text_encoder_2=parts.text_encoder(len(tok), 32, projection=True), tokenizer_2=parts.project_tokenizer(),
            unet=unet, scheduler=parts.ddim(),
        )
