"""What guidance, inversion and editing (anything that runs the denoiser outside the pipeline's own loop) need from a
pipeline: the conditional branch's denoiser call, the schedule as the pipeline sets it, and the seed's initial noise in
the pipeline's own latent layout. Each asks the pipeline's family (:mod:`probe.families`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from probe.families import family
from probe.families.unet import conditioning
from probe.tap import latent_size

FLUX_GUIDANCE = 3.5  # FluxPipeline's default embedded guidance


def conditioned(pipe, prompt: str, height: int, width: int, max_sequence_length: int | None = None,
                guidance: float = FLUX_GUIDANCE) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(latents, t)``: the denoiser's output on the conditional branch of ``prompt``, as the pipeline calls it
    (``guidance``: the embedded guidance of transformers trained with it, such as FLUX.1-dev's)."""
    chosen = family(pipe)
    with torch.no_grad():
        return chosen.conditioned(pipe, prompt, height, width, max_sequence_length, guidance)


unet_conditioning = conditioning  # a UNet pipeline's conditional embeddings and extra denoiser kwargs


def noise_sigma(pipe) -> float:
    """The scheduler's initial noise scale (1 for flow matching, which has no ``init_noise_sigma``)."""
    return float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))


def set_timesteps(pipe, steps: int, height: int, width: int) -> torch.Tensor:
    """Set the scheduler's timesteps as the pipeline itself will (FLUX: its sigmas and resolution-dependent shift)."""
    family(pipe).set_timesteps(pipe, steps, height, width)
    return pipe.scheduler.timesteps.clone()


def initial_noise(pipe, generator: torch.Generator, height: int | None, width: int | None) -> torch.Tensor:
    """The noise the pipeline would draw from ``generator`` for one image, in its latent layout."""
    return family(pipe).initial_noise(pipe, generator, latent_size(pipe, height, width))


def pipeline_latents(pipe, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """Latents in the denoiser's sampling layout as the pipeline's ``latents=`` takes them (where the two differ)."""
    return family(pipe).pipeline_latents(pipe, latents, latent_size(pipe, height, width))


set_schedule = set_timesteps  # the name before 0.2; guidance's settings are guide.Schedule
