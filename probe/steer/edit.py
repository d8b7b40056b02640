"""Tuning-free editing by attention injection (Free-Prompt-Editing, CVPR'24) and its baselines.

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
- Real images: :func:`probe.steer.inversion.invert` inverts the image (DDIM, null-text or flow-matching);
  :func:`edit` then starts both rows from the inverted noise and pins the source row to the
  inversion's trajectory after every step through the pipeline's own ``callback_on_step_end``.
- Every family the tap knows: UNets (their self-attention layers coarser than the latent by default) and
  the diffusion transformers SD3 and FLUX, where ``self`` is the image→image block of the joint softmax
  and every block works at one grid (so the default is every block).

:func:`study` sweeps injection kind, injected fraction of steps and layer set on the built-in
shapes world and scores each edit with the exact judge.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from probe import checks
from probe.checks import step_count, text_to_image
from probe.images import to_uint8
from probe.models import generation, load
from probe.prompts import text_layout
from probe.steer.inversion import Inversion, image_size, inversion_guidance, invert, null_text_callback
from probe.steer.pipelines import initial_noise, noise_sigma, pipeline_latents
from probe.tap import Call, Consumer, Layer, Tap, attention_layers, denoiser, family_of, latent_size, select_layers
from probe.tap.layers import refuse_unmapped

INJECTS = ("self", "cross", "none")
DEFAULT_FRACTION = 0.8  # FPE injects during the first 80 % of the steps
DEFAULT_STEPS = 50  # denoising steps of an edit
CROSS_TOKENS = ("all", "shared")


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
        rows = call.conditional_rows(probs.shape[0])
        n_cond = rows.stop - rows.start
        if n_cond % 2:
            return None  # not a [source…, target…] batch (e.g. a guidance pass on a subset)
        half = n_cond // 2
        source, target = slice(rows.start, rows.start + half), slice(rows.start + half, rows.stop)
        out = probs.clone()
        if self.key_mask is None:
            out[target] = probs[source]
        else:
            mask = self.key_mask.to(probs.device)
            out[target] = torch.where(mask, probs[source], probs[target])
        self.replaced += 1
        return out


# -- validation ---------------------------------------------------------------------------------------


_INDEX_TYPES = (range, list, tuple, set, frozenset, np.ndarray, torch.Tensor)


def injected_steps(inject_steps, steps: int) -> list[int]:
    """Step indices from a fraction of the ``steps`` denoising steps from the start (0.8 → first 80 %) or explicit
    indices (whole numbers in 0 … steps − 1; an empty list injects nothing)."""
    if isinstance(inject_steps, (np.ndarray, torch.Tensor)) and inject_steps.ndim == 0:
        inject_steps = inject_steps.item()
    if isinstance(inject_steps, _INDEX_TYPES):
        return checks.step_indices(inject_steps, steps, "inject_steps", allow_empty=True)
    fraction = checks.finite_number(inject_steps, "inject_steps", "a fraction of the steps from the start (0.8 = "
                                    "the first 80 %) or a list of step indices")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"inject_steps={inject_steps!r}: a fraction of the steps must lie in [0, 1] (0.8 = the first 80 %); "
            "give a range or list for explicit step indices"
        )
    return list(range(round(fraction * steps)))


def _edit_steps(steps, inject_steps, num_inference_steps,
                default: int | None = DEFAULT_STEPS) -> tuple[int | None, object]:
    """(number of denoising steps, ``default`` where none is given; injected steps) from edit's keywords. During one
    release the old names still work with a DeprecationWarning: ``num_inference_steps=`` was the number of steps,
    and ``steps=`` the injected part (a fraction in [0, 1] or a list of indices; any ``steps=`` given beside
    ``num_inference_steps=``)."""
    old_meaning = steps is not None and (
        num_inference_steps is not None or isinstance(steps, _INDEX_TYPES)
        or (isinstance(steps, (float, np.floating)) and 0.0 <= steps <= 1.0))
    if old_meaning:
        if inject_steps is not None:
            raise TypeError(f"edit got steps={steps!r} in its old meaning (the injected steps) and inject_steps="
                            f"{inject_steps!r}: give the injected steps as inject_steps= and the number of denoising "
                            "steps as steps=")
        warnings.warn(f"edit(steps={steps!r}) for the injected steps is now edit(inject_steps={steps!r}); steps= is "
                      "the number of denoising steps, as in record and generate", DeprecationWarning, stacklevel=3)
        inject_steps, steps = steps, None
    if num_inference_steps is not None:
        if steps is not None:
            raise TypeError("edit got both steps= and num_inference_steps=; give the number of denoising steps as "
                            "steps= only")
        warnings.warn(f"edit(num_inference_steps={num_inference_steps!r}) is now edit(steps={num_inference_steps!r}), "
                      "as in record and generate", DeprecationWarning, stacklevel=3)
        count = step_count(num_inference_steps, "num_inference_steps")
    else:
        count = default if steps is None else step_count(steps)
    return count, DEFAULT_FRACTION if inject_steps is None else inject_steps


def injected_layers(pipe, inject: str, layers=None, height: int | None = None, width: int | None = None) -> list[Layer]:
    """The layers an injection of this kind touches.

    Default: self-attention layers coarser than the latent (FPE's rule: Stable Diffusion's 32² and below of a 64²
    latent), or every cross-attention layer
    (prompt-to-prompt). ``layers`` takes names, globs, ``re:`` patterns or resolutions, as
    :func:`probe.models.select_layers`, or :class:`~probe.models.Layer` objects.
    """
    if inject == "none":
        return []
    refuse_unmapped(pipe, (inject,), f"edit with another inject= than {inject!r}")
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


def cross_key_mask(pipe, source_prompt: str, target_prompt: str, cross_tokens: str,
                   max_sequence_length: int | None = None) -> torch.Tensor | None:
    """Check that the prompts align token by token; for ``shared``, the text keys of the denoiser (every one, as
    :func:`probe.prompts.text_layout` lays them out: CLIP's and T5's on SD3, a chat template's on Qwen-Image) whose
    tokens are equal."""
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
    source, target = (text_layout(pipe, p, keep_padding=True, max_sequence_length=max_sequence_length).texts
                      for p in (source_prompt, target_prompt))
    return torch.tensor([a == b for a, b in zip(source, target)])


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


def _checked(pipe, source_prompt, target_prompt, seed, inject: str, cross_tokens: str, image, guidance_scale,
             pipeline_kwargs: dict) -> float:
    """Refuse what :func:`edit` cannot do before anything runs; the guidance scale, checked."""
    guidance_scale = checks.cfg_scale(guidance_scale)
    for name, text in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        checks.prompt_fits(pipe, checks.prompt_text(text, name))
    if seed is not None:
        checks.seed_value(seed)
    for side in ("height", "width"):
        checks.image_side(pipeline_kwargs.get(side), side)
    checks.sequence_length(pipeline_kwargs.get("max_sequence_length"))
    if inject not in INJECTS:
        raise ValueError(f"inject must be one of {INJECTS}, got {inject!r}")
    if cross_tokens not in CROSS_TOKENS:
        raise ValueError(f"cross_tokens must be one of {CROSS_TOKENS}, got {cross_tokens!r}")
    if pipeline_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("edit makes one source and one target image; num_images_per_prompt must be 1")
    if image is None and seed is None:
        raise ValueError("give seed= (generated source) or image= (real source)")
    return guidance_scale


def _real_source(pipe, image, source_prompt: str, steps: int, guidance_scale: float, pipeline_kwargs: dict,
                 callback):
    """For a real source image: the start latent (its inverted noise) and the step callback that pins the source row
    to its inversion (and, after null-text inversion, swaps in its per-step unconditional embeddings)."""
    height, width, net = pipeline_kwargs.get("height"), pipeline_kwargs.get("width"), denoiser(pipe)
    embedded = family_of(net).embeds_guidance(net)  # guidance an input of the denoiser, not CFG
    if isinstance(image, Inversion):
        inversion = image
    else:  # consistent with the edit's guidance: null-text inversion where CFG is on (SD 1.x/2.x)
        scale = inversion_guidance(pipe, guidance_scale)
        if scale != guidance_scale:
            warnings.warn(f"{type(pipe).__name__}: the real image is inverted without classifier-free guidance "
                          f"(no null-text inversion there); edit at guidance_scale={scale:g} for a faithful source",
                          RuntimeWarning, stacklevel=3)  # the caller of edit
        inversion = invert(pipe, image, source_prompt, steps, height=height, width=width,
                           guidance_scale=scale)
    if inversion.steps != steps:
        raise ValueError(f"the inversion has {inversion.steps} steps, the edit {steps}")
    if (inversion.null_embeds is not None or embedded) and inversion.guidance_scale != guidance_scale:
        raise ValueError(f"the inversion was made for guidance_scale={inversion.guidance_scale}, the "
                         f"edit runs at {guidance_scale}: invert again at the edit's scale")
    start = inversion.noise[None] / noise_sigma(pipe)
    callback = _pin_source(inversion, 1, callback)
    needed = ["latents"]
    if inversion.null_embeds is not None and guidance_scale > 1:
        pipeline_kwargs["negative_prompt_embeds"] = inversion.null_embeds[:1].expand(2, -1, -1).clone()
        callback = null_text_callback(inversion, callback)
        needed.append("prompt_embeds")
    inputs = list(pipeline_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"]))
    pipeline_kwargs["callback_on_step_end_tensor_inputs"] = [*inputs, *(n for n in needed if n not in inputs)]
    return start, callback


def edit(
    pipe,
    source_prompt: str,
    target_prompt: str,
    *,
    seed: int | None = None,
    inject: str = "self",
    layers=None,
    inject_steps=None,
    image=None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    cross_tokens: str = "all",
    before: Sequence[Consumer] = (),
    after: Sequence[Consumer] = (),
    num_inference_steps: int | None = None,
    **pipeline_kwargs,
) -> EditResult:
    """Edit the source into the target by attention injection; source and target run as one batch.

    ``inject``: ``"self"`` (FPE: the target's self-attention is the source's), ``"cross"``
    (prompt-to-prompt word swap: the target's cross-attention is the source's, token-aligned; the
    prompts must have equal token lengths; ``cross_tokens="shared"`` replaces only the key columns
    whose tokens both prompts share and keeps the target's own columns for the swapped words, as
    prompt-to-prompt's refinement does) or ``"none"``. ``layers``: see :func:`injected_layers`.
    ``steps``, ``guidance_scale``: None runs the model's own (:func:`probe.models.generation`), as in record and
    generate. ``inject_steps``: the
    injected steps, a fraction of the steps from the start (default 0.8) or explicit step indices. ``image``: a
    real image (PIL / numpy at the pipeline's size, or an image file's path) or an :class:`Inversion` of one; the
    source row then follows its inversion and both rows start from its noise. ``before`` / ``after``: extra tap
    consumers that run before / after the injector. Other keywords go to the pipeline call; one it does not take is
    refused. Deprecated: ``num_inference_steps=`` (now ``steps=``) and ``steps=`` as a fraction or list of indices
    (now ``inject_steps=``) still work with a DeprecationWarning.
    """
    pipe = load(pipe)
    text_to_image(pipe)
    steps, inject_steps = _edit_steps(steps, inject_steps, num_inference_steps, default=None)
    run = generation(pipe, steps, guidance_scale, caller="edit")
    steps = run.steps
    checks.pipeline_keywords(pipe, pipeline_kwargs, "edit", {
        key: "one batch [source, target] from one start latent" for key in ("latents", "prompt", "prompt_embeds")},
        own=edit)
    guidance_scale = _checked(pipe, source_prompt, target_prompt, seed, inject, cross_tokens, image,
                              run.guidance_scale, pipeline_kwargs)
    seed = None if seed is None else checks.seed_value(seed)
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    step_indices = injected_steps(inject_steps, steps)
    chosen = injected_layers(pipe, inject, layers, height, width)
    key_mask = (cross_key_mask(pipe, source_prompt, target_prompt, cross_tokens,
                               pipeline_kwargs.get("max_sequence_length")) if inject == "cross" else None)

    device = pipe._execution_device
    callback = pipeline_kwargs.pop("callback_on_step_end", None)
    if image is None:
        start = initial_noise(pipe, torch.Generator(device).manual_seed(int(seed)), height, width)
    else:
        start, callback = _real_source(pipe, image, source_prompt, steps, guidance_scale, pipeline_kwargs, callback)
    if callback is not None:
        pipeline_kwargs["callback_on_step_end"] = callback

    injector = Injector(chosen, step_indices if chosen else [], key_mask)
    with Tap(pipe, [*before, injector, *after], height=height, width=width):
        images = pipe(
            prompt=[source_prompt, target_prompt],
            latents=pipeline_latents(pipe, start.expand(2, *start.shape[1:]).clone(), height, width),
            **run.pipeline_kwargs(),  # the pipeline's own keyword for the scale (Qwen-Image: true_cfg_scale)
            **pipeline_kwargs,
        ).images
    settings = EditSettings(
        source_prompt, target_prompt, None if image is not None else int(seed), inject,
        tuple(la.name for la in chosen), tuple(step_indices) if chosen else (), steps,
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
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = 7.5,
    edits: Sequence[tuple[str, str, str]] = EDITS,
    origins: Sequence[str] = ORIGINS,
    injects: Sequence[str] = INJECTS,
    progress: bool = False,
    num_inference_steps: int | None = None, seed_offset: int = 0,
):
    """FPE's claim on the shapes world: one row per (seed, edit, origin, inject, fraction, layer set).

    ``edits``: (name, source prompt, target prompt); defaults to a colour edit and a shape edit of
    a red circle. ``origins``: ``generated`` (source drawn from the seed) and ``rendered`` (a
    rendered scene at the pipeline's size, inverted with DDIM). ``layer_sets``: name → None (all
    layers of the injected kind), a function of that kind's layers, or patterns for
    :func:`probe.models.select_layers`; the default (:data:`LAYER_SETS`) is relative to the model's
    grids. A set that selects nothing on this model is skipped with a warning; sets that select the
    same layers are computed once. ``inject="none"`` gives one row per (seed, edit, origin), with
    fraction NaN and layer set "none". Scores: :func:`compare`. ``steps``: denoising steps per edit
    (``num_inference_steps=`` is its deprecated name). Seeds: ``seed_offset`` … ``seed_offset + n_seeds − 1``.
    """
    import pandas as pd

    pipe = load(pipe)
    if num_inference_steps is not None:
        warnings.warn(f"study(num_inference_steps={num_inference_steps!r}) is now study(steps="
                      f"{num_inference_steps!r}), as in edit, record and generate", DeprecationWarning, stacklevel=2)
        steps = num_inference_steps
    steps = step_count(steps)
    guidance_scale = checks.cfg_scale(guidance_scale)
    bad = set(origins) - set(ORIGINS)
    if bad:
        raise ValueError(f"unknown origins {sorted(bad)}; expected some of {ORIGINS}")
    for fraction in steps_fractions:
        injected_steps(fraction, steps)
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
    size = image_size(pipe, None, None)[0]
    rows = []
    jobs = list(itertools.product(range(seed_offset, seed_offset + n_seeds), enumerate(edits), origins))
    bar = tqdm(total=len(jobs) * len(configs), desc="edit study", disable=not progress)
    for seed, (index, (edit_name, source_prompt, target_prompt)), origin in jobs:
        image, scale = None, guidance_scale
        if origin == "rendered":  # edited at the guidance its inversion is consistent with (null-text where it can)
            scale = inversion_guidance(pipe, guidance_scale)
            image = invert(pipe, _rendered(source_prompt, seed, index, size), source_prompt, steps,
                           guidance_scale=scale)
        done: dict[tuple, dict] = {}
        for inject, fraction, set_name, names in configs:
            key = (inject, tuple(injected_steps(fraction, steps)) if names else (), names)
            if key not in done:
                result = edit(pipe, source_prompt, target_prompt, seed=seed, inject=inject, layers=list(names) or None,
                              inject_steps=0.0 if math.isnan(fraction) else fraction, image=image,
                              steps=steps, guidance_scale=scale, output_type="np")
                done[key] = compare(to_uint8(result.source), to_uint8(result.edited), source_prompt, target_prompt)
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
