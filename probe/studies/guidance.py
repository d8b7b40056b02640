"""The causal test: does guidance that lowers overlap lower entity missing, beyond Attend-and-Excite?"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from probe import plots
from probe.guide import OBJECTIVES, InitNO, Schedule, generate
from probe.maps import aggregate_self_attention, gaussian_smooth, token_map, token_softmax
from probe.models import attention_layers, load
from probe.overlap import (
    pair_indices,
)
from probe.prompts import prompt_set, prompt_tokens, subject_indices
from probe.shapes.evaluate import GUIDANCE, HELD_OUT_SEED, STEPS
from probe.shapes.judge import judge as exact_judge
from probe.stats import cluster_sign_flip, holm, mcnemar, pairs_for_power, power_of_pairs
from probe.studies.common import (
    BOOTSTRAPS,
    QUICK_BOOTSTRAPS,
    QUICK_STEPS,
    ImageRows,
    Judge,
    Subject,
    _save,
    _store,
    judged,
    mean_interval,
    nearest_grid,
    settings_id,
    weights_id,
)
from probe.studies.overlap import METRICS, pair_metrics
from probe.tap import Call, Consumer

GUIDANCE_SEED = HELD_OUT_SEED + 40_000  # seeds of the guidance study's images (shared by every method)
GUIDANCE_SETS = ("shapes-2", "shapes-3")  # the built-in world's two- and three-object prompts
NO_GUIDANCE = "none"  # plain generation through the same code path (tap, callback, noise), nothing guided
BASELINE = "ae"  # Attend-and-Excite: what the overlap-lowering methods must beat
GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i")
OVERLAP_METHODS = ("iou", "com", "kl", "cc", "self_cross", "ai_t2i")  # objectives that push subjects' maps apart
POOLED = "overlap methods (pooled)"
GUIDANCE_SEEDS_PER_PROMPT = 5  # 600 images = 2 sets × 60 prompts × 5 seeds
SUMMARY_METRICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross", "intensity_mean")
QUICK_GUIDANCE_IMAGES = 4  # quick: four prompts (two per set), one seed
QUICK_GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou")
QUICK_INITNO = InitNO(rounds=2, steps=5, final_steps=5)  # quick: a short initial-noise optimisation
QUICK_SCHEDULE = Schedule(max_refinement=5)  # quick: A&E's schedule with at most 5 refinement iterations
ALPHA = 0.05  # family-wise error of the comparisons with the baseline (Holm)
NO_GUIDANCE_SCHEDULE = Schedule(alter_fraction=0.0, thresholds={})  # the guide never moves the latent



EARLY_STEP, REFERENCE_STEPS = 10, 50  # overlap is read at step 10 of 50 (scaled to other step counts) and at the end


def overlap_steps(steps: int) -> dict[str, int]:
    """Where the guidance studies read overlap: step 10 of 50 scaled to ``steps`` (``t10``), and the last step."""
    early = min(max(round(EARLY_STEP / REFERENCE_STEPS * steps), 0), steps - 1)
    return {"t10": early, "end": steps - 1}


def scaled_schedule(steps: int, base: Schedule | None = None) -> Schedule:
    """Attend-and-Excite's schedule with its refinement steps (0, 10, 20 of 50) moved to the same share of ``steps``.

    The gradient steps already scale (first half of the steps). Two refinements that land on one step keep the first
    (the stricter) threshold. At 50 steps this is the schedule itself.
    """
    base = base or Schedule()
    thresholds: dict[int, float] = {}
    for step, threshold in sorted(base.thresholds.items()):
        scaled = round(step / REFERENCE_STEPS * steps)
        if scaled < steps:
            thresholds.setdefault(scaled, threshold)
    return replace(base, thresholds=thresholds)


class RealPassMaps(Consumer):
    """Layer-and-head mean cross- and self-attention of the chosen layers at the chosen steps, from the pipeline's
    real denoising pass only, never from guidance's own passes.

    The tap tells the pass: the pipeline's own (``cfg``: its conditional half; ``cond`` without guidance) counts,
    guidance's own evaluations do not. ``maps[step][kind]``: (queries, keys) means.
    """

    def __init__(self, layers: Sequence, steps: Sequence[int]):
        self.keys = {layer.key for layer in layers}
        self.steps = frozenset(steps)
        self._passes: dict[int, tuple[dict, dict]] = {}  # step → (sums, counts)

    def wants(self, call: Call) -> bool:
        return call.pass_ in ("cfg", "cond") and call.layer.key in self.keys and call.step in self.steps

    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        sums, counts = self._passes.setdefault(call.step, ({}, {}))
        kind = call.layer.kind
        summed = call.conditional(probs).detach().float().sum(1)[0]  # heads summed: (queries, keys) of one image
        sums[kind] = summed if kind not in sums else sums[kind] + summed
        counts[kind] = counts.get(kind, 0) + probs.shape[1]

    @property
    def maps(self) -> dict[int, dict[str, torch.Tensor]]:
        return {step: {kind: sums[kind] / counts[kind] for kind in sums}
                for step, (sums, counts) in sorted(self._passes.items())}


def subject_metrics(cross: torch.Tensor, self_attention: torch.Tensor, indices: Sequence[Sequence[int]],
                    end: int) -> dict[str, float]:
    """The overlap study's statistics (:func:`pair_metrics`) of two or more subjects in one image.

    ``cross`` (H, W, T) and ``self_attention`` (H, W, H·W): layer-and-head means; ``indices``: each subject's token
    positions; ``end``: the end token's position. Every pair of subjects is measured; pair statistics are averaged
    over pairs, ``*_min`` take the minimum and ``*_max`` the maximum over pairs (the weakest subject, the most
    scattered one). ``intensity_mean``: the mean over subjects of each subject's mean map value.
    """
    if len(indices) < 2:
        raise ValueError(f"overlap needs at least two subjects, got {len(indices)}")
    maps = torch.stack([token_map(cross, ix) for ix in indices], -3)
    ae_maps = gaussian_smooth(torch.stack([token_map(token_softmax(cross, last=end), ix) for ix in indices], -3))
    self_maps = aggregate_self_attention(maps, self_attention[None])
    first, second = (list(side) for side in zip(*pair_indices(len(indices))))

    def pairs(m: torch.Tensor) -> torch.Tensor:
        return torch.stack([m[first], m[second]], -3)  # (pairs, 2, H, W)

    values = pair_metrics(pairs(maps), pairs(self_maps), pairs(ae_maps))
    out = {}
    for name in METRICS:
        reduce = torch.amin if name.endswith("_min") else torch.amax if name.endswith("_max") else torch.mean
        out[name] = float(reduce(values[name]))
    out["intensity_mean"] = float((values["intensity_a"] + values["intensity_b"]).mean() / 2)
    return out


def study_prompts(sets: Sequence[str], n_images: int, seeds_per_prompt: int) -> list[dict]:
    """``ceil(n_images / (sets × seeds))`` prompts of each set (the first ones of the set): set, prompt, subjects.

    The sets take turns (first prompt of each set, then the second, …), so that a study stopped part-way has
    covered every set alike, and a smaller study's prompts come first in a larger one's."""
    per_set = max(1, math.ceil(n_images / (len(sets) * seeds_per_prompt)))
    columns = []
    for name in sets:
        data = prompt_set(name, per_set)
        columns.append([{"set": name, "prompt": p, "nouns": list(s), "colours": list(a)}
                        for p, s, a in zip(data["prompt"], data["subjects"], data["attributes"])])
    return [row for turn in itertools.zip_longest(*columns) for row in turn if row is not None]


def _configurations(methods: Sequence[str], initno: Sequence[bool]) -> list[tuple[str, bool]]:
    """(method, initno) pairs; "none" runs without INITNO only (there is no objective to optimise the noise for)."""
    unknown = [m for m in methods if m != NO_GUIDANCE and m not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown guidance methods {unknown}; known: {[NO_GUIDANCE, *OBJECTIVES]}")
    configs = [(m, bool(i)) for m in methods for i in dict.fromkeys(initno) if not (m == NO_GUIDANCE and i)]
    if not configs:
        raise ValueError(f"nothing to run: methods {list(methods)} with initno {list(initno)}")
    return configs


def guided_images(pipe, prompts: Sequence[dict], seeds: Sequence[int], configs: Sequence[tuple[str, bool]], *,
                  steps: int, guidance_scale: float = GUIDANCE, subject: Subject = "noun",
                  judge: Judge = exact_judge, schedule: Schedule | None = None,
                  initno_settings: InitNO | None = None, progress: bool = True, desc: str = "guidance",
                  store: str | Path | None = None) -> pd.DataFrame:
    """One row per (prompt, seed, method, initno): judge's verdict, overlap at ``t10`` and at the end, seconds.

    Every configuration runs through :func:`probe.guide.generate` (``none`` with a schedule that never moves the
    latent); the images of one (prompt, seed) are made back to back so that a busy machine slows all methods alike.
    Overlap: the layer-and-head mean attention of the real pass at the cross-attention grid closest to 16×16
    (:class:`RealPassMaps`), measured with :func:`subject_metrics`. ``subject``: "noun" or "colour" words.
    ``schedule``: the guidance schedule at 50 steps (default: Attend-and-Excite's), scaled by :func:`scaled_schedule`.
    ``store``: a CSV (:class:`ImageRows`) that keeps the rows as they are made: a stopped run started again with
    the same settings and weights skips the images it already has.
    """
    if subject not in ("noun", "colour"):
        raise ValueError(f"subject must be 'noun' or 'colour' for guidance (one word per subject), not {subject!r}")
    grid = nearest_grid(pipe)
    layers = [layer for layer in attention_layers(pipe) if layer.grid[0] == grid and layer.kind in ("cross", "self")]
    height, width = next(layer.grid for layer in layers if layer.kind == "cross")
    read_at = overlap_steps(steps)
    schedule = scaled_schedule(steps, schedule)
    settings = initno_settings or InitNO()
    jobs = [(p, s, c) for p in prompts for s in seeds for c in configs]
    keys = [(item["prompt"], seed, method, initno) for item, seed, (method, initno) in jobs]
    rows = ImageRows(store, settings_id(weights=weights_id(pipe), steps=steps, guidance_scale=guidance_scale,
                                        subject=subject, schedule=asdict(schedule), initno=asdict(settings),
                                        judge=getattr(judge, "__qualname__", repr(judge))), keys)
    todo = [(job, key) for job, key in zip(jobs, keys) if rows.get(key) is None]
    reused_seconds = sum(float(rows.get(key)["seconds"]) for key in keys if rows.get(key) is not None)
    if progress and len(todo) < len(jobs):
        print(f"{desc}: {len(jobs) - len(todo)} of {len(jobs)} images already in {store}")
    for (item, seed, (method, initno)), _ in tqdm(todo, desc=desc, disable=not progress):
        words = item["nouns"] if subject == "noun" else item["colours"]
        capture = RealPassMaps(layers, set(read_at.values()))
        start = time.perf_counter()
        result = generate(pipe, item["prompt"], subjects=words, objective=BASELINE if method == NO_GUIDANCE else method,
                          seed=seed, schedule=NO_GUIDANCE_SCHEDULE if method == NO_GUIDANCE else schedule,
                          init_noise=settings if initno else None, steps=steps, guidance_scale=guidance_scale,
                          output_type="np", progress=False, consumers=[capture])
        seconds = time.perf_counter() - start
        image = (np.asarray(result.images[0]) * 255).round().clip(0, 255).astype(np.uint8)
        tokens = prompt_tokens(pipe, item["prompt"])
        indices = subject_indices(pipe, item["prompt"], words)
        maps = capture.maps
        history = result.history
        row = {"method": method, "initno": initno, "set": item["set"], "prompt": item["prompt"], "seed": seed,
               **judged(image, item["prompt"], judge), "seconds": seconds,
               "loss_start": float(history.loss.iloc[0]) if len(history) else math.nan,
               "loss_end": float(history.loss.iloc[-1]) if len(history) else math.nan}
        for label, step in read_at.items():
            found = maps.get(step)
            if found is None or set(found) != {"cross", "self"}:
                raise RuntimeError(f"no real-pass attention at step {step} of {steps}; was the tap bypassed?")
            cross, selfattn = (found[kind].reshape(height, width, -1) for kind in ("cross", "self"))
            values = subject_metrics(cross, selfattn, indices, len(tokens) - 1)
            row.update({f"{name}_{label}": value for name, value in values.items()})
        rows.add(row)
    rows.save()
    frame = pd.DataFrame([rows.get(key) for key in keys])
    frame.attrs.update({"steps": steps, "t10_step": read_at["t10"], "end_step": read_at["end"], "grid": grid,
                        "reused_seconds": reused_seconds})
    return frame


def versus_baseline(images: pd.DataFrame, outcome: str = "missing", baseline: str = BASELINE,
                    pooled: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS, seed: int = 0,
                    alpha: float = ALPHA) -> pd.DataFrame:
    """Does each method change ``outcome`` beyond the baseline (A&E)? Paired on (prompt, seed), per ``initno``.

    ``difference``: the method's rate minus the baseline's on the same prompts and seeds, with a bootstrap interval
    that resamples whole prompts (a prompt fixes much of what fails); ``p_value``: a sign-flip test over prompts of
    the same paired differences; ``p_mcnemar``: McNemar's exact test (images as independent pairs, for reference);
    ``p_holm``: ``p_value`` adjusted by Holm over every comparison with the baseline at this ``initno`` (the family
    the verdicts are read from). ``overlap_difference``: the paired difference of soft IoU at step 10 (did the method
    lower overlap at all?). The pooled row (when two or more of ``pooled`` ran) averages those methods per
    (prompt, seed) first: "do overlap-lowering objectives, as a family, beat A&E?".
    """
    key = ["prompt", "seed"]
    columns = ["method", "initno", "n_paired", "n_prompts", "difference", "ci_low", "ci_high", "p_value",
               "p_mcnemar", "p_holm", "overlap_difference", "verdict"]
    rows = []
    for initno, frame in images.groupby("initno", sort=False):
        frame = frame.assign(**{outcome: frame[outcome].astype(float)})
        base = frame[frame.method == baseline].groupby(key)[[outcome, "soft_iou_t10"]].mean()
        if base.empty:
            continue
        present = list(dict.fromkeys(frame.method))
        family = [m for m in pooled if m in present]
        groups = [(m, [m]) for m in present if m != baseline] + ([(POOLED, family)] if len(family) > 1 else [])
        family_rows = []
        for name, members in groups:
            part = frame[frame.method.isin(members)].groupby(key)[[outcome, "soft_iou_t10"]].mean()
            joined = part.join(base, rsuffix="_base", how="inner")
            prompts = joined.index.get_level_values("prompt")
            differences = joined[outcome] - joined[f"{outcome}_base"]
            diff, low, high = mean_interval(differences, prompts, n_boot, seed=seed)
            binary = len(members) == 1
            family_rows.append({
                "method": name, "initno": bool(initno), "n_paired": len(joined), "n_prompts": prompts.nunique(),
                "difference": diff, "ci_low": low, "ci_high": high,
                "p_value": cluster_sign_flip(differences, prompts, seed=seed),
                "p_mcnemar": mcnemar(joined[f"{outcome}_base"] > 0.5, joined[outcome] > 0.5) if binary else math.nan,
                "overlap_difference": float((joined.soft_iou_t10 - joined.soft_iou_t10_base).mean())})
        for row, adjusted in zip(family_rows, holm([r["p_value"] for r in family_rows])):
            row["p_holm"] = adjusted
            if math.isnan(row["difference"]):
                row["verdict"] = "not measured"
            elif adjusted < alpha:
                row["verdict"] = f"{'less' if row['difference'] < 0 else 'more'} {outcome} than {baseline}"
            else:
                row["verdict"] = f"no clear difference from {baseline}"
        rows += family_rows
    return pd.DataFrame(rows, columns=columns)


def outcome_summary(images: pd.DataFrame, outcomes: Sequence[str] = ("missing", "mixed"),
                    pooled: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """One row per (method, initno), plus the pooled overlap-lowering methods per initno when two or more ran.

    Per outcome its rate with an interval over prompts (``{outcome}_rate``, ``{outcome}_ci_low``, ``_ci_high``);
    the mean number of missing subjects; the mean of each :data:`SUMMARY_METRICS` at step 10 and at the end; the
    quality proxies; seconds per image. The manipulation check, so that a null result can be told apart from a
    guidance that did nothing: the objective's median at its first and last guided step and the share of images
    where it fell (``loss_start_median``, ``loss_end_median``, ``loss_fell``), and how far soft IoU moved from
    unguided generation on the same (prompt, seed) at step 10 and whether that change survived to the end
    (``iou_t10_vs_none``, ``iou_end_vs_none``).
    """
    groups = list(images.groupby(["method", "initno"], sort=False))
    for initno, frame in images.groupby("initno", sort=False):
        family = frame[frame.method.isin(pooled)]
        if family.method.nunique() > 1:
            groups.append(((POOLED, initno), family))
    plain = images[images.method == NO_GUIDANCE].groupby(["prompt", "seed"])[["soft_iou_t10", "soft_iou_end"]].mean()
    rows = []
    for (method, initno), frame in groups:
        row = {"method": method, "initno": bool(initno), "n": len(frame), "n_prompts": frame.prompt.nunique()}
        for outcome in outcomes:
            rate, low, high = mean_interval(frame[outcome].astype(float), frame.prompt, n_boot, seed=seed)
            row.update({f"{outcome}_rate": rate, f"{outcome}_ci_low": low, f"{outcome}_ci_high": high})
        row["n_missing_mean"] = float(frame.n_missing.mean())
        row.update({f"{m}_{at}": float(frame[f"{m}_{at}"].mean()) for m in SUMMARY_METRICS for at in ("t10", "end")})
        guided = frame.dropna(subset=["loss_start", "loss_end"])
        row.update({"loss_start_median": float(guided.loss_start.median()) if len(guided) else math.nan,
                    "loss_end_median": float(guided.loss_end.median()) if len(guided) else math.nan,
                    "loss_fell": float((guided.loss_end < guided.loss_start).mean()) if len(guided) else math.nan})
        paired = frame.groupby(["prompt", "seed"])[["soft_iou_t10", "soft_iou_end"]].mean().join(
            plain, rsuffix="_none", how="inner")
        for at in ("t10", "end"):
            moved = paired[f"soft_iou_{at}"] - paired[f"soft_iou_{at}_none"]
            row[f"iou_{at}_vs_none"] = float(moved.mean()) if len(moved) and method != NO_GUIDANCE else math.nan
        row.update({"quality": float(frame.quality.mean()), "precision": float(frame.precision.mean()),
                    "seconds_per_image": float(frame.seconds.mean())})
        rows.append(row)
    return pd.DataFrame(rows)


def _with_versus(summary: pd.DataFrame, versus: pd.DataFrame, prefix: str) -> pd.DataFrame:
    renamed = versus.drop(columns=["n_paired", "n_prompts", "p_value", "p_mcnemar"]).rename(columns={
        "difference": f"{prefix}diff_vs_{BASELINE}", "ci_low": f"{prefix}diff_ci_low",
        "ci_high": f"{prefix}diff_ci_high", "overlap_difference": f"iou_t10_diff_vs_{BASELINE}",
        "p_holm": f"{prefix}p_holm", "verdict": f"{prefix}verdict"})
    if prefix:
        renamed = renamed.drop(columns=f"iou_t10_diff_vs_{BASELINE}")
    merged = summary.merge(renamed, on=["method", "initno"], how="left")
    merged.loc[merged.method == BASELINE, f"{prefix}verdict"] = "baseline"
    return merged


@dataclass
class GuidanceStudy:
    """``images``: one row per generated image; ``summary``: one row per (method, initno) plus the pooled
    overlap-lowering methods, with missing and mixing rates and their paired differences from A&E (``mixed_``
    columns for mixing); ``versus_ae``: each method's missing rate minus A&E's (paired, with interval)."""

    images: pd.DataFrame
    summary: pd.DataFrame
    versus_ae: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Design:
    """How many images a comparison with the baseline needs: a McNemar test on (prompt, seed) pairs, Bonferroni's
    bound on Holm over the comparisons, inflated for the seeds that share a prompt.

    ``effect``: the smallest paired difference in missing rate worth finding (the testbed's target for A&E);
    ``discordant``: the share of pairs whose outcome differs between two methods; ``icc``: how alike one prompt's
    images are (design effect 1 + (seeds − 1)·icc). Assumptions, printed with the result, to be replaced by a
    pilot's measured values (``discordant`` from any two methods' rows, ``icc`` from a prompt-level variance split).
    """

    effect: float = 0.05
    discordant: float = 0.20
    icc: float = 0.10
    power: float = 0.80
    alpha: float = ALPHA

    def images(self, comparisons: int, seeds_per_prompt: int) -> int:
        deff = 1 + (seeds_per_prompt - 1) * self.icc
        return pairs_for_power(self.effect, self.discordant, self.alpha / max(1, comparisons), self.power, deff)

    def describe(self, n_images: int, comparisons: int, seeds_per_prompt: int) -> str:
        deff = 1 + (seeds_per_prompt - 1) * self.icc
        power = power_of_pairs(n_images, self.effect, self.discordant, self.alpha / max(1, comparisons), deff)
        return (f"design: {n_images} (prompt, seed) pairs per method, {comparisons} comparisons with {BASELINE} "
                f"(Holm, family-wise α = {self.alpha}); power {power:.0%} to find a paired difference of "
                f"{self.effect * 100:.0f} points if {self.discordant:.0%} of pairs differ and one prompt's images "
                f"correlate at {self.icc} ({self.images(comparisons, seeds_per_prompt)} pairs give {self.power:.0%})")


def guidance_study(pipe, n_images: int | None = None, steps: int = STEPS, quick: bool = False,
                   out: str | Path | None = None, methods: Sequence[str] = GUIDANCE_METHODS,
                   initno: Sequence[bool] = (False, True),
                   progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                   sets: Sequence[str] = GUIDANCE_SETS, subject: Subject = "noun", judge: Judge = exact_judge,
                   guidance_scale: float = GUIDANCE, schedule: Schedule | None = None,
                   initno_settings: InitNO | None = None, design: Design = Design()) -> GuidanceStudy:
    """The causal test: does guidance that lowers attention overlap lower entity missing, beyond Attend-and-Excite?

    The same ``n_images`` (prompt, seed) pairs per method (default: as many as ``design`` needs for its power, the
    calculation printed at the start): the first prompts of the two- and three-object sets, each
    with ``seeds_per_prompt`` seeds. Methods: ``none`` (no guidance, same code path), ``ae`` and the overlap-lowering
    objectives of :data:`probe.guide.OBJECTIVES`, each without and with INITNO (``none`` without only). Schedule:
    Attend-and-Excite's, refinement steps scaled to ``steps`` (:func:`scaled_schedule`). Per image: the judge's
    verdict (missing, number missing, mixed), overlap statistics of the subjects' maps at step 10 (of 50, scaled)
    and at the last step, the quality proxies of :func:`judged`, seconds. An image is missing when any subject is.
    ``schedule`` replaces A&E's schedule (given for 50 steps); ``initno_settings`` the default :class:`InitNO`.

    ``quick``: at most 4 images (two prompts per set, one seed), methods none / ae / iou when ``methods`` is the
    default, at most 20 steps, a short INITNO (:data:`QUICK_INITNO`), at most 5 refinement iterations
    (:data:`QUICK_SCHEDULE`), 200 bootstrap resamples.

    With ``out``, the per-image rows go to ``out/guidance_images.csv`` as they are made (:class:`ImageRows`):
    the same command run again after a stop resumes where it stopped, and a larger ``n_images`` reuses a smaller
    run's images (the sets take turns, so a smaller run's prompts come first).
    """
    pipe = load(pipe)
    if quick:
        methods = QUICK_GUIDANCE_METHODS if tuple(methods) == GUIDANCE_METHODS else methods
    configs = _configurations(methods, initno)
    comparisons = sum(method != BASELINE for method, _ in configs)
    if n_images is None:
        n_images = design.images(comparisons, seeds_per_prompt)
    if quick:
        n_images, seeds_per_prompt = min(n_images, QUICK_GUIDANCE_IMAGES), 1
        steps = min(steps, QUICK_STEPS)
        initno_settings, schedule = initno_settings or QUICK_INITNO, schedule or QUICK_SCHEDULE
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    seeds = [GUIDANCE_SEED + i for i in range(seeds_per_prompt)]
    if progress:
        print(design.describe(len(prompts) * len(seeds), comparisons, seeds_per_prompt))
    images = guided_images(pipe, prompts, seeds, configs, steps=steps,
                           guidance_scale=guidance_scale, subject=subject, judge=judge, schedule=schedule,
                           initno_settings=initno_settings, progress=progress, desc="guidance study",
                           store=_store(out, "guidance_images"))
    versus = versus_baseline(images, "missing", n_boot=n_boot)
    summary = _with_versus(outcome_summary(images, n_boot=n_boot), versus, "")
    # mixing too: on a model that rarely loses a subject, binding is the failure guidance can move
    summary = _with_versus(summary, versus_baseline(images, "mixed", n_boot=n_boot), "mixed_")
    figures = {"guidance_missing": plots.outcome_rates(summary, ("missing", "mixed"), baseline=BASELINE),
               "guidance_overlap_vs_missing": plots.overlap_vs_outcome(summary, ("missing", "mixed"))}
    return GuidanceStudy(images, summary, versus, figures, _save(figures, out))


def guidance_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (method, initno), lowest missing rate first: missing and mixing rates (CI), their differences from A&E
    (paired CI) and verdicts, overlap at step 10 and at the end, quality, seconds per image. The pooled row answers
    the question."""
    columns = ["method", "initno", "n", "missing_rate", "missing_ci_low", "missing_ci_high", f"diff_vs_{BASELINE}",
               "diff_ci_low", "diff_ci_high", "p_holm", "verdict", "mixed_rate", f"mixed_diff_vs_{BASELINE}",
               "mixed_diff_ci_low", "mixed_diff_ci_high", "mixed_p_holm", "mixed_verdict", "loss_start_median",
               "loss_end_median", "loss_fell", "iou_t10_vs_none", "iou_end_vs_none", "soft_iou_t10", "soft_iou_end",
               f"iou_t10_diff_vs_{BASELINE}", "intensity_mean_t10", "quality", "seconds_per_image"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    return summary[columns].sort_values(["missing_rate", "method"], kind="stable").reset_index(drop=True)
