"""Guided images measured alike for every method: the engine of the guidance and Self-Cross studies.

Each (prompt, seed, method) image is generated through :func:`probe.steer.guide.generate`, judged, and its subjects'
overlap read from the real denoising pass at step 10 (of 50) and at the end; :func:`calibrate_steps` chooses each
method's step size on pilot prompts the study does not use, so that a method is compared at a step that does what
it intends (A&E: fewer missing subjects; an overlap objective: less overlap).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from probe.analysis.maps import aggregate_self_attention
from probe.analysis.overlap import pair_indices
from probe.analysis.subjects import subject_maps
from probe.consumers.maps import REAL_PASSES, MapCollector
from probe.fingerprint import weights_id
from probe.images import to_uint8
from probe.prompts import prompt_set, subject_keys
from probe.shapes.judge import judge as exact_judge
from probe.shapes.settings import GUIDANCE
from probe.steer.guide import OBJECTIVES, InitNO, Schedule, generate
from probe.steer.objectives import is_objective_name
from probe.studies.common import (
    ImageRows,
    Judge,
    Subject,
    judged,
    mean_interval,
    nearest_grid,
    rows_path,
    settings_id,
    step_key,
)
from probe.studies.overlap import METRICS, pair_metrics
from probe.studies.shards import Shard, in_shard, shard_path
from probe.tap import attention_layers

NO_GUIDANCE = "none"  # plain generation through the same code path (tap, callback, noise), nothing guided
BASELINE = "ae"  # Attend-and-Excite: what the overlap-lowering methods must beat
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


def RealPassMaps(layers: Sequence, steps: Sequence[int]) -> MapCollector:  # noqa: N802 (the class it was)
    """Layer-and-head mean cross- and self-attention of ``layers`` at ``steps`` of one image, from the pipeline's
    real denoising pass only (its conditional half), never from guidance's own passes: a :class:`MapCollector`.
    ``maps[step][kind]``: (queries, keys) means."""
    return MapCollector(layers, passes=REAL_PASSES, steps=steps, detach=True, image=0)


def subject_metrics(cross: torch.Tensor, self_attention: torch.Tensor, indices: Sequence[Sequence[int]],
                    words: Sequence[int]) -> dict[str, float]:
    """The overlap study's statistics (:func:`pair_metrics`) of two or more subjects in one image.

    ``cross`` (H, W, T) and ``self_attention`` (H, W, H·W): layer-and-head means; ``indices``: each subject's token
    positions; ``words``: the positions of the prompt's words, which A&E's token softmax runs over
    (:func:`probe.prompts.word_positions`: with left padding they do not start at 1). Every pair of subjects is
    measured; pair statistics are averaged over pairs, ``*_min`` take the minimum and ``*_max`` the maximum over
    pairs (the weakest subject, the most scattered one). ``intensity_mean``: the mean over subjects of each
    subject's mean map value.
    """
    if len(indices) < 2:
        raise ValueError(f"overlap needs at least two subjects, got {len(indices)}")
    maps = subject_maps(cross, indices)
    ae_maps = subject_maps(cross, indices, words, view="ae")
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


def configurations(methods: Sequence[str], initno: Sequence[bool]) -> list[tuple[str, bool]]:
    """(method, initno) pairs; "none" runs without INITNO only (there is no objective to optimise the noise for)."""
    unknown = [m for m in methods if m != NO_GUIDANCE and not is_objective_name(m)]
    if unknown:
        raise ValueError(f"unknown guidance methods {unknown}; known: {[NO_GUIDANCE, *OBJECTIVES]}")
    configs = [(m, bool(i)) for m in methods for i in dict.fromkeys(initno) if not (m == NO_GUIDANCE and i)]
    if not configs:
        raise ValueError(f"nothing to run: methods {list(methods)} with initno {list(initno)}")
    return configs


@dataclass
class StudyPart:
    """What one part of a guided study made: its step-size calibration alone (``--calibrate``), or one shard's rows
    (``--shard I/N``); ``path``: the table they are kept in. The study's analysis runs on the merged table."""

    rows: pd.DataFrame
    path: Path | None


def guided_rows(pipe, table: str, out: str | Path | None, methods: Sequence[str], sets: Sequence[str],
                prompts: Sequence[dict], seeds: Sequence[int], configs: Sequence[tuple[str, bool]], *, steps: int,
                step_sizes: Mapping[str, float] | None, quick: bool, progress: bool,
                min_effects: Mapping[str, float] | None, shard: Shard | None, calibrate_only: bool,
                initno_settings: InitNO | None, desc: str, **options) -> tuple[pd.DataFrame, pd.DataFrame] | StudyPart:
    """A guided study's images and step-size calibration, ``(images, calibration)``: the step sizes chosen once
    (:func:`study_steps`, the pilot's images kept in ``out/<table>_pilot_images.csv``), then every (prompt, seed,
    configuration) image (``out/<table>_images.csv``, resumable). A :class:`StudyPart` where only a part is asked
    for: the calibration alone (``calibrate_only``), or one shard's rows (``shard``; the calibration must be made)."""
    pilot = rows_path(out, f"{table}_pilot_images")
    sizes, calibration = study_steps(pipe, methods, sets, prompts, seeds, steps=steps, step_sizes=step_sizes,
                                     quick=quick, progress=progress, min_effects=min_effects, pilot_store=pilot,
                                     make=shard is None, **options)
    if calibrate_only:
        return StudyPart(calibration, pilot)
    store = shard_path(rows_path(out, f"{table}_images"), shard)
    images = guided_images(pipe, prompts, seeds, configs, steps=steps, initno_settings=initno_settings,
                           step_sizes=sizes, progress=progress, desc=desc, store=store, shard=shard, **options)
    return StudyPart(images, store) if shard is not None else (images, calibration)


def _overlap_columns(maps: dict, read_at: Mapping[str, int], grid: tuple[int, int], indices, words_at) -> dict:
    """The subjects' overlap statistics at each read step (``soft_iou_t10``, …) from the real pass's maps."""
    columns = {}
    for label, step in read_at.items():
        found = maps.get(step)
        if found is None or set(found) != {"cross", "self"}:
            raise RuntimeError(f"no real-pass attention at step {step}; was the tap bypassed?")
        cross, selfattn = (found[kind].reshape(*grid, -1) for kind in ("cross", "self"))
        columns.update({f"{name}_{label}": value for name, value in
                        subject_metrics(cross, selfattn, indices, words_at).items()})
    return columns


def guided_images(pipe, prompts: Sequence[dict], seeds: Sequence[int], configs: Sequence[tuple[str, bool]], *,
                  steps: int, guidance_scale: float = GUIDANCE, subject: Subject = "noun",
                  judge: Judge = exact_judge, schedule: Schedule | None = None,
                  initno_settings: InitNO | None = None, step_sizes: Mapping[str, float] | None = None,
                  progress: bool = True, desc: str = "guidance", store: str | Path | None = None,
                  by_step: bool = False, make: bool = True, shard: Shard | None = None) -> pd.DataFrame:
    """One row per (prompt, seed, method, initno): judge's verdict, overlap at ``t10`` and at the end, seconds.

    Every configuration runs through :func:`probe.steer.guide.generate` (``none`` with a schedule that never moves the
    latent); the images of one (prompt, seed) are made back to back so that a busy machine slows all methods alike.
    Overlap: the layer-and-head mean attention of the real pass at the cross-attention grid closest to 16×16
    (:class:`RealPassMaps`), measured with :func:`subject_metrics`. ``subject``: "noun" or "colour" words.
    ``schedule``: the guidance schedule at 50 steps (default: Attend-and-Excite's), scaled by :func:`scaled_schedule`;
    ``step_sizes``: its ``scale_factor`` per method (:func:`calibrate_steps`), the schedule's own for the others.
    ``store``: a CSV (:class:`ImageRows`) that keeps the rows as they are made: a stopped run started again with
    the same settings and weights skips the images it already has (a guided method's only where they were made at
    its step size, so runs with other methods or other step sizes share one table); ``by_step``: the table keeps one
    row per step size (a step-size pilot's). ``make=False``: every image must be in ``store`` already (a shard reads
    the calibration made before it), else an error says which are not. ``shard=(i, n)``: only the (prompt, seed)
    pairs ``k`` (in the study's order) with ``k % n == i``, all of their methods (:mod:`probe.studies.shards`).
    """
    if subject not in ("noun", "colour"):
        raise ValueError(f"subject must be 'noun' or 'colour' for guidance (one word per subject), not {subject!r}")
    grid = nearest_grid(pipe)
    layers = [layer for layer in attention_layers(pipe) if layer.grid[0] == grid and layer.kind in ("cross", "self")]
    height, width = next(layer.grid for layer in layers if layer.kind == "cross")
    read_at = overlap_steps(steps)
    schedule = scaled_schedule(steps, schedule)
    settings = initno_settings or InitNO()
    step_sizes = dict(step_sizes or {})
    unknown = sorted(set(step_sizes) - {method for method, _ in configs})
    if unknown:
        raise ValueError(f"step_sizes names methods that do not run: {unknown}")
    schedules = {method: replace(schedule, scale_factor=float(step_sizes[method])) if method in step_sizes
                 else schedule for method, _ in configs}
    step_of = {m: math.nan if m == NO_GUIDANCE else sched.scale_factor for m, sched in schedules.items()}
    pairs = [(p, s) for p in prompts for s in seeds]
    jobs = [(p, s, c) for k, (p, s) in enumerate(pairs) if in_shard(k, shard) for c in configs]
    keys = [(item["prompt"], seed, method, initno, *((step_key(step_of[method]),) if by_step else ()))
            for item, seed, (method, initno) in jobs]
    rows = ImageRows(store, settings_id(weights=weights_id(pipe), steps=steps, guidance_scale=guidance_scale,
                                        subject=subject, schedule=asdict(schedule), initno=asdict(settings),
                                        judge=getattr(judge, "__qualname__", repr(judge))), keys, by_step=by_step)

    def reusable(key: tuple) -> bool:  # a stored row counts only if it was made at this run's step for its method
        row = rows.get(key)
        return row is not None and (key[2] == NO_GUIDANCE or math.isclose(float(row.get("step_size", math.nan)),
                                                                           step_of[key[2]]))

    todo = [(job, key) for job, key in zip(jobs, keys) if not reusable(key)]
    if todo and not make:
        raise ValueError(f"{len(todo)} of {len(jobs)} images are not in {store} (e.g. {todo[0][1]}): the step-size "
                           "calibration runs once before the shards (probe study NAME --calibrate, or --processes N)")
    reused_seconds = sum(float(rows.get(key)["seconds"]) for key in keys if reusable(key))
    if progress and len(todo) < len(jobs):
        print(f"{desc}: {len(jobs) - len(todo)} of {len(jobs)} images already in {store}")
    for (item, seed, (method, initno)), _ in tqdm(todo, desc=desc, disable=not progress):
        words = item["nouns"] if subject == "noun" else item["colours"]
        capture = RealPassMaps(layers, set(read_at.values()))
        start = time.perf_counter()
        result = generate(pipe, item["prompt"], subjects=words, objective=BASELINE if method == NO_GUIDANCE else method,
                          seed=seed, schedule=NO_GUIDANCE_SCHEDULE if method == NO_GUIDANCE else schedules[method],
                          init_noise=settings if initno else None, steps=steps, guidance_scale=guidance_scale,
                          output_type="np", progress=False, consumers=[capture])
        seconds = time.perf_counter() - start
        image = to_uint8(result.images[0])
        indices, words_at = subject_keys(pipe, item["prompt"], words)  # the tokens guidance itself reads
        row = {"method": method, "initno": initno, "set": item["set"], "prompt": item["prompt"], "seed": seed,
               **judged(image, item["prompt"], judge), "seconds": seconds, "step_size": step_of[method],
               **dict(zip(("loss_start", "loss_end"), result.objective_span, strict=True))}
        rows.add({**row, **_overlap_columns(capture.maps, read_at, (height, width), indices, words_at)})
    # make=False: a shard reading the calibration's table, which its peers read at the same time, writes nothing
    if make and (by_step or shard is not None):  # a pilot's or a shard's table: every row it holds is kept
        rows.save()
    elif make:  # the study's own table: the rows its headline is computed from
        rows.keep_this_run()
    frame = pd.DataFrame([rows.get(key) for key in keys])
    frame.attrs.update({"steps": steps, "t10_step": read_at["t10"], "end_step": read_at["end"], "grid": grid,
                        "reused_seconds": reused_seconds})
    return frame


STEP_CANDIDATES = (20.0, 5.0, 1.0, 0.2, 0.05)  # A&E's published step (20) and smaller ones
# the first pilot, per set, for every method: the spread its criterion's paired differences have there sets how many
# pilot prompts the calibration takes (:func:`pilot_size`); a quick study's whole pilot is one prompt per set
CALIBRATION_PROMPTS = 4
QUICK_STEP_CANDIDATES = (20.0, 0.2)
# the calibration column a method's step minimises: A&E targets missing subjects, an overlap objective its maps'
# overlap at step 10 (the manipulation its study tests)
CRITERIA = {BASELINE: "missing_vs_none"}
OVERLAP_CRITERION = "iou_t10_vs_none"
# The smallest paired change against unguided images a pilot must find (at PILOT_POWER, two-sided PILOT_ALPHA).
# Soft IoU at step 10: the first calibration (data/models/shapes/guidance_step_sizes.csv, 8 pilot images) chose steps
# whose changes run from -0.0045 (kl) to -0.020 (self_cross), and neighbouring candidates differ by about 0.005; a pilot
# blind to 0.005 cannot say whether the weakest chosen step lowers overlap at all. Missing: 5 points (one image in
# 20 regains a subject), the gap between A&E's neighbouring candidates in that table (5 to 8 points).
MIN_EFFECTS = {"missing_vs_none": 0.05, OVERLAP_CRITERION: 0.005}
PILOT_POWER, PILOT_ALPHA = 0.8, 0.05


def criterion_of(method: str) -> str:
    """The calibration column ``method``'s step minimises (:data:`CRITERIA`, else :data:`OVERLAP_CRITERION`)."""
    return CRITERIA.get(method, OVERLAP_CRITERION)


def pilot_size(sd: float, effect: float, power: float = PILOT_POWER, alpha: float = PILOT_ALPHA) -> int:
    """Pilot prompts (one image each) that find a paired mean difference ``effect`` whose per-image SD is ``sd``,
    two-sided at ``alpha`` with ``power``: ``n = ((z(1 − α/2) + z(power)) · sd / effect)²``, rounded up, at least 2.

    One rule for every method: for A&E the difference is of missing (−1, 0 or +1 per image, so its SD is
    √(discordant − effect²), McNemar's normal approximation), for an overlap objective of soft IoU at step 10. The
    SD is measured, not assumed: :func:`study_steps` takes it from a first pilot of :data:`CALIBRATION_PROMPTS`
    prompts per set (the pooled SD of the criterion's paired differences over the group's methods and candidates).
    """
    from scipy.stats import norm

    if not (effect > 0 and sd >= 0 and 0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"need effect > 0, sd ≥ 0, 0 < alpha, power < 1; got {effect=}, {sd=}, {alpha=}, {power=}")
    n = ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / effect) ** 2
    return max(2, math.ceil(round(n, 9)))  # round: a product that should be whole is not pushed up by float error


def detectable_change(n: int, sd: float, power: float = PILOT_POWER, alpha: float = PILOT_ALPHA) -> float:
    """The smallest paired mean difference ``n`` pilot images find (:func:`pilot_size` solved for the effect)."""
    from scipy.stats import norm

    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / math.sqrt(max(n, 1)))


def pilot_prompts(sets: Sequence[str], study: Sequence[dict], per_set: int = CALIBRATION_PROMPTS) -> list[dict]:
    """``per_set`` prompts of each set that the study does not use (the ones that follow its own)."""
    used = {item["prompt"] for item in study}
    per_study = max(sum(item["set"] == name for item in study) for name in sets)
    wider = study_prompts(sets, (per_study + per_set) * len(sets), 1)
    return [item for item in wider if item["prompt"] not in used]


def pilot_object_set(item: Mapping) -> str:
    """A pilot prompt's sorted (colour, noun) subjects, as :func:`probe.studies.guidance.object_set` reads them
    from the text (not imported: that module imports this one): the cluster the calibration's intervals resample, so
    that a prompt and its swapped word order count once."""
    colours = list(item.get("colours") or []) or [""] * len(item["nouns"])
    return " & ".join(sorted(f"{c} {n}".strip() for c, n in zip(colours, item["nouns"])))


def pilot_differences(pipe, methods: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int], *, steps: int,
                      candidates: Sequence[float], progress: bool = True, store: str | Path | None = None,
                      make: bool = True, **options) -> pd.DataFrame:
    """One row per (candidate, method, prompt, seed): the guided image paired with the unguided one of the same
    prompt and seed (``missing_vs_none``, ``iou_t10_vs_none``, ``iou_end_vs_none``), ``loss_fell``, ``missing``,
    ``mixed``, ``object_set`` and the method's ``criterion`` with its value (``difference``). Kept per image so that
    a pilot can be widened without making its first images again, and its intervals resample object sets.
    ``store``: a CSV that keeps the pilot's images (one row per step size), so that a resumed or sharded study makes
    none of them again (``make=False``: all must be there)."""
    kept = {"store": store, "by_step": True, "make": make}
    sets = {item["prompt"]: pilot_object_set(item) for item in prompts}
    plain = guided_images(pipe, prompts, seeds, [(NO_GUIDANCE, False)], steps=steps, progress=False, **kept,
                          **options)
    plain = plain.set_index(["prompt", "seed"])[["missing", "soft_iou_t10", "soft_iou_end"]]
    frames = []
    for scale in tqdm(candidates, desc="step sizes", disable=not progress):
        images = guided_images(pipe, prompts, seeds, [(m, False) for m in methods], steps=steps, progress=False,
                               step_sizes=dict.fromkeys(methods, float(scale)), **kept, **options)
        paired = images.join(plain, on=["prompt", "seed"], rsuffix="_none")
        frame = pd.DataFrame({
            "method": paired.method, "scale_factor": float(scale), "prompt": paired.prompt, "seed": paired.seed,
            "object_set": paired.prompt.map(sets),
            "missing_vs_none": paired.missing.astype(float) - paired.missing_none.astype(float),
            "iou_t10_vs_none": paired.soft_iou_t10 - paired.soft_iou_t10_none,
            "iou_end_vs_none": paired.soft_iou_end - paired.soft_iou_end_none,
            "loss_fell": (paired.loss_end < paired.loss_start).astype(float),
            "missing": paired.missing.astype(float), "mixed": paired.mixed.astype(float)})
        frame["criterion"] = frame.method.map(criterion_of)
        frame["difference"] = [frame.at[i, c] for i, c in frame.criterion.items()]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


CALIBRATION_COLUMNS = ["method", "scale_factor", "n", "loss_fell", "missing_vs_none", "iou_t10_vs_none",
                       "iou_end_vs_none", "missing", "mixed", "criterion", "criterion_mean", "criterion_ci_low",
                       "criterion_ci_high", "clear", "chosen"]


def summarise_calibration(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per (method, candidate) of :func:`pilot_differences`' rows: the means, ``n`` images, and the
    criterion's mean with a 95 % interval resampling object sets (a step is chosen on a pilot of a few dozen images,
    so the table says how sure the choice is). ``chosen``: per method the lowest criterion mean (the larger step on a
    tie); ``clear``: its interval lies below 0 (the step lowers the criterion beyond the pilot's noise)."""
    out = []
    for (method, scale), part in rows.groupby(["method", "scale_factor"], sort=False):
        mean, low, high = mean_interval(part.difference, part.object_set, seed=seed)
        out.append({"method": method, "scale_factor": float(scale), "n": len(part),
                    **{c: float(part[c].mean()) for c in ("loss_fell", "missing_vs_none", "iou_t10_vs_none",
                                                          "iou_end_vs_none", "missing", "mixed")},
                    "criterion": part.criterion.iloc[0], "criterion_mean": mean, "criterion_ci_low": low,
                    "criterion_ci_high": high, "clear": bool(high < 0)})
    table = pd.DataFrame(out, columns=CALIBRATION_COLUMNS[:-1])
    score = table.assign(score=[table.at[i, c] for i, c in table.criterion.items()])  # unrounded criterion_mean
    best = score.sort_values(["score", "scale_factor"], ascending=[True, False]).groupby("method").head(1)
    table["chosen"] = table.index.isin(best.index)
    return table[CALIBRATION_COLUMNS]


def calibrate_steps(pipe, methods: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int], *, steps: int,
                    candidates: Sequence[float] = STEP_CANDIDATES, keep: Sequence[str] = (),
                    progress: bool = True, **options) -> pd.DataFrame:
    """Each guided method's step size (``Schedule.scale_factor``), chosen on pilot prompts before the study.

    A published step suits the model it was published for. On the built-in model A&E's step (20) drives its loss
    to the thresholds yet loses as many subjects as it restores, and an overlap loss at that step *raises* soft IoU
    at step 10 while its own value falls. For every candidate, each method's pilot images are paired with unguided
    ones on the same (prompt, seed): ``missing_vs_none``, ``iou_t10_vs_none`` / ``iou_end_vs_none``, ``loss_fell``
    (share of images whose objective fell), missing and mixing; its criterion (:data:`CRITERIA`) with a 95 %
    interval over object sets (``criterion_mean``, ``criterion_ci_low``, ``criterion_ci_high``). ``chosen`` marks,
    per method, the candidate that lowers its criterion most (the larger step on a tie), ``clear`` whether that
    candidate's interval lies below 0 (:func:`summarise_calibration`); methods in ``keep`` run at the schedule's
    own step and are not calibrated. ``options``: as :func:`guided_images` (schedule, judge, guidance_scale,
    subject, initno_settings).
    """
    if not prompts:
        raise ValueError("no pilot prompts to calibrate the step sizes on")
    tuned = [m for m in dict.fromkeys(methods) if m != NO_GUIDANCE and m not in keep]
    if not tuned:
        return pd.DataFrame(columns=CALIBRATION_COLUMNS)
    return summarise_calibration(pilot_differences(pipe, tuned, prompts, seeds, steps=steps, candidates=candidates,
                                                   progress=progress, **options))


def chosen_steps(calibration: pd.DataFrame) -> dict[str, float]:
    """{method: scale_factor} of :func:`calibrate_steps`' chosen rows."""
    chosen = calibration[calibration.chosen.astype(bool)]
    return dict(zip(chosen.method, chosen.scale_factor.astype(float)))


def pooled_sd(rows: pd.DataFrame) -> float:
    """The pooled SD of the criterion's paired differences over (method, candidate) cells of a pilot: the spread a
    candidate's mean is read against, whichever candidate is chosen (0 where no cell has two images)."""
    cells = rows.groupby(["method", "scale_factor"]).difference
    dof = (cells.count() - 1).clip(lower=0)
    return float(math.sqrt((cells.var(ddof=1).fillna(0) * dof).sum() / dof.sum())) if dof.sum() > 0 else 0.0


def widest_pilot(sets: Sequence[str], study: Sequence[dict], per_set: int, least: int) -> list[dict]:
    """:func:`pilot_prompts` at ``per_set``, or, where the sets hold fewer distinct prompts, the most they hold
    (searched down to ``least`` per set)."""
    try:
        return pilot_prompts(sets, study, per_set)
    except ValueError:
        pass
    low, high = least, per_set  # low holds, high does not
    while high - low > 1:
        middle = (low + high) // 2
        try:
            pilot_prompts(sets, study, middle)
            low = middle
        except ValueError:
            high = middle
    return pilot_prompts(sets, study, low)


def calibrate_group(pipe, group: Sequence[str], sets: Sequence[str], study: Sequence[dict], seeds: Sequence[int], *,
                    steps: int, candidates: Sequence[float], quick: bool, progress: bool,
                    min_effects: Mapping[str, float] | None = None, **options) -> pd.DataFrame | None:
    """:func:`calibrate_steps` for methods of one criterion, on a pilot sized by :func:`pilot_size`: a first pilot of
    :data:`CALIBRATION_PROMPTS` per set (one when ``quick``, which stops there) gives the criterion's SD, and the
    pilot is widened to the prompts that find :data:`MIN_EFFECTS` at :data:`PILOT_POWER`. None where the sets hold
    no prompt beyond the study's. ``min_effects``: per criterion, the smallest change the pilot must find (default
    :data:`MIN_EFFECTS`; a registration fixes its own). The table carries ``pilot_sd`` and ``pilot_planned`` (the
    rule's size)."""
    effects = {**MIN_EFFECTS, **(min_effects or {})}
    first = pilot_prompts(sets, study, 1 if quick else CALIBRATION_PROMPTS)
    if not first:  # a small prompt set of the user's, all of it in the study
        warnings.warn(f"no prompts beyond the study's to calibrate {list(group)} on: they run at the schedule's "
                      "step (pass step_sizes to choose it)", stacklevel=3)
        return None
    run = dict(steps=steps, candidates=candidates, **options)
    rows = pilot_differences(pipe, group, first, seeds, progress=progress, **run)
    sd, criterion = pooled_sd(rows), criterion_of(group[0])
    planned = len(first) if quick else pilot_size(sd, effects[criterion])
    if planned > len(first):
        least = 1 if quick else CALIBRATION_PROMPTS
        wider = widest_pilot(sets, study, math.ceil(planned / len(sets)), least)
        known = {item["prompt"] for item in first}
        extra = [item for item in wider if item["prompt"] not in known]
        if extra:
            rows = pd.concat([rows, pilot_differences(pipe, group, extra, seeds, progress=progress, **run)],
                             ignore_index=True)
        if len(first) + len(extra) < planned:
            held = len(first) + len(extra)
            warnings.warn(f"{criterion}: the power rule asks for {planned} pilot prompts (SD {sd:.3g}, smallest "
                          f"change {effects[criterion]:g}) but the sets hold {held} beyond the study's: the "
                          f"pilot finds changes of {detectable_change(held, sd):.3g} or more", stacklevel=3)
    table = summarise_calibration(rows)
    return table.assign(pilot_sd=sd, pilot_planned=planned)


def study_steps(pipe, methods: Sequence[str], sets: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int], *,
                steps: int, step_sizes: Mapping[str, float] | None, quick: bool, progress: bool = True,
                min_effects: Mapping[str, float] | None = None, pilot_store: str | Path | None = None,
                make: bool = True, **options) -> tuple[dict[str, float], pd.DataFrame]:
    """The step sizes a study runs at: ``step_sizes`` where given, else :func:`calibrate_steps` on pilot prompts the
    study does not use, at its first seed, A&E and the overlap objectives apart (their criteria differ) but by one
    rule (:func:`calibrate_group`: a first pilot measures the criterion's spread, :func:`pilot_size` says how many
    prompts find :data:`MIN_EFFECTS`). ``pilot_store``: where the pilot's images are kept (:func:`pilot_differences`);
    ``make=False``: they must all be there. Returns them and the calibration table (empty where they were given)."""
    unknown = sorted(set(min_effects or {}) - set(MIN_EFFECTS))
    if unknown:
        raise ValueError(f"min_effects names criteria {unknown}; the calibration's criteria are {sorted(MIN_EFFECTS)}")
    if step_sizes is not None:
        return {m: float(v) for m, v in step_sizes.items()}, pd.DataFrame()
    candidates = QUICK_STEP_CANDIDATES if quick else STEP_CANDIDATES
    groups = [[m for m in methods if m == BASELINE], [m for m in methods if m not in (BASELINE, NO_GUIDANCE)]]
    tables = [calibrate_group(pipe, group, sets, prompts, list(seeds)[:1], steps=steps, candidates=candidates,
                              quick=quick, progress=progress, min_effects=min_effects, store=pilot_store,
                              make=make, **options)
              for group in groups if group]
    tables = [table for table in tables if table is not None]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    chosen = chosen_steps(table) if tables else {}
    if progress and chosen:
        counts = " / ".join(str(t.groupby("method").n.first().iloc[0]) for t in tables)
        clear = ", ".join(f"{row.method} {row.scale_factor:g} ({row.criterion_mean:+.3g} "
                          f"[{row.criterion_ci_low:+.3g}, {row.criterion_ci_high:+.3g}])"
                          for row in table[table.chosen].itertuples())
        print(f"step sizes chosen on {counts} pilot images: {clear} (pass step_sizes={chosen!r} to skip the "
              "calibration)")
    return chosen, table


TYPICAL_SD = {"missing_vs_none": 0.434, OVERLAP_CRITERION: 0.067}  # the built-in model's, on its 540-pair table
DEFAULT_SECONDS = 20.0  # a guided Stable Diffusion 1.5 image at 50 steps on one GPU, before a --quick run measures it


def study_plan(sets: Sequence[str], n_images: int, seeds_per_prompt: int, configs: Sequence[tuple[str, bool]], *,
               step_sizes: Mapping[str, float] | None = None, min_effects: Mapping[str, float] | None = None,
               seconds_per_image: float = DEFAULT_SECONDS) -> pd.DataFrame:
    """What a guided study will make, before anything loads: one row per arm (its images), the step-size pilot
    (its expected images: :func:`pilot_size` at :data:`TYPICAL_SD`, capped at the prompts the sets hold beyond the
    study's; the first pilot measures the model's own spread, so the real count may differ), and the total, each
    with its hours at ``seconds_per_image``."""
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    pairs = len(prompts) * seeds_per_prompt
    rows = [{"part": f"{method}{' + INITNO' if initno else ''}", "images": pairs} for method, initno in configs]
    methods = list(dict.fromkeys(m for m, _ in configs if m != NO_GUIDANCE))
    effects = {**MIN_EFFECTS, **(min_effects or {})}
    if step_sizes is None:
        groups = [[m for m in methods if m == BASELINE], [m for m in methods if m != BASELINE]]
        plain = 0
        for group in (g for g in groups if g):
            criterion = criterion_of(group[0])
            planned = max(CALIBRATION_PROMPTS * len(sets), pilot_size(TYPICAL_SD[criterion], effects[criterion]))
            held = len(widest_pilot(sets, prompts, math.ceil(planned / len(sets)), 1))
            if not held:
                rows.append({"part": f"step-size pilot of {', '.join(group)}: none (no prompt beyond the study's; "
                                     "the schedule's step, or step_sizes)", "images": 0})
                continue
            plain = max(plain, min(planned, held))
            rows.append({"part": f"step-size pilot of {', '.join(group)} ({min(planned, held)} prompts × "
                                 f"{len(STEP_CANDIDATES)} steps)",
                         "images": min(planned, held) * len(STEP_CANDIDATES) * len(group)})
        if plain:
            rows.append({"part": f"step-size pilot, unguided ({plain} prompts)", "images": plain})
    rows.append({"part": "total", "images": sum(r["images"] for r in rows)})
    plan = pd.DataFrame(rows).assign(hours=lambda t: (t.images * seconds_per_image / 3600).round(1))
    plan.attrs.update(asked=n_images, pairs=pairs)  # the pairs per arm asked for, and those the sets hold
    return plan
