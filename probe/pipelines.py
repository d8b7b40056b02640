"""What guidance (and anything else that runs the denoiser outside the pipeline's loop) needs from a pipeline, per
family: the conditional branch's denoiser call, the schedule as the pipeline sets it, and the seed's initial noise in
the pipeline's own latent layout (FLUX packs 2×2 latent pixels into tokens)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.tap import denoiser, family_of, latent_size

FLUX_GUIDANCE = 3.5  # FluxPipeline's default embedded guidance


def conditioned(pipe, prompt: str, height: int, width: int, max_sequence_length: int | None = None,
                guidance: float = FLUX_GUIDANCE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(latents, t)``: the denoiser's output on the conditional branch of ``prompt``, as the pipeline calls it
    (``guidance``: FLUX's embedded guidance, for transformers trained with it)."""
    net, device = denoiser(pipe), pipe._execution_device
    family = family_of(net).name
    if type(net).__name__ == "Flux2Transformer2DModel":
        raise NotImplementedError("FLUX.2 pipelines are recorded (probe.record, the tap) but not yet guided, "
                                  "edited or inverted: their text encoding and latent layout are not described here")
    seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device,
                                                      do_classifier_free_guidance=False, **seq)

            def call(latents, t):
                return net(hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
            return call
        if family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=device, **seq)
            scale = pipe.vae_scale_factor
            image_ids = pipe._prepare_latent_image_ids(1, height // scale // 2, width // scale // 2, device,
                                                       embeds.dtype)
            embedded = torch.full((1,), guidance, device=device) if net.config.guidance_embeds else None

            def call(latents, t):
                return net(hidden_states=latents, timestep=(t / 1000).expand(latents.shape[0]), guidance=embedded,
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                           img_ids=image_ids, return_dict=False)[0]
            return call
        embeds, extra = unet_conditioning(pipe, prompt, height, width)

    def call(latents, t):
        scheduler = pipe.scheduler
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        return net(model_input, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
    return call


def unet_conditioning(pipe, prompt: str, height: int, width: int) -> tuple[torch.Tensor, dict]:
    """A UNet pipeline's conditional text embeddings (no CFG) and its extra denoiser kwargs (SDXL's pooled
    embeddings and size ids)."""
    device = pipe._execution_device
    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 else int(pooled.shape[-1])
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype, proj).to(device)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    if not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"{type(pipe).__name__} has no encode_prompt: a Stable Diffusion (1.x/2.x, XL) pipeline "
                        "is needed here")
    return pipe.encode_prompt(prompt, device, 1, False)[0], {}


def noise_sigma(pipe) -> float:
    """The scheduler's initial noise scale (1 for flow matching, which has no ``init_noise_sigma``)."""
    return float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))


def set_schedule(pipe, steps: int, height: int, width: int) -> torch.Tensor:
    """Set the scheduler's timesteps as the pipeline itself will (FLUX: its sigmas and resolution-dependent shift)."""
    scheduler, device = pipe.scheduler, pipe._execution_device
    if family_of(denoiser(pipe)).name == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scale = pipe.vae_scale_factor
        tokens = (height // scale // 2) * (width // scale // 2)
        c = scheduler.config
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps.clone()


def initial_noise(pipe, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
    """The noise the pipeline would draw from ``generator`` for one image, in its latent layout."""
    net = denoiser(pipe)
    lh, lw = latent_size(pipe, height, width)
    if family_of(net).name == "flux":
        channels = net.config.in_channels // 4
        noise = randn_tensor((1, channels, lh, lw), generator=generator, device=pipe._execution_device,
                             dtype=net.dtype)
        return pipe._pack_latents(noise, 1, channels, lh, lw)
    return randn_tensor((1, net.config.in_channels, lh, lw), generator=generator, device=pipe._execution_device,
                        dtype=net.dtype)
