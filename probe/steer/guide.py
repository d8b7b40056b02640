"""Attention guidance: move a pipeline's latent so that the subjects' attention maps satisfy an objective.

Guidance is a consumer of the tap plus the pipeline's own ``callback_on_step_end``. At the end of step i the callback
runs the denoiser once more on the conditional latent at step i+1 (``Tap.pass_("guidance", i+1)``), the tap hands
the cross- (and, if needed, self-) attention of the chosen layers to the consumer inside the autograd graph, and the
latent takes gradient steps on the objective before the pipeline denoises it. Step 0's update happens before the
pipeline call and enters as ``latents=``. No pipeline loop is copied, so guidance runs on every pipeline the tap
understands (Stable Diffusion 1.x/2.x and SDXL).

The default :class:`Schedule` is Attend-and-Excite's (Chefer et al., 2023): maps of the 16×16 layers averaged over
layers and heads, softmax(100·A) over the prompt's word tokens (start, end and padding excluded, as in the official
code), 3×3 Gaussian smoothing, one step α_i = 20·sqrt(linspace(1, 0.5, T)[i]) for the first half of the steps, and
iterative refinement at steps 0, 10 and 20 until the loss is at most 1 − {0.05, 0.5, 0.8} (at most 20 iterations).
``Schedule(tokens="diffusers")`` softmaxes over every slot but the first and last instead (padding included), and
then ``objective="ae"`` reproduces diffusers' ``StableDiffusionAttendAndExcitePipeline``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probe import checks
from probe.analysis.maps import AE_KERNEL_SIZE, AE_SIGMA, AE_TEMPERATURE
from probe.analysis.overlap import (
    ISOLATION_MARGIN,
)
from probe.analysis.subjects import diffusers_softmax_tokens, subject_maps
from probe.checks import finite_noise, step_count, text_to_image
from probe.consumers.maps import GUIDANCE_PASSES, MapCollector
from probe.models import MODEL_DEFAULTS_FILE, generation, load, model_defaults, model_folder
from probe.prompts import subject_keys
from probe.steer.objectives import (  # noqa: F401  (the objectives' names, here since 0.1)
    OBJECTIVES,
    GuidanceMaps,
    Objective,
    ObjectiveSpec,
    as_objective,
    response,
)
from probe.steer.pipelines import conditioned, initial_noise, noise_sigma, pipeline_latents, set_timesteps
from probe.tap import Consumer, Layer, Tap, denoiser, latent_size
from probe.tap.layers import refuse_unmapped

# -- settings --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Every number of a guided generation. Defaults: Attend-and-Excite as in diffusers (50 steps)."""

    resolution: int = 16  # maps from the cross-attention layers whose grid is closest to resolution²
    temperature: float = AE_TEMPERATURE  # softmax(temperature · A) over the prompt's tokens
    tokens: str = "words"  # which tokens that softmax covers: "words" (official A&E: no start, end or padding)
    # or "diffusers" (diffusers' pipeline: every slot but the first and the last, padding included)
    kernel_size: int = AE_KERNEL_SIZE  # Gaussian smoothing of each subject's map
    sigma: float = AE_SIGMA
    scale_factor: float = 20.0  # step size α_i = scale_factor · sqrt(linspace(*scale_range, T)[i])
    scale_range: tuple[float, float] = (1.0, 0.5)
    alter_fraction: float = 0.5  # one gradient step at every step i < alter_fraction · T (A&E: 25 of 50)
    thresholds: Mapping[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    """Refinement: at step i (an index, as in diffusers) refine while the loss exceeds 1 − thresholds[i]."""
    max_refinement: int = 20  # refinement iterations at most (diffusers' fixed cap)
    response_weight: float = 1.0  # λ of the response term in ``self_cross`` and ``ai_t2i``
    response_top_k: int = 1  # response = 1 − mean of the k largest map values (k = 1: A&E's max)
    aggregation_weight: float = 1.0  # ``ai_t2i``: weight of the aggregation loss
    isolation_weight: float = 1.0  # ``ai_t2i``: weight of the isolation loss
    isolation_margin: float = ISOLATION_MARGIN  # ``ai_t2i``: centre distance (fraction of the diagonal) to reach
    isolation_form: str = "distance"  # ``ai_t2i``: "distance" (centres apart) or "cosine" (maps' cosine similarity)

    def alter_steps(self, n_steps: int) -> int:
        """Number of leading steps that take a gradient step (rounded half up)."""
        return math.floor(self.alter_fraction * n_steps + 0.5)

    def step_sizes(self, n_steps: int) -> np.ndarray:
        return self.scale_factor * np.sqrt(np.linspace(*self.scale_range, n_steps))


@dataclass(frozen=True)
class InitNO:
    """INITNO-style initial-noise optimisation (Guo et al., 2024): z = μ + σ·ε with μ, log σ² optimised by Adam.

    Rounds of ``steps`` iterations each start from fresh noise until the objective at the first step is accepted;
    if none is, the best round's noise is optimised again for ``final_steps``. Accepted: below ``target`` when one is
    given (INITNO's absolute thresholds, set for Stable Diffusion's losses), else at most ``1 − relative`` times the
    objective at the seed's own noise, a criterion every objective can reach whatever its scale (A&E's loss on a
    model whose maps are spread never falls to 0.2). After every step the KL divergence of N(μ, σ²) from N(0, 1) is
    pushed back under ``kl_bound`` so the latent stays a plausible sample.
    """

    rounds: int = 5
    steps: int = 10
    final_steps: int = 50
    lr: float = 1e-2
    adam_eps: float = 1e-3
    target: float | None = None
    relative: float = 0.3
    kl_bound: float = 1e-3
    kl_max_iterations: int = 100  # KL-only Adam steps at most after each objective step


# -- the consumer -----------------------------------------------------------------------------------------------------


def _closest_grid(layers: list[Layer], resolution: int) -> tuple[int, int]:
    grids = {layer.grid for layer in layers if layer.kind == "cross"}
    if not grids:
        raise ValueError("this denoiser has no cross-attention layers to guide with")
    return min(grids, key=lambda g: (abs(math.log(g[0] * g[1] / resolution**2)), -g[0] * g[1]))


# -- the guide --------------------------------------------------------------------------------------------------------


class Guide:
    """Evaluates an objective on the pipeline's own attention at a latent and moves the latent downhill.

    A context manager (it installs the tap). :func:`generate` is the usual entry point; use a ``Guide`` directly to
    look at losses and maps at a latent of your own:

    >>> with Guide(pipe, "a cat and a dog", ["cat", "dog"], steps=50) as g:
    ...     loss, maps = g.evaluate(latents.requires_grad_(), step=0)
    """

    def __init__(self, pipe, prompt: str, subjects: Sequence[str], objective: ObjectiveSpec = "ae",
                 schedule: Schedule | None = None, *, steps: int = 50, height: int | None = None,
                 width: int | None = None, consumers: Sequence[Consumer] = (), max_sequence_length: int | None = None):
        self.pipe = load(pipe)
        text_to_image(self.pipe)
        steps = step_count(steps)
        height, width = checks.image_side(height, "height"), checks.image_side(width, "width")
        max_sequence_length = checks.sequence_length(max_sequence_length)
        self.prompt = checks.prompt_fits(self.pipe, checks.prompt_text(prompt))
        self.subjects = checks.subject_words(subjects)
        if not self.subjects:
            raise ValueError("give at least one subject word to guide")
        self.indices, words = subject_keys(self.pipe, prompt, self.subjects, max_sequence_length)
        self.objective = as_objective(objective)
        if self.objective.needs_self:
            refuse_unmapped(self.pipe, ("self",), f"the objective {self.objective.name!r} needs them: guide with an "
                            "objective of cross-attention alone")
        self.schedule = schedule or Schedule()
        if self.schedule.tokens not in ("words", "diffusers"):
            raise ValueError(f"Schedule.tokens must be 'words' or 'diffusers', not {self.schedule.tokens!r}")
        self.softmax_tokens = words if self.schedule.tokens == "words" else None  # None: diffusers' slots
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        lh, lw = latent_size(self.pipe, height, width)
        self.height, self.width = lh * scale, lw * scale
        self.tap = Tap(self.pipe, consumers, self.height, self.width)
        self.grid = _closest_grid(list(self.tap.layers.values()), self.schedule.resolution)
        kinds = ("cross", "self") if self.objective.needs_self else ("cross",)
        chosen = [layer for layer in self.tap.layers.values() if layer.grid == self.grid and layer.kind in kinds]
        self.collector = MapCollector(chosen, passes=GUIDANCE_PASSES, detach=False)
        self.tap.consumers.append(self.collector)
        self.timesteps = set_timesteps(self.pipe, steps, self.height, self.width)
        self.step_sizes = self.schedule.step_sizes(len(self.timesteps))
        self.labels = _labels(self.subjects)
        self.denoise = None
        self.max_sequence_length = max_sequence_length
        self._loss_checked = False

    def __enter__(self) -> Guide:
        self.denoise = conditioned(self.pipe, self.prompt, self.height, self.width, self.max_sequence_length)
        self.tap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.tap.__exit__(*exc)

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def evaluate(self, latents: torch.Tensor, step: int) -> tuple[torch.Tensor, GuidanceMaps]:
        """Loss (a scalar for one latent) and maps at ``latents`` (1, C, h, w) and step ``step``'s timestep."""
        if self.denoise is None:
            raise RuntimeError("a Guide evaluates inside its context: `with Guide(pipe, ...) as guide:`")
        self.collector.clear()
        with self.tap.pass_("guidance", step):
            self.denoise(latents, self.timesteps[step])
        found = self.collector.mean(step)
        self.collector.clear()
        maps = self._maps(found["cross"], found.get("self"))
        value = self.objective(maps)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"objective {self.objective.name!r} returned {type(value).__name__}, not a tensor: return "
                            "the (B,) losses as a torch tensor computed from the GuidanceMaps")
        loss = value.sum()
        self._check_first_loss(loss, latents)
        return loss, maps

    def _check_first_loss(self, loss: torch.Tensor, latents: torch.Tensor) -> None:
        """The objective's first loss must be finite and, where a gradient is asked for, depend on the latent: else
        guidance would skip every step and change nothing (a later non-finite step is skipped with a warning)."""
        if self._loss_checked:
            return
        name = self.objective.name
        if not torch.isfinite(loss):
            raise ValueError(f"objective {name!r} gave a loss of {loss.item()} at the first guided evaluation, so "
                             "guidance could never move the latent; check it on Guide.evaluate's maps (a division "
                             "by zero or the log of 0?) and return finite values")
        if latents.requires_grad and torch.is_grad_enabled():
            if not loss.requires_grad:
                raise ValueError(f"objective {name!r} returned a loss without a gradient with respect to the latent, "
                                 "so guidance cannot move it; compute it from the GuidanceMaps tensors with torch "
                                 "operations (no .item(), .detach(), numpy or torch.no_grad())")
            self._loss_checked = True

    def _maps(self, cross: torch.Tensor, self_attention: torch.Tensor | None) -> GuidanceMaps:
        s = self.schedule
        grid = cross.reshape(cross.shape[0], *self.grid, cross.shape[-1])
        words = self.softmax_tokens or diffusers_softmax_tokens(grid.shape[-1])
        subjects = subject_maps(grid, self.indices, words, view="ae", temperature=s.temperature,
                                kernel_size=s.kernel_size, sigma=s.sigma)
        return GuidanceMaps(subjects, grid, self_attention, s)

    # -- updates ------------------------------------------------------------------------------------------------------
    def _descend(self, latents: torch.Tensor, loss: torch.Tensor, size: float, step: int) -> tuple[torch.Tensor, bool]:
        """One gradient step; a non-finite loss, gradient or result leaves the latent as it was, with a warning."""
        if not torch.isfinite(loss):
            return self._skip(latents, step, "the loss is not finite")
        if not loss.requires_grad:
            return self._skip(latents, step, "the loss does not depend on the latent")
        (grad,) = torch.autograd.grad(loss, [latents])
        if not torch.isfinite(grad).all():
            return self._skip(latents, step, "the gradient is not finite")
        moved = latents.detach() - size * grad
        if not torch.isfinite(moved).all():
            return self._skip(latents, step, "the updated latent is not finite")
        return moved.requires_grad_(True), True

    @staticmethod
    def _skip(latents: torch.Tensor, step: int, why: str) -> tuple[torch.Tensor, bool]:
        warnings.warn(f"guidance at step {step}: {why}; the latent is left unchanged", RuntimeWarning, stacklevel=3)
        return latents, False

    def step(self, latents: torch.Tensor, step: int) -> tuple[torch.Tensor, dict | None]:
        """The update before denoising step ``step``: refinement where scheduled, then one gradient step.

        Returns the new latent (detached) and a diagnostics row (None where the schedule does nothing).
        """
        s = self.schedule
        threshold = s.thresholds.get(step)
        alter = step < s.alter_steps(len(self.timesteps))
        if not alter and threshold is None:
            return latents, None
        size = float(self.step_sizes[step])
        x = latents.detach().requires_grad_(True)
        loss, maps = self.evaluate(x, step)
        first, iterations, skipped = loss.item(), 0, 0
        if threshold is not None and loss > 1 - threshold:
            # As diffusers' A&E: each iteration evaluates, then steps; the loop test sees the loss from before the
            # last step, and after the loop the latent is evaluated once more.
            target, check, known = max(0.0, 1.0 - threshold), loss, loss  # known: the loss at x, if evaluated
            while check > target:
                iterations += 1
                here = known if known is not None else self.evaluate(x, step)[0]
                check, known = here, None
                if here != 0:
                    x, ok = self._descend(x, here, size, step)
                    skipped += not ok
                if iterations >= s.max_refinement:
                    break
            loss, maps = self.evaluate(x, step)
        final = loss.item()
        if alter and loss != 0:
            x, ok = self._descend(x, loss, size, step)
            skipped += not ok
        row = {"step": step, "timestep": float(self.timesteps[step]), "loss": final, "initial_loss": first,
               "refinement_iterations": iterations, "step_size": size if alter else 0.0, "skipped": skipped}
        peaks = maps.max_attention[0].detach().cpu().tolist()
        row.update({f"max_attention[{label}]": value for label, value in zip(self.labels, peaks)})
        return x.detach(), row

    # -- initial noise ------------------------------------------------------------------------------------------------
    def optimise_noise(self, noise: torch.Tensor, settings: InitNO, draw: Callable[[], torch.Tensor]
                       ) -> tuple[torch.Tensor, pd.DataFrame]:
        """INITNO rounds from ``noise`` (then ``draw()`` for fresh noise); returns the noise to start from."""
        if settings.target is None and not 0 < settings.relative < 1:
            raise ValueError(f"InitNO.relative must lie in (0, 1), got {settings.relative}")
        if settings.target is not None:
            threshold = settings.target
        else:
            with torch.no_grad():
                start, _ = self.evaluate(noise * noise_sigma(self.pipe), 0)
            threshold = (1 - settings.relative) * start.item()
        rows, pool = [], []
        for round_ in range(settings.rounds):
            eps = noise if round_ == 0 else draw()
            z, loss, ok = self._optimise_round(eps, settings.steps, settings, threshold)
            rows.append({"round": round_, "loss": loss, "threshold": threshold, "reached_target": ok})
            if ok:
                return z, pd.DataFrame(rows)
            pool.append((loss if math.isfinite(loss) else math.inf, round_, eps))
        _, best, eps = min(pool, key=lambda p: (p[0], p[1]))
        z, loss, ok = self._optimise_round(eps, settings.final_steps, settings, threshold)
        rows.append({"round": f"final (from {best})", "loss": loss, "threshold": threshold, "reached_target": ok})
        return z, pd.DataFrame(rows)

    def _optimise_round(self, eps: torch.Tensor, n_steps: int, settings: InitNO, threshold: float
                        ) -> tuple[torch.Tensor, float, bool]:
        sigma = noise_sigma(self.pipe)
        log_var = torch.zeros_like(eps, dtype=torch.float32, requires_grad=True)
        mu = torch.zeros_like(eps, dtype=torch.float32, requires_grad=True)
        optimiser = torch.optim.Adam([log_var, mu], lr=settings.lr, eps=settings.adam_eps)

        def sample() -> torch.Tensor:
            return (eps * torch.exp(0.5 * log_var) + mu).to(eps.dtype)

        def descend(loss: torch.Tensor) -> None:
            optimiser.zero_grad()
            log_var.grad, mu.grad = torch.autograd.grad(loss, [log_var, mu])
            optimiser.step()

        value, ok = math.inf, False
        for _ in range(n_steps):
            loss, _ = self.evaluate(sample() * sigma, 0)
            value = loss.item()
            if not math.isfinite(value):
                warnings.warn("INITNO: the objective is not finite; this round stops", RuntimeWarning, stacklevel=3)
                break
            if value <= threshold:
                ok = True
                break
            descend(loss)
            for _ in range(settings.kl_max_iterations):
                kl = _gaussian_kl(log_var, mu)
                if kl <= settings.kl_bound:
                    break
                descend(kl)
        z = sample().detach()
        if not torch.isfinite(z).all():
            warnings.warn("INITNO: the optimised noise is not finite; keeping the round's start", RuntimeWarning,
                          stacklevel=3)
            z = eps
        return z, value, ok


def _gaussian_kl(log_var: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mean per-element KL(N(μ, σ²) ‖ N(0, 1))."""
    return -0.5 * torch.mean(1 + log_var - mu**2 - log_var.exp())


def _labels(words: list[str]) -> list[str]:
    """Column labels for subjects; a repeated word gets #2, #3 …"""
    seen: dict[str, int] = {}
    labels = []
    for word in words:
        seen[word] = seen.get(word, 0) + 1
        labels.append(word if seen[word] == 1 else f"{word}#{seen[word]}")
    return labels


# -- generation -------------------------------------------------------------------------------------------------------


@dataclass
class GuideResult:
    """A guided generation: the pipeline's images, the final latents and one diagnostics row per guided step."""

    images: list
    latents: torch.Tensor
    history: pd.DataFrame
    init_history: pd.DataFrame | None = None  # INITNO rounds, when asked for

    @property
    def objective_span(self) -> tuple[float, float]:
        """The objective before guidance first moved the latent (step 0's loss before refinement) and at the last
        guided step: what a manipulation check compares (NaN, NaN when nothing was guided)."""
        if self.history.empty:
            return math.nan, math.nan
        return float(self.history.initial_loss.iloc[0]), float(self.history.loss.iloc[-1])


# -- a model's own defaults ------------------------------------------------------------------------------------------


def model_schedule(pipe, objective: ObjectiveSpec = "ae") -> tuple[Schedule, str | None]:
    """The schedule :func:`generate` runs when the caller gives none, and the line that says so (None: nothing to say).

    A step published for one model need not suit another (on the built-in model A&E's step 20 trades missing subjects
    for mixed ones), so a model folder's ``probe.json`` (:func:`probe.models.model_defaults`) may override
    :class:`Schedule`'s fields per objective name. A sum (``"ae+iou"``, ``{"ae": 1, "iou": 1}``) takes its own entry
    where the file has one, else the defaults its terms share; where they differ (or only some terms have one),
    ``Schedule()`` runs and the line says why. A callable objective, or an objective the file does not name, runs at
    ``Schedule()`` silently.
    """
    table = model_defaults(pipe).get("guidance", {})
    terms = _objective_terms(objective)
    if not table or terms is None:
        return Schedule(), None
    label = "+".join(terms)
    names = [label] if label in table else terms
    entries = [table.get(name) for name in names]
    if all(entry is None for entry in entries):
        return Schedule(), None
    where = _shown(model_folder(pipe) / MODEL_DEFAULTS_FILE)
    overrides = [None if e is None else {k: v for k, v in e.items() if k != "source"} for e in entries]
    if any(o is None or o != overrides[0] for o in overrides):
        given = "; ".join(f"{n}: {'not listed' if o is None else _fields_text(o)}" for n, o in zip(names, overrides))
        return Schedule(), (f"guidance: {label} runs at Schedule()'s defaults: its terms' defaults in {where} differ "
                            f"({given}); pass schedule= to choose")
    schedule = _schedule_with(overrides[0], label, where)
    sources = "; ".join(dict.fromkeys(str(e["source"]) for e in entries if e.get("source")))
    return schedule, (f"guidance: {label} at {_fields_text(overrides[0])} from {where}"
                      + (f" ({sources})" if sources else "") + "; pass schedule= to override")


def _objective_terms(spec: ObjectiveSpec) -> list[str] | None:
    """The objective names ``spec`` sums (a model's defaults are kept per name); None for a callable of the user's."""
    if isinstance(spec, str):
        return list(dict.fromkeys(part.strip() for part in spec.split("+")))
    if isinstance(spec, Mapping):
        return list(dict.fromkeys(part.strip() for name in spec for part in str(name).split("+")))
    if isinstance(spec, Objective) and OBJECTIVES.get(spec.name) is spec:
        return [spec.name]
    return None


def _schedule_with(overrides: Mapping, objective: str, where: str) -> Schedule:
    """``Schedule()`` with a ``probe.json`` entry's fields, each checked against the field's own type."""
    base = Schedule()
    known = [f.name for f in fields(Schedule)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{where}: guidance {objective!r} sets {unknown}, which are not Schedule fields; give some "
                         f"of {known} (and 'source')")
    return replace(base, **{name: _json_field(name, value, getattr(base, name), objective, where)
                            for name, value in overrides.items()})


def _json_field(name: str, value, default, objective: str, where: str):
    """A JSON value as the Schedule field's type: a list for a tuple, step indices as keys of ``thresholds``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, float) and number:
        return float(value)
    if isinstance(default, int) and number and float(value).is_integer():
        return int(value)
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, tuple) and isinstance(value, list) and len(value) == len(default):
        return tuple(_json_field(name, v, d, objective, where) for v, d in zip(value, default))
    if isinstance(default, Mapping) and isinstance(value, Mapping):
        try:
            return {int(step): float(threshold) for step, threshold in value.items()}
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{where}: guidance {objective!r} sets {name} to {value!r}; Schedule.{name} takes a value like "
                     f"{default!r}")


def _fields_text(overrides: Mapping) -> str:
    return ", ".join(f"{name} {value}" for name, value in overrides.items()) or "Schedule()'s defaults"


def _shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the working folder where it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def generate(pipe, prompt: str, *, subjects: Sequence[str], objective: ObjectiveSpec = "ae", seed: int,
             schedule: Schedule | None = None, init_noise: str | InitNO | torch.Tensor | None = None,
             steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
             width: int | None = None, output_type: str = "pil", progress: bool = True,
             consumers: Sequence[Consumer] = (), **pipe_kwargs) -> GuideResult:
    """Generate one image of ``prompt`` while guiding the attention of its ``subjects`` (words of the prompt).

    ``objective``: a name from :data:`OBJECTIVES`, a weighted sum such as ``{"ae": 1, "iou": 1}`` or a callable of
    :class:`GuidanceMaps`. ``schedule``: every number of the guidance; None runs :class:`Schedule`'s defaults with
    the model folder's own for this objective on top (``probe.json``, :func:`model_schedule`), and a ``UserWarning``
    says which and where they came from. ``init_noise``: None (the seed's noise), ``"initno"`` or an :class:`InitNO`
    (optimise the initial noise first), or a tensor of initial noise. ``steps``, ``guidance_scale``: None runs the
    model's own (:func:`probe.models.generation`). ``consumers`` join the tap (e.g. a recorder). Other keyword
    arguments go to the pipeline; one it does not take is refused.
    """
    pipe = load(pipe)
    checks.pipeline_keywords(pipe, pipe_kwargs, "generate", {
        "prompt": "from prompt=", "generator": "from seed=", "callback_on_step_end": "guidance runs through it",
        "latents": "guidance starts from the seed's noise: give noise of your own as init_noise=tensor"}, own=generate)
    run = generation(pipe, steps, guidance_scale, caller="generate")
    steps, guidance_scale = run.steps, run.guidance_scale
    height, width = checks.image_side(height, "height"), checks.image_side(width, "width")
    generator = torch.Generator("cpu").manual_seed(checks.seed_value(seed))

    def draw() -> torch.Tensor:
        return initial_noise(pipe, generator, height, width)

    if isinstance(init_noise, torch.Tensor):
        shape = draw().shape
        if init_noise.numel() != math.prod(shape):
            raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}; this pipeline at this size starts "
                             f"from noise of shape {tuple(shape)}")
        noise = finite_noise(init_noise).to(device=pipe._execution_device, dtype=denoiser(pipe).dtype).reshape(shape)
    else:
        noise = draw()
    if schedule is None:  # the model's calibrated defaults, where its folder has them
        schedule, note = model_schedule(pipe, objective)
        if note is not None:
            warnings.warn(note, UserWarning, stacklevel=2)
    init_history = None
    with Guide(pipe, prompt, subjects, objective, schedule, steps=steps, height=height, width=width,
               consumers=consumers, max_sequence_length=pipe_kwargs.get("max_sequence_length")) as guide:
        if init_noise is not None and not isinstance(init_noise, torch.Tensor):
            settings = init_noise if isinstance(init_noise, InitNO) else InitNO() if init_noise == "initno" else None
            if settings is None:
                raise ValueError(f"init_noise must be None, 'initno', an InitNO or a tensor, not {init_noise!r}")
            with torch.enable_grad():
                noise, init_history = guide.optimise_noise(noise, settings, draw)
        sigma = noise_sigma(pipe)
        n_steps = len(guide.timesteps)
        rows: list[dict] = []
        final: dict[str, torch.Tensor] = {}
        bar = tqdm(total=n_steps, desc=f"guide {guide.objective.name}", disable=not progress)

        def advance(latents: torch.Tensor, step: int) -> torch.Tensor:
            with torch.enable_grad():
                latents, row = guide.step(latents, step)
            if row is not None:
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
            return latents

        def on_step_end(_pipe, i: int, t, kwargs: dict) -> dict:
            bar.update()
            latents = kwargs["latents"]
            if i + 1 < n_steps:
                latents = advance(latents, i + 1)
            else:
                final["latents"] = latents.detach().clone()
            return {"latents": latents}

        try:
            start = advance(noise * sigma, 0)
            first = pipeline_latents(pipe, start / sigma, guide.height, guide.width)
            out = pipe(prompt=prompt, **run.pipeline_kwargs(), height=guide.height, width=guide.width, latents=first,
                       generator=generator, output_type=output_type, callback_on_step_end=on_step_end, **pipe_kwargs)
        finally:
            bar.close()
    return GuideResult(out.images, final["latents"], pd.DataFrame(rows), init_history)
