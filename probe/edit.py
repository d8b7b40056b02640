"""Tuning-free editing by attention injection (Free-Prompt-Editing, CVPR'24), its baselines, DDIM inversion.

FPE's claim: self-attention carries *where/shape*, cross-attention carries *what*. So replacing
only the target's self-attention probabilities with the source's keeps the source's layout and
shape while the attribute follows the target prompt; replacing cross-attention instead
(prompt-to-prompt's word swap) leaks the source's attribute. This module tests that claim.

How it runs, without a copied denoising loop:

- Source and target are ONE batch (prompts ``[source, target]``), both rows started from the same
  initial latent. With classifier-free guidance the denoiser's batch is
  ``[uncond_src, uncond_tgt, cond_src, cond_tgt]``.
- An :class:`Injector` (a consumer of :class:`probe.tap.Tap`) copies the source's attention
  probabilities onto the target's rows of the conditional half, in the chosen layers and steps.
  Other consumers can run in the same tap before or after it (``edit(before=…, after=…)``), so a
  recorder or a test sees the probabilities before or after injection.
- Real images: :func:`invert` runs deterministic DDIM inversion; :func:`edit` then starts both rows
  from the inverted noise and pins the source row to the inversion's trajectory after every step
  through the pipeline's own ``callback_on_step_end``.

:func:`study` sweeps injection kind, injected fraction of steps and layer set on the built-in
shapes world and scores each edit with the exact judge.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from probe.checks import step_count, text_to_image
from probe.models import Layer, attention_layers, denoiser, latent_size, load, select_layers
from probe.tap import Call, Consumer, Tap

INJECTS = ("self", "cross", "none")
DEFAULT_FRACTION = 0.8  # FPE injects during the first 80 % of the steps
CROSS_TOKENS = ("all", "shared")
PIXEL_MAX = 255.0  # PSNR on 8-bit images


# -- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditSettings:
    """What an edit did, resolved: the exact layers and step indices that were injected."""

    source_prompt: str
    target_prompt: str
    seed: int | None  # None for a real image (the start is the inverted noise)
    inject: str
    layers: tuple[str, ...]
    steps: tuple[int, ...]
    num_inference_steps: int
    guidance_scale: float
    real_image: bool
    cross_tokens: str = "all"


@dataclass
class EditResult:
    """Source and edited image (whatever ``output_type`` asked for: PIL, numpy or latent) and the settings."""

    source: object
    edited: object
    settings: EditSettings


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


# -- the injector -------------------------------------------------------------------------------------


class Injector(Consumer):
    """Replaces the target's attention probabilities by the source's, in chosen layers and steps.

    The conditional half of the batch holds the source rows first, then the target rows (as many
    of each). Only the target rows change; the tensor is copied, never changed in place, so a
    consumer that ran before the injector keeps the original. ``key_mask`` (cross-attention,
    ``cross_tokens="shared"``) limits the replacement to the key columns where it is True.
    ``replaced`` counts the calls it changed.
    """

    replaces = True

    def __init__(self, layers: Sequence[Layer], steps: Sequence[int], key_mask: torch.Tensor | None = None):
        self.layers, self.steps = frozenset(layer.key for layer in layers), frozenset(steps)
        self.key_mask = key_mask
        self.replaced = 0

    def wants(self, call: Call) -> bool:
        return call.pass_ in ("cfg", "cond") and call.layer.key in self.layers and call.step in self.steps

    def on_probs(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None:
        start = probs.shape[0] // 2 if call.cfg else 0
        n_cond = probs.shape[0] - start
        if n_cond % 2:
            return None  # not a [source…, target…] batch (e.g. a guidance pass on a subset)
        half = n_cond // 2
        source, target = slice(start, start + half), slice(start + half, probs.shape[0])
        out = probs.clone()
        if self.key_mask is None:
            out[target] = probs[source]
        else:
            mask = self.key_mask.to(probs.device)
            out[target] = torch.where(mask, probs[source], probs[target])
        self.replaced += 1
        return out


# -- validation ---------------------------------------------------------------------------------------


def injected_steps(steps, num_inference_steps: int) -> list[int]:
    """Step indices from a fraction of the steps from the start (0.8 → first 80 %) or explicit indices."""
    if isinstance(steps, (np.ndarray, torch.Tensor)) and steps.ndim == 0:
        steps = steps.item()
    if isinstance(steps, (range, list, tuple, set, frozenset, np.ndarray, torch.Tensor)):
        indices = sorted({int(s) for s in (steps.tolist() if hasattr(steps, "tolist") else steps)})
        bad = [s for s in indices if not 0 <= s < num_inference_steps]
        if bad:
            raise ValueError(f"step indices {bad} lie outside 0 … {num_inference_steps - 1}")
        return indices
    fraction = float(steps)
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(
            f"steps={steps!r}: a fraction of the steps must lie in [0, 1] (0.8 = the first 80 %); "
            "give a range or list for explicit step indices"
        )
    return list(range(round(fraction * num_inference_steps)))


def injected_layers(pipe, inject: str, layers=None, height: int | None = None, width: int | None = None) -> list[Layer]:
    """The layers an injection of this kind touches.

    Default: self-attention layers coarser than the latent (FPE's rule: Stable Diffusion's 32² and below of a 64²
    latent), or every cross-attention layer
    (prompt-to-prompt). ``layers`` takes names, globs, ``re:`` patterns or resolutions, as
    :func:`probe.models.select_layers`, or :class:`~probe.models.Layer` objects.
    """
    if inject == "none":
        return []
    every = attention_layers(pipe, height, width)
    if layers is None:
        chosen = select_layers(every, None, kinds=(inject,))
        return _coarser_than_latent(chosen, latent_size(pipe, height, width)) if inject == "self" else chosen
    if isinstance(layers, Layer):
        layers = [layers]
    if isinstance(layers, (list, tuple)):
        layers = [la.name if isinstance(la, Layer) else la for la in layers]
    return select_layers(every, layers, kinds=(inject,))


def _token_ids(pipe, prompt: str) -> dict[str, list[int]]:
    ids = {}
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            ids[name] = tok(prompt, truncation=False).input_ids
    return ids


def _cross_key_mask(pipe, source_prompt: str, target_prompt: str, cross_tokens: str) -> torch.Tensor | None:
    """Check that the prompts align token by token; for ``shared``, the key columns with equal tokens."""
    source, target = _token_ids(pipe, source_prompt), _token_ids(pipe, target_prompt)
    for name in source:
        if len(source[name]) != len(target[name]):
            raise ValueError(
                f"cross-attention replacement aligns the prompts token by token, but {source_prompt!r} has "
                f"{len(source[name])} tokens and {target_prompt!r} has {len(target[name])} ({name}). "
                "Swap words for words of the same token length, or use inject='self'."
            )
    if cross_tokens == "all":
        return None
    tok = pipe.tokenizer
    padded = [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
              for p in (source_prompt, target_prompt)]
    return torch.tensor(padded[0]) == torch.tensor(padded[1])


def _image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    lh, lw = latent_size(pipe, height, width)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return lh * scale, lw * scale


def _as_pixels(image) -> np.ndarray:
    """H×W×3 float32 in 0–1 from a PIL image or a numpy array (uint8, or float in 0–1)."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 image (PIL or numpy), got shape {array.shape}")
    array = array[..., :3]
    return array.astype(np.float32) / PIXEL_MAX if np.issubdtype(array.dtype, np.integer) else array.astype(np.float32)


def _check_size(image: np.ndarray, size: tuple[int, int]) -> None:
    if tuple(image.shape[:2]) != size:
        raise ValueError(
            f"the image is {image.shape[0]}×{image.shape[1]} px but the pipeline works at {size[0]}×{size[1]} px; "
            "resize the image or pass height=/width= that match it"
        )


# -- DDIM inversion -----------------------------------------------------------------------------------

NULL_TEXT_STEPS = 10  # Adam iterations per denoising step (Mokady et al.'s N)
NULL_TEXT_LR = 1e-2


def _text_conditioning(pipe, prompt: str, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Conditional text embeddings (no CFG) and the extra denoiser kwargs (SDXL's added conditions)."""
    device = pipe._execution_device
    if hasattr(pipe, "text_encoder_2"):  # SDXL: two encoders, pooled embeddings and size conditions
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    if not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"invert supports Stable Diffusion (1.x/2.x, XL) pipelines, not {type(pipe).__name__}")
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return embeds, {}


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
    """The image's VAE latent (latent_dist.mean × scaling_factor), shape (channels, h, w)."""
    pixels = _as_pixels(image)
    _check_size(pixels, _image_size(pipe, height, width))
    vae = pipe.vae
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(pipe._execution_device, vae.dtype) * 2 - 1
    return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor)[0]


@torch.no_grad()
def decode(pipe, latent: torch.Tensor) -> np.ndarray:
    """A latent (channels, h, w) as a uint8 H×W×3 image, as the pipeline decodes."""
    x = pipe.vae.decode(latent[None].to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return _to_uint8(pipe.image_processor.postprocess(x, output_type="np")[0])


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


def invert(pipe, image, prompt: str = "", steps: int = 50, *, height: int | None = None,
           width: int | None = None, guidance_scale: float = 1.0, null_text_steps: int = NULL_TEXT_STEPS,
           null_text_lr: float = NULL_TEXT_LR) -> Inversion:
    """DDIM inversion of a real image (:func:`ddim_invert`); with ``guidance_scale`` > 1 also null-text inversion
    (Mokady et al.), as Free-Prompt-Editing's code offers: per step, the unconditional embedding is optimised so
    that classifier-free guidance at that scale walks the inverted trajectory, so an edit at the same scale starts
    from a source it reconstructs."""
    inversion = ddim_invert(pipe, image, prompt, steps, height=height, width=width)
    if guidance_scale <= 1:
        return inversion
    return null_text_inversion(pipe, inversion, guidance_scale, null_text_steps, null_text_lr,
                               _image_size(pipe, height, width))


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
    size = _image_size(pipe, height, width)
    latent = encode(pipe, image, *size)[None]
    device = latent.device
    embeds, extra = _text_conditioning(pipe, prompt, size)
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
    size = size or _image_size(pipe, None, None)
    scheduler, net = pipe.scheduler, denoiser(pipe)
    scheduler.set_timesteps(inversion.steps, device=inversion.latents.device)
    timesteps, alphas = _ddim_alphas(scheduler)
    with torch.no_grad():
        cond, _ = _text_conditioning(pipe, inversion.prompt, size)
        null = _text_conditioning(pipe, "", size)[0]
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
    noise = inversion.noise[None] / pipe.scheduler.init_noise_sigma
    if inversion.null_embeds is not None and scale > 1:
        pipeline_kwargs.update(negative_prompt_embeds=inversion.null_embeds[:1].clone(),
                               callback_on_step_end=_null_text(inversion, None),
                               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
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
    return psnr(_to_uint8(pixels), _to_uint8(regenerated))


def _to_uint8(image) -> np.ndarray:
    """As diffusers' ``numpy_to_pil``: round(x·255) for floats in 0–1; PIL and uint8 pass through."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.uint8)
    return (array * PIXEL_MAX).round().clip(0, PIXEL_MAX).astype(np.uint8)


# -- editing ------------------------------------------------------------------------------------------


def _pin_source(inversion: Inversion, rows: int, user_callback: Callable | None) -> Callable:
    """A ``callback_on_step_end`` that sets the source rows to the inversion's latent for the next step."""

    def callback(pipe, i: int, t, kwargs: dict) -> dict:
        outputs = dict(user_callback(pipe, i, t, kwargs) or {}) if user_callback is not None else {}
        latents = outputs.get("latents", kwargs["latents"]).clone()
        latents[:rows] = inversion.latents[i + 1].to(latents)
        outputs["latents"] = latents
        return outputs

    return callback


def _null_text(inversion: Inversion, user_callback: Callable | None) -> Callable:
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


def edit(
    pipe,
    source_prompt: str,
    target_prompt: str,
    *,
    seed: int | None = None,
    inject: str = "self",
    layers=None,
    steps=DEFAULT_FRACTION,
    image=None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    cross_tokens: str = "all",
    before: Sequence[Consumer] = (),
    after: Sequence[Consumer] = (),
    **pipeline_kwargs,
) -> EditResult:
    """Edit the source into the target by attention injection; source and target run as one batch.

    ``inject``: ``"self"`` (FPE: the target's self-attention is the source's), ``"cross"``
    (prompt-to-prompt word swap: the target's cross-attention is the source's, token-aligned; the
    prompts must have equal token lengths; ``cross_tokens="shared"`` replaces only the key columns
    whose tokens both prompts share and keeps the target's own columns for the swapped words, as
    prompt-to-prompt's refinement does) or ``"none"``. ``layers``: see :func:`injected_layers`.
    ``steps``: a fraction of the steps from the start, or explicit step indices. ``image``: a real
    image (PIL / numpy at the pipeline's size) or an :class:`Inversion` of one; the source row then
    follows its inversion and both rows start from its noise. ``before`` / ``after``: extra tap
    consumers that run before / after the injector. Other keywords go to the pipeline call.
    """
    pipe = load(pipe)
    text_to_image(pipe)
    num_inference_steps = step_count(num_inference_steps, "num_inference_steps")
    if inject not in INJECTS:
        raise ValueError(f"inject must be one of {INJECTS}, got {inject!r}")
    if cross_tokens not in CROSS_TOKENS:
        raise ValueError(f"cross_tokens must be one of {CROSS_TOKENS}, got {cross_tokens!r}")
    for key in ("latents", "prompt", "prompt_embeds"):
        if key in pipeline_kwargs:
            raise ValueError(f"edit sets {key!r} itself (one batch [source, target] from one start latent)")
    if pipeline_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("edit makes one source and one target image; num_images_per_prompt must be 1")
    if image is None and seed is None:
        raise ValueError("give seed= (generated source) or image= (real source)")
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    step_indices = injected_steps(steps, num_inference_steps)
    chosen = injected_layers(pipe, inject, layers, height, width)
    key_mask = _cross_key_mask(pipe, source_prompt, target_prompt, cross_tokens) if inject == "cross" else None

    device, net = pipe._execution_device, denoiser(pipe)
    callback = pipeline_kwargs.pop("callback_on_step_end", None)
    if image is None:
        lh, lw = latent_size(pipe, height, width)
        generator = torch.Generator(device).manual_seed(int(seed))
        dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None else net.dtype
        start = randn_tensor((1, net.config.in_channels, lh, lw), generator=generator, device=device, dtype=dtype)
    else:
        if isinstance(image, Inversion):
            inversion = image
        else:  # consistent with the edit's guidance: null-text inversion where CFG is on (SD 1.x/2.x)
            scale = guidance_scale if not hasattr(pipe, "text_encoder_2") else 1.0
            if scale != guidance_scale:
                warnings.warn("SDXL: the real image is inverted without guidance (no null-text inversion there); "
                              "edit at guidance_scale=1 for a faithful source", RuntimeWarning, stacklevel=2)
            inversion = invert(pipe, image, source_prompt, num_inference_steps, height=height, width=width,
                               guidance_scale=scale)
        if inversion.steps != num_inference_steps:
            raise ValueError(f"the inversion has {inversion.steps} steps, the edit {num_inference_steps}")
        if inversion.null_embeds is not None and inversion.guidance_scale != guidance_scale:
            raise ValueError(f"the null-text inversion was made for guidance_scale={inversion.guidance_scale}, the "
                             f"edit runs at {guidance_scale}: invert again at the edit's scale")
        start = inversion.noise[None] / pipe.scheduler.init_noise_sigma
        callback = _pin_source(inversion, 1, callback)
        needed = ["latents"]
        if inversion.null_embeds is not None and guidance_scale > 1:
            pipeline_kwargs["negative_prompt_embeds"] = inversion.null_embeds[:1].expand(2, -1, -1).clone()
            callback = _null_text(inversion, callback)
            needed.append("prompt_embeds")
        inputs = list(pipeline_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"]))
        pipeline_kwargs["callback_on_step_end_tensor_inputs"] = [*inputs, *(n for n in needed if n not in inputs)]
    if callback is not None:
        pipeline_kwargs["callback_on_step_end"] = callback

    injector = Injector(chosen, step_indices if chosen else [], key_mask)
    with Tap(pipe, [*before, injector, *after], height=height, width=width):
        images = pipe(
            prompt=[source_prompt, target_prompt],
            latents=start.expand(2, *start.shape[1:]).clone(),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            **pipeline_kwargs,
        ).images
    settings = EditSettings(
        source_prompt, target_prompt, None if image is not None else int(seed), inject,
        tuple(la.name for la in chosen), tuple(step_indices) if chosen else (), num_inference_steps,
        float(guidance_scale), image is not None, cross_tokens,
    )
    return EditResult(images[0], images[1], settings)


# -- scoring and the study ----------------------------------------------------------------------------

EDITS: tuple[tuple[str, str, str], ...] = (
    ("colour", "a red circle", "a blue circle"),
    ("shape", "a red circle", "a red square"),
)
ORIGINS = ("generated", "rendered")
STEPS_FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
RENDER_SEED_STREAM = 7  # scenes of rendered sources: np.random.default_rng([RENDER_SEED_STREAM, seed, edit index])
COLUMNS = (
    "edit", "origin", "seed", "source_prompt", "target_prompt", "inject", "fraction", "layer_set", "n_layers",
    "success", "source_present", "iou", "displacement", "leaked",
)


def _all(layers: list[Layer], latent: tuple[int, int]) -> list[Layer]:
    return layers


def _coarser_than_latent(layers: list[Layer], latent: tuple[int, int]) -> list[Layer]:
    return [la for la in layers if la.grid[0] * la.grid[1] < latent[0] * latent[1]]


def _finest(layers: list[Layer], latent: tuple[int, int]) -> list[Layer]:
    most = max((la.grid[0] * la.grid[1] for la in layers), default=0)
    return [la for la in layers if la.grid[0] * la.grid[1] == most]


# Layer sets relative to the model's own grids and latent (each ``(layers, latent) → layers``), so that each selects
# what it means on every model: FPE's set is "coarser than the latent", Stable Diffusion's ≤ 32² of a 64² latent,
# the built-in model's 8² and 4² of a 16² latent (a fixed "≤ 32²" would be every layer there).
FPE_LAYERS = "coarser than latent"
LAYER_SETS: dict[str, Callable[[list[Layer], tuple[int, int]], list[Layer]]] = {
    "all": _all,
    FPE_LAYERS: _coarser_than_latent,
    "finest grid only": _finest,
}


def _main_object(image, prompt: str):
    """The detection behind the prompt's first subject (if the judge found one), else the largest object."""
    from probe.shapes.judge import detect, judge

    found = detect(image)
    status = judge(image, prompt, detections=found)[0]
    if status.detection is not None:
        return status.detection, status.status
    return (max(found, key=lambda d: d.area) if found else None), status.status


def compare(source, edited, source_prompt: str, target_prompt: str) -> dict:
    """Score one edit with the shapes judge (first subject of each prompt).

    ``success``: every target subject present in the edited image; ``source_present``: the source
    image holds its own prompt (else the row says little); ``iou``: mask IoU of the object in
    source and edited image (structure kept); ``displacement``: distance of their mask centres in
    pixels; ``leaked``: the edited object kept the source's value of the attribute that the edit
    changes (colour or shape) instead of taking the target's. NaN / None where an object is missing.
    """
    from probe.shapes.judge import judge, parse_prompt, summary

    (src_colour, src_shape), (tgt_colour, tgt_shape) = parse_prompt(source_prompt)[0], parse_prompt(target_prompt)[0]
    before, before_status = _main_object(source, source_prompt)
    after, _ = _main_object(edited, target_prompt)
    row = {
        "success": bool(summary(judge(edited, target_prompt))["all_present"]),
        "source_present": before_status == "present",
        "iou": math.nan, "displacement": math.nan, "leaked": None,
    }
    if after is not None:
        leaks = []
        if src_colour != tgt_colour:
            leaks.append(after.colour == src_colour)
        if src_shape != tgt_shape:
            leaks.append(after.shape == src_shape)
        row["leaked"] = any(leaks) if leaks else False
    if before is not None:
        if after is None:
            row["iou"] = 0.0
        else:
            row["iou"] = float((before.mask & after.mask).sum() / max(1, (before.mask | after.mask).sum()))
            centres = [np.argwhere(d.mask).mean(axis=0) for d in (before, after)]
            row["displacement"] = float(np.linalg.norm(centres[0] - centres[1]))
    return row


def _rendered(source_prompt: str, seed: int, index: int, size: int) -> np.ndarray:
    from probe.shapes.judge import parse_prompt
    from probe.shapes.world import render, sample_scene

    rng = np.random.default_rng([RENDER_SEED_STREAM, seed, index])
    return render(sample_scene(rng, parse_prompt(source_prompt)), size=size)[0]


def _resolve_sets(pipe, layer_sets: dict, kinds: Sequence[str]) -> dict[tuple[str, str], tuple]:
    """(inject kind, set name) → layer names; sets that select nothing are skipped with a warning."""
    every = attention_layers(pipe)
    latent = latent_size(pipe)
    resolved = {}
    for kind in kinds:
        of_kind = [la for la in every if la.kind == kind]
        for name, spec in layer_sets.items():
            try:
                if spec is None:
                    chosen = of_kind
                elif callable(spec):
                    chosen = list(spec(of_kind, latent))
                else:
                    chosen = select_layers(every, spec, kinds=(kind,))
            except ValueError as err:
                chosen, why = [], str(err)
            else:
                why = "it selects no layer"
            if not chosen:
                warnings.warn(f"layer set {name!r} skipped for {kind}-attention on this model: {why}", stacklevel=3)
                continue
            resolved[kind, name] = tuple(la.name for la in chosen)
    return resolved


def study(
    pipe,
    *,
    n_seeds: int,
    steps_fractions: Sequence[float] = STEPS_FRACTIONS,
    layer_sets: dict | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    edits: Sequence[tuple[str, str, str]] = EDITS,
    origins: Sequence[str] = ORIGINS,
    injects: Sequence[str] = INJECTS,
    progress: bool = False,
):
    """FPE's claim on the shapes world: one row per (seed, edit, origin, inject, fraction, layer set).

    ``edits``: (name, source prompt, target prompt); defaults to a colour edit and a shape edit of
    a red circle. ``origins``: ``generated`` (source drawn from the seed) and ``rendered`` (a
    rendered scene at the pipeline's size, inverted with DDIM). ``layer_sets``: name → None (all
    layers of the injected kind), a function of that kind's layers, or patterns for
    :func:`probe.models.select_layers`; the default (:data:`LAYER_SETS`) is relative to the model's
    grids. A set that selects nothing on this model is skipped with a warning; sets that select the
    same layers are computed once. ``inject="none"`` gives one row per (seed, edit, origin), with
    fraction NaN and layer set "none". Scores: :func:`compare`.
    """
    import pandas as pd

    pipe = load(pipe)
    bad = set(origins) - set(ORIGINS)
    if bad:
        raise ValueError(f"unknown origins {sorted(bad)}; expected some of {ORIGINS}")
    for fraction in steps_fractions:
        injected_steps(fraction, num_inference_steps)
    bad = set(injects) - set(INJECTS)
    if bad:
        raise ValueError(f"unknown injects {sorted(bad)}; expected some of {INJECTS}")
    kinds = [i for i in injects if i != "none"]
    sets = _resolve_sets(pipe, LAYER_SETS if layer_sets is None else layer_sets, kinds)
    configs = [("none", math.nan, "none", ())]
    for inject in kinds:
        for (kind, name), names in sets.items():
            if kind == inject:
                configs += [(inject, float(f), name, names) for f in steps_fractions]
    if "none" not in injects:
        configs = configs[1:]
    size = _image_size(pipe, None, None)[0]
    rows = []
    jobs = list(itertools.product(range(n_seeds), enumerate(edits), origins))
    bar = tqdm(total=len(jobs) * len(configs), desc="edit study", disable=not progress)
    for seed, (index, (edit_name, source_prompt, target_prompt)), origin in jobs:
        image = None
        if origin == "rendered":
            image = invert(pipe, _rendered(source_prompt, seed, index, size), source_prompt, num_inference_steps,
                           guidance_scale=guidance_scale)  # null-text: consistent with the edit's guidance
        done: dict[tuple, dict] = {}
        for inject, fraction, set_name, names in configs:
            key = (inject, tuple(injected_steps(fraction, num_inference_steps)) if names else (), names)
            if key not in done:
                result = edit(pipe, source_prompt, target_prompt, seed=seed, inject=inject, layers=list(names) or None,
                              steps=0.0 if math.isnan(fraction) else fraction, image=image,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              output_type="np")
                done[key] = compare(_to_uint8(result.source), _to_uint8(result.edited), source_prompt, target_prompt)
            rows.append({
                "edit": edit_name, "origin": origin, "seed": seed, "source_prompt": source_prompt,
                "target_prompt": target_prompt, "inject": inject, "fraction": fraction, "layer_set": set_name,
                "n_layers": len(names), **done[key],
            })
            bar.update()
    bar.close()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["leaked"] = frame["leaked"].astype("boolean")
    return frame
