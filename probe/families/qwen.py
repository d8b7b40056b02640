"""The Qwen-Image family (``QwenImageTransformer2DModel``, ``QwenImagePipeline``). Each double-stream block's ``attn``
runs one softmax over [text tokens; image tokens] (text first, ``QwenDoubleStreamAttnProcessor2_0``): text and image
are projected apart, q and k get RMS norms per head and then Qwen's own rotary embedding (complex-valued, image
positions centred on the grid, text positions after the image's largest side), and attention goes through
``dispatch_attention_fn`` in (batch, tokens, heads, dim), with a boolean mask over [text; image] keys only where
the text keys of a batch are padded. The image grid is read from the transformer's ``img_shapes``; a call with more
than one image per sample (the edit pipelines' reference images, whose tokens follow the generated ones) is refused.

Text keys: the prompt inside the pipeline's chat template, encoded by Qwen2.5-VL, with the template's first
``prompt_template_encode_start_idx`` tokens dropped and no padding (a batch pads to its longest): the prompt's tokens
first, then the template's closing tokens. Classifier-free guidance (``true_cfg_scale`` with a ``negative_prompt``)
runs the halves apart, each named by the pipeline's ``cache_context`` (probe's ``guidance_scale`` is that
``true_cfg_scale``); the pipeline's own ``guidance_scale`` is an input of the denoiser only where it was trained with
one (``guidance_embeds``) and ignored otherwise."""

from __future__ import annotations

import torch

from probe.families import tiny as parts
from probe.families import words
from probe.families.base import Velocity
from probe.families.flux import PACK, Flux
from probe.families.keys import TextKeys, templated
from probe.families.layout import TapError


class QwenImage(Flux):
    """Laid out as FLUX.1's double-stream blocks ([text; image], 2×2 latent pixels a token) and scheduled as FLUX.1 is
    (linspace sigmas, resolution-dependent shift); its noise is FLUX's draw with a frame axis of one (the same
    numbers). What differs: the grid from ``img_shapes``, its text keys, its one-frame autoencoder and the call of
    its transformer. An edit's scale is the pipeline's ``true_cfg_scale`` (:func:`probe.models.generation`), which
    acts only with a ``negative_prompt``: an edit without one runs the conditional branch alone, as the inversion
    does, so the inversion is made at the edit's own scale."""

    name = "qwen-image"
    title = "Qwen-Image"

    def matches(self, net) -> bool:
        from diffusers import QwenImageTransformer2DModel

        return isinstance(net, QwenImageTransformer2DModel)

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        shapes = kwargs.get("img_shapes")
        if shapes is None:
            return
        if any(len(sample) != 1 for sample in shapes):
            raise TapError("Qwen-Image with reference images (img_shapes lists more than one image per sample): their "
                           "tokens follow the generated image's in each softmax, a layout the tap does not split yet")
        _, h, w = shapes[0][0]
        state.image_grid = (int(h), int(w))

    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        length = max_sequence_length or self.max_sequence
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        start = template.index("{}")
        keys = templated(pipe.tokenizer, lambda prompt: (template.format(prompt), start), length, drop=drop)
        return [("qwen", TextKeys(pipe.tokenizer, keys, length), length)]

    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net, device = pipe.transformer, pipe._execution_device
        embeds, mask = pipe.encode_prompt(prompt, device=device,
                                          max_sequence_length=max_sequence_length or self.max_sequence)
        scale = pipe.vae_scale_factor
        shapes = [[(1, height // scale // PACK, width // scale // PACK)]]
        embedded = torch.full((1,), guidance, device=device) if net.config.guidance_embeds else None

        def call(latents, t):
            n = latents.shape[0]
            return net(hidden_states=latents, timestep=t.expand(n).to(latents.dtype) / 1000,
                       guidance=None if embedded is None else embedded.expand(n), encoder_hidden_states_mask=mask,
                       encoder_hidden_states=embeds.expand(n, -1, -1), img_shapes=shapes * n, return_dict=False)[0]
        return call

    def to_latent(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """AutoencoderKLQwenImage encodes one-frame videos; the pipeline normalises by its per-channel mean and SD."""
        vae = pipe.vae
        mean, std = _latent_stats(vae, pixels)
        return ((vae.encode(pixels.to(vae.dtype)[:, :, None]).latent_dist.mean - mean) / std)[:, :, 0]

    def to_pixels(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        mean, std = _latent_stats(vae, latent)
        return vae.decode((latent[:, :, None] * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]

    def unpack(self, pipe, latent: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        return super().unpack(pipe, latent, height, width)[:, :, 0]  # the one frame

    def tiny(self) -> dict:
        return {"tiny-qwen-image": tiny_qwen_image}


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's per-channel latent mean and SD, shaped (1, channels, 1, 1, 1)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    return mean, torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)


def tiny_qwen_image():
    """A small random Qwen-Image pipeline (double-stream blocks, Qwen's rotary embedding, QK RMS norms, a Qwen2.5-VL
    text encoder, a one-frame AutoencoderKLQwenImage with ×2 downsampling), 32 px, the same weights on every call.
    Its tokenizer is byte-level like Qwen2's, one token per word (the template's prefix is 34 tokens, as Qwen2's)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with parts.seeded():
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        vae = AutoencoderKLQwenImage(base_dim=12, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's own: dynamic shift, exponential time shift
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
        pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                 transformer=transformer)
        tokenizer = words.chat([pipe.prompt_template_encode.format("")])
        config = Qwen2_5_VLConfig(
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                         "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                             "rope_theta": 1000000.0}},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                           "out_hidden_size": 16},
        )
        encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)
    pipe.default_sample_size = 16
    return pipe
