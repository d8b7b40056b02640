"""Real images into a diffusion model's trajectory: inversion and what it is measured by.

- UNet pipelines with a DDIM scheduler: :func:`ddim_invert` (deterministic DDIM inversion) and, where the edit runs
  with classifier-free guidance, :func:`null_text_inversion` (Mokady et al.), as Free-Prompt-Editing's code offers.
- Flow-matching pipelines (SD3 / SD3.5, FLUX): :func:`flow_invert` walks the Euler sampler's σ levels upwards.

:func:`invert` picks the one the pipeline needs. An :class:`Inversion` holds the trajectory in the order the
generation visits it; :func:`regenerate` samples from it, :func:`reconstruction_psnr` scores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from probe.checks import cfg_scale, rgb_pixels, step_count
from probe.families import family
from probe.images import to_uint8
from probe.models import load
from probe.steer.pipelines import conditioned, noise_sigma, pipeline_latents, set_timesteps, unet_conditioning
from probe.tap import denoiser, latent_size

PIXEL_MAX = 255.0  # PSNR on 8-bit images

@dataclass
class Inversion:
    """A DDIM inversion trajectory, in the order the generation visits it.

    ``latents[i]`` is the denoiser's input at generation step ``i`` (timestep ``timesteps[i]``);
    ``latents[-1]`` is the encoded image itself. So ``latents[0]`` is the inverted noise and
    ``latents[i + 1]`` is where step ``i`` should land.
    """

    latents: torch.Tensor  # (steps + 1, channels, h, w)
    timesteps: torch.Tensor  # (steps,)
    prompt: str
    null_embeds: torch.Tensor | None = None  # (steps, tokens, width): null-text inversion's per-step unconditional
    guidance_scale: float = 1.0  # the guidance the trajectory is consistent with (> 1 only with null_embeds)

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def clean(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def steps(self) -> int:
        return len(self.timesteps)



def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    lh, lw = latent_size(pipe, height, width)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return lh * scale, lw * scale


def _as_pixels(image) -> np.ndarray:
    """H×W×3 float32 in 0–1 from a PIL image, an image file's path, or an H×W×3 array or tensor (uint8, or float in
    0–1); see :func:`probe.checks.rgb_pixels` for what is refused."""
    return rgb_pixels(image)


def _check_size(image: np.ndarray, size: tuple[int, int]) -> None:
    if tuple(image.shape[:2]) != size:
        raise ValueError(
            f"the image is {image.shape[0]}×{image.shape[1]} px but the pipeline works at {size[0]}×{size[1]} px; "
            "resize the image or pass height=/width= that match it"
        )


# -- DDIM inversion -----------------------------------------------------------------------------------

NULL_TEXT_STEPS = 10  # Adam iterations per denoising step (Mokady et al.'s N)
NULL_TEXT_LR = 1e-2


def _ddim_alphas(scheduler: DDIMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and ᾱ at every level of the generation: ``alphas[i]`` at timestep i, ``alphas[-1]`` at the end.

    The end level is the one DDIM's last step lands on (``final_alpha_cumprod`` where the previous
    timestep is negative), so inversion walks exactly the levels the generation walks back.
    """
    timesteps = scheduler.timesteps
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    levels = [scheduler.alphas_cumprod[int(t)] for t in timesteps]
    last = int(timesteps[-1]) - stride
    levels.append(scheduler.alphas_cumprod[last] if last >= 0 else scheduler.final_alpha_cumprod)
    return timesteps, torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in levels])


@torch.no_grad()
def encode(pipe, image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The image's VAE latent in the pipeline's own latent layout, without the batch dimension: (channels, h, w),
    as its family reads the autoencoder (:meth:`~probe.families.base.Family.to_latent`: an AutoencoderKL's mean less
    its shift, times its scale), packed as the denoiser samples (FLUX: (tokens, channels·4))."""
    pixels = _as_pixels(image)
    _check_size(pixels, image_size(pipe, height, width))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(pipe._execution_device, pipe.vae.dtype) * 2 - 1
    kind = family(pipe)
    return kind.pack(pipe, kind.to_latent(pipe, x))[0]


@torch.no_grad()
def decode(pipe, latent: torch.Tensor, height: int | None = None, width: int | None = None) -> np.ndarray:
    """A latent in the pipeline's layout (as :func:`encode` gives it) as a uint8 H×W×3 image, as the pipeline
    decodes (FLUX's packed tokens need the image size; without it the image is square)."""
    kind = family(pipe)
    x = kind.to_pixels(pipe, kind.unpack(pipe, latent[None], height, width))
    return to_uint8(pipe.image_processor.postprocess(x, output_type="np")[0])


def clean_and_noise(output: torch.Tensor, latent: torch.Tensor, alpha: torch.Tensor,
                    prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent x̂₀ and the noise ε̂ that a model output implies for ``latent`` at level ᾱ = ``alpha``.

    ε-prediction: ε̂ = output; v-prediction: x̂₀ = √ᾱ·x − √(1−ᾱ)·v and ε̂ = √(1−ᾱ)·x + √ᾱ·v; "sample":
    x̂₀ = output. In every case x = √ᾱ·x̂₀ + √(1−ᾱ)·ε̂, the relation DDIM's update keeps.
    """
    keep, drop = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction == "epsilon":
        return (latent - drop * output) / keep, output
    if prediction == "v_prediction":
        return keep * latent - drop * output, drop * latent + keep * output
    if prediction == "sample":
        return output, (latent - keep * output) / drop
    raise ValueError(f"unknown prediction type {prediction!r}: expected epsilon, v_prediction or sample")


def inversion_guidance(pipe, guidance_scale: float) -> float:
    """The guidance an inversion of this pipeline can be consistent with, for an edit at ``guidance_scale``: the
    same where null-text inversion exists (SD 1.x/2.x) or where guidance is an input of the denoiser (FLUX), 1
    (no classifier-free guidance) for SDXL and SD3."""
    return family(pipe).inversion_guidance(pipe, guidance_scale)


def invert(pipe, image, prompt: str = "", steps: int = 50, *, height: int | None = None,
           width: int | None = None, guidance_scale: float = 1.0, null_text_steps: int = NULL_TEXT_STEPS,
           null_text_lr: float = NULL_TEXT_LR) -> Inversion:
    """The inversion the pipeline needs. UNets: DDIM inversion (:func:`ddim_invert`); with ``guidance_scale`` > 1
    also null-text inversion (Mokady et al.), as Free-Prompt-Editing's code offers: per step, the unconditional
    embedding is optimised so that classifier-free guidance at that scale walks the inverted trajectory, so an edit
    at the same scale starts from a source it reconstructs. SD3 / FLUX: :func:`flow_invert` (``guidance_scale`` is
    FLUX's embedded guidance; SD3 inverts without classifier-free guidance). ``image``: a PIL image, an image file's
    path, or an H×W×3 array or tensor (uint8, or floats in [0, 1])."""
    guidance_scale = cfg_scale(guidance_scale)
    if family(pipe).flow:
        return flow_invert(pipe, image, prompt, steps, height=height, width=width, guidance_scale=guidance_scale)
    inversion = ddim_invert(pipe, image, prompt, steps, height=height, width=width)
    if guidance_scale <= 1:
        return inversion
    return null_text_inversion(pipe, inversion, guidance_scale, null_text_steps, null_text_lr,
                               image_size(pipe, height, width))


@torch.no_grad()
def flow_invert(pipe, image, prompt: str = "", steps: int = 50, *, height: int | None = None,
                width: int | None = None, guidance_scale: float = 1.0) -> Inversion:
    """Inversion of a real image for a flow-matching pipeline (SD3 / SD3.5, FLUX; Euler sampler).

    The sampler moves x along the velocity v: x(σ_{i+1}) = x(σ_i) + (σ_{i+1} − σ_i)·v(x(σ_i), t_i), σ falling
    from 1 to 0. Inversion walks the same levels upwards, x(σ_i) = x(σ_{i+1}) + (σ_i − σ_{i+1})·v(x(σ_{i+1}), t_i),
    the velocity read at the latent it starts from (the same approximation DDIM inversion makes), from the
    transformer's conditional branch. ``guidance_scale``: FLUX's embedded guidance (the edit must use the same);
    SD3's classifier-free guidance has no counterpart here, so it must be 1.
    """
    pipe = load(pipe)
    kind = family(pipe)
    if not kind.flow:
        raise TypeError(f"flow-matching inversion is for SD3 and FLUX pipelines; {type(pipe).__name__} inverts "
                        "with ddim_invert (probe.steer.inversion.invert picks it)")
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"flow-matching inversion walks the Euler sampler's levels; the pipeline has "
                        f"{type(pipe.scheduler).__name__}: set pipe.scheduler = FlowMatchEulerDiscreteScheduler."
                        "from_config(pipe.scheduler.config) first")
    unguided = kind.inversion_guidance(pipe, guidance_scale)
    if unguided < guidance_scale:
        raise ValueError(f"{kind.title} inverts on the conditional branch alone (guidance_scale={unguided:g}): edit "
                         f"real images at guidance_scale={unguided:g} for a faithful source")
    steps = step_count(steps)
    size = image_size(pipe, height, width)
    latent = encode(pipe, image, *size)[None]
    velocity = conditioned(pipe, prompt, *size, guidance=guidance_scale)
    timesteps = set_timesteps(pipe, steps, *size)
    sigmas = pipe.scheduler.sigmas.to(latent.device, torch.float64)
    trajectory = [latent[0]]
    for i in tqdm(reversed(range(steps)), total=steps, desc="flow inversion", leave=False):
        v = velocity(latent, timesteps[i])
        latent = (latent.double() + (sigmas[i] - sigmas[i + 1]) * v.double()).to(latent.dtype)
        trajectory.append(latent[0])
    return Inversion(torch.stack(trajectory[::-1]), timesteps.clone(), prompt,
                     guidance_scale=kind.inversion_guidance(pipe, guidance_scale))


@torch.no_grad()
def ddim_invert(pipe, image, prompt: str = "", steps: int = 50, *, height: int | None = None,
                width: int | None = None) -> Inversion:
    """Deterministic DDIM inversion of a real image: its latent trajectory up to noise.

    Encodes with the VAE, then walks the generation's ᾱ levels upwards with the DDIM update
    x_next = √ᾱ_next·x̂₀ + √(1−ᾱ_next)·ε̂, x̂₀ and ε̂ from the UNet's conditional prediction (no CFG) for
    the current latent at the next timestep (:func:`clean_and_noise`, any prediction type): the usual
    approximation, as diffusers' DDIMInverseScheduler and null-text inversion make. Needs the pipeline's
    scheduler to be DDIM, so that the generation walks back the same path.
    """
    pipe = load(pipe)
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(
            f"DDIM inversion needs a DDIM scheduler, the pipeline has {type(scheduler).__name__}; set "
            "pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config) first"
        )
    steps = step_count(steps)
    size = image_size(pipe, height, width)
    latent = encode(pipe, image, *size)[None]
    device = latent.device
    embeds, extra = unet_conditioning(pipe, prompt, *size)
    scheduler.set_timesteps(steps, device=device)
    timesteps, alphas = _ddim_alphas(scheduler)
    net = denoiser(pipe)
    trajectory = [latent[0]]
    for i in reversed(range(steps)):
        t = timesteps[i]
        model_input = scheduler.scale_model_input(latent, t)
        output = net(model_input, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
        a_now, a_next = alphas[i + 1], alphas[i]
        x0, eps = clean_and_noise(output.double(), latent.double(), a_now, scheduler.config.prediction_type)
        latent = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).to(latent.dtype)
        trajectory.append(latent[0])
    return Inversion(torch.stack(trajectory[::-1]), timesteps.clone(), prompt)


def null_text_inversion(pipe, inversion: Inversion, guidance_scale: float, inner_steps: int = NULL_TEXT_STEPS,
                        lr: float = NULL_TEXT_LR, size: tuple[int, int] | None = None) -> Inversion:
    """The inversion with per-step unconditional embeddings ∅ᵢ such that the guided DDIM step from ``latents[i]``
    lands on ``latents[i + 1]`` (Adam on ‖step(∅ᵢ) − latents[i + 1]‖², ∅ᵢ starting from ∅ᵢ₋₁, the empty prompt's
    embedding at i = 0); the guided walk then follows the image's own trajectory instead of drifting from it."""
    pipe = load(pipe)
    if hasattr(pipe, "text_encoder_2"):
        raise TypeError("null-text inversion supports Stable Diffusion 1.x/2.x pipelines; on SDXL edit real images at "
                        "guidance_scale=1 (the plain DDIM inversion is consistent with it)")
    size = size or image_size(pipe, None, None)
    scheduler, net = pipe.scheduler, denoiser(pipe)
    scheduler.set_timesteps(inversion.steps, device=inversion.latents.device)
    timesteps, alphas = _ddim_alphas(scheduler)
    with torch.no_grad():
        cond, _ = unet_conditioning(pipe, inversion.prompt, *size)
        null = unet_conditioning(pipe, "", *size)[0]
    prediction = scheduler.config.prediction_type

    def guided_step(latent: torch.Tensor, i: int, uncond: torch.Tensor, cond_out: torch.Tensor) -> torch.Tensor:
        t = timesteps[i]
        uncond_out = net(scheduler.scale_model_input(latent, t), t, encoder_hidden_states=uncond, return_dict=False)[0]
        out = uncond_out + guidance_scale * (cond_out - uncond_out)
        x0, eps = clean_and_noise(out.double(), latent.double(), alphas[i], prediction)
        return (alphas[i + 1].sqrt() * x0 + (1 - alphas[i + 1]).sqrt() * eps).to(latent.dtype)

    latent, found = inversion.latents[:1].clone(), []
    for i in tqdm(range(inversion.steps), desc="null-text inversion", leave=False):
        t, target = timesteps[i], inversion.latents[i + 1 : i + 2]
        with torch.no_grad():
            cond_out = net(scheduler.scale_model_input(latent, t), t, encoder_hidden_states=cond, return_dict=False)[0]
        null = null.detach().clone().requires_grad_(True)  # a copy: Adam updates in place
        optimiser = torch.optim.Adam([null], lr=lr)
        with torch.enable_grad():
            for _ in range(inner_steps):
                loss = torch.nn.functional.mse_loss(guided_step(latent, i, null, cond_out), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            null = null.detach()
            latent = guided_step(latent, i, null, cond_out)
        found.append(null[0])
    return replace(inversion, null_embeds=torch.stack(found), guidance_scale=float(guidance_scale))


@torch.no_grad()
def regenerate(pipe, inversion: Inversion, prompt: str | None = None, guidance_scale: float | None = None,
               **pipeline_kwargs):
    """Generate from an inversion's noise (default: its own prompt at its own guidance, with its null-text
    embeddings where it has them), as the pipeline would."""
    scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    noise = inversion.noise[None] / noise_sigma(pipe)
    if inversion.null_embeds is not None and scale > 1:
        pipeline_kwargs.update(negative_prompt_embeds=inversion.null_embeds[:1].clone(),
                               callback_on_step_end=null_text_callback(inversion, None),
                               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    noise = pipeline_latents(pipe, noise, pipeline_kwargs.get("height"), pipeline_kwargs.get("width"))
    return pipe(prompt=inversion.prompt if prompt is None else prompt, latents=noise,
                num_inference_steps=inversion.steps, guidance_scale=scale, **pipeline_kwargs).images[0]


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images (uint8, or floats in 0–1)."""
    x, y = _as_pixels(a) * PIXEL_MAX, _as_pixels(b) * PIXEL_MAX
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(PIXEL_MAX**2 / mse)


def reconstruction_psnr(pipe, image, prompt: str, steps: int = 50) -> float:
    """PSNR (dB) of the image against inverting it and regenerating it with the same prompt (guidance 1).

    The number a model card reports for "how well does a real image survive inversion": the VAE's
    own loss plus the DDIM inversion's drift.
    """
    pipe = load(pipe)
    pixels = _as_pixels(image)
    height, width = pixels.shape[:2]
    inversion = invert(pipe, image, prompt, steps, height=height, width=width)
    regenerated = regenerate(pipe, inversion, output_type="np", height=height, width=width)
    return psnr(to_uint8(pixels), to_uint8(regenerated))


def null_text_callback(inversion: Inversion, user_callback: Callable | None) -> Callable:
    """A ``callback_on_step_end`` that gives the next step the null-text inversion's unconditional embedding (the
    unconditional rows of the guided batch come first)."""

    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        outputs = dict(user_callback(pipe, i, t, kwargs) or {}) if user_callback is not None else {}
        if i + 1 < inversion.steps:
            embeds = outputs.get("prompt_embeds", kwargs["prompt_embeds"]).clone()
            half = embeds.shape[0] // 2
            embeds[:half] = inversion.null_embeds[i + 1].to(embeds)
            outputs["prompt_embeds"] = embeds
        return outputs

    return callback


