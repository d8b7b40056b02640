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
from dataclasses import asdict, replace
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
from probe.studies.common import ImageRows, Judge, Subject, judged, nearest_grid, settings_id
from probe.studies.overlap import METRICS, pair_metrics
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


def guided_images(pipe, prompts: Sequence[dict], seeds: Sequence[int], configs: Sequence[tuple[str, bool]], *,
                  steps: int, guidance_scale: float = GUIDANCE, subject: Subject = "noun",
                  judge: Judge = exact_judge, schedule: Schedule | None = None,
                  initno_settings: InitNO | None = None, step_sizes: Mapping[str, float] | None = None,
                  progress: bool = True, desc: str = "guidance", store: str | Path | None = None) -> pd.DataFrame:
    """One row per (prompt, seed, method, initno): judge's verdict, overlap at ``t10`` and at the end, seconds.

    Every configuration runs through :func:`probe.steer.guide.generate` (``none`` with a schedule that never moves the
    latent); the images of one (prompt, seed) are made back to back so that a busy machine slows all methods alike.
    Overlap: the layer-and-head mean attention of the real pass at the cross-attention grid closest to 16×16
    (:class:`RealPassMaps`), measured with :func:`subject_metrics`. ``subject``: "noun" or "colour" words.
    ``schedule``: the guidance schedule at 50 steps (default: Attend-and-Excite's), scaled by :func:`scaled_schedule`;
    ``step_sizes``: its ``scale_factor`` per method (:func:`calibrate_steps`), the schedule's own for the others.
    ``store``: a CSV (:class:`ImageRows`) that keeps the rows as they are made: a stopped run started again with
    the same settings and weights skips the images it already has (a guided method's only where they were made at
    its step size, so runs with other methods or other step sizes share one table).
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
    jobs = [(p, s, c) for p in prompts for s in seeds for c in configs]
    keys = [(item["prompt"], seed, method, initno) for item, seed, (method, initno) in jobs]
    rows = ImageRows(store, settings_id(weights=weights_id(pipe), steps=steps, guidance_scale=guidance_scale,
                                        subject=subject, schedule=asdict(schedule), initno=asdict(settings),
                                        judge=getattr(judge, "__qualname__", repr(judge))), keys)
    step_of = {m: math.nan if m == NO_GUIDANCE else sched.scale_factor for m, sched in schedules.items()}

    def reusable(key: tuple) -> bool:  # a stored row counts only if it was made at this run's step for its method
        row = rows.get(key)
        return row is not None and (key[2] == NO_GUIDANCE or math.isclose(float(row.get("step_size", math.nan)),
                                                                           step_of[key[2]]))

    todo = [(job, key) for job, key in zip(jobs, keys) if not reusable(key)]
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
        maps = capture.maps
        loss_start, loss_end = result.objective_span
        row = {"method": method, "initno": initno, "set": item["set"], "prompt": item["prompt"], "seed": seed,
               **judged(image, item["prompt"], judge), "seconds": seconds, "step_size": step_of[method],
               "loss_start": loss_start, "loss_end": loss_end}
        for label, step in read_at.items():
            found = maps.get(step)
            if found is None or set(found) != {"cross", "self"}:
                raise RuntimeError(f"no real-pass attention at step {step} of {steps}; was the tap bypassed?")
            cross, selfattn = (found[kind].reshape(height, width, -1) for kind in ("cross", "self"))
            values = subject_metrics(cross, selfattn, indices, words_at)
            row.update({f"{name}_{label}": value for name, value in values.items()})
        rows.add(row)
    rows.save()
    frame = pd.DataFrame([rows.get(key) for key in keys])
    frame.attrs.update({"steps": steps, "t10_step": read_at["t10"], "end_step": read_at["end"], "grid": grid,
                        "reused_seconds": reused_seconds})
    return frame



STEP_CANDIDATES = (20.0, 5.0, 1.0, 0.2, 0.05)  # A&E's published step (20) and smaller ones
CALIBRATION_PROMPTS = 4  # pilot prompts per set for an overlap objective, taken after the study's own
BASELINE_CALIBRATION_PROMPTS = 30  # A&E's criterion is a binary outcome (missing), so it needs more
QUICK_STEP_CANDIDATES = (20.0, 0.2)
# the calibration column a method's step minimises: A&E targets missing subjects, an overlap objective its maps'
# overlap at step 10 (the manipulation its study tests)
CRITERIA = {BASELINE: "missing_vs_none"}
OVERLAP_CRITERION = "iou_t10_vs_none"


def pilot_prompts(sets: Sequence[str], study: Sequence[dict], per_set: int = CALIBRATION_PROMPTS) -> list[dict]:
    """``per_set`` prompts of each set that the study does not use (the ones that follow its own)."""
    used = {item["prompt"] for item in study}
    per_study = max(sum(item["set"] == name for item in study) for name in sets)
    wider = study_prompts(sets, (per_study + per_set) * len(sets), 1)
    return [item for item in wider if item["prompt"] not in used]


def calibrate_steps(pipe, methods: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int], *, steps: int,
                    candidates: Sequence[float] = STEP_CANDIDATES, keep: Sequence[str] = (),
                    progress: bool = True, **options) -> pd.DataFrame:
    """Each guided method's step size (``Schedule.scale_factor``), chosen on pilot prompts before the study.

    A published step suits the model it was published for. On the built-in model A&E's step (20) drives its loss
    to the thresholds yet loses as many subjects as it restores, and an overlap loss at that step *raises* soft IoU
    at step 10 while its own value falls. For every candidate, each method's pilot images are paired with unguided
    ones on the same (prompt, seed): ``missing_vs_none``, ``iou_t10_vs_none`` / ``iou_end_vs_none``, ``loss_fell``
    (share of images whose objective fell), missing and mixing. ``chosen`` marks, per method, the candidate that
    lowers its criterion (:data:`CRITERIA`) most (the larger step on a tie); methods in ``keep`` run at the
    schedule's own step and are not calibrated. ``options``: as :func:`guided_images` (schedule, judge,
    guidance_scale, subject, initno_settings).
    """
    if not prompts:
        raise ValueError("no pilot prompts to calibrate the step sizes on")
    tuned = [m for m in dict.fromkeys(methods) if m != NO_GUIDANCE and m not in keep]
    columns = ["method", "scale_factor", "n", "loss_fell", "missing_vs_none", "iou_t10_vs_none", "iou_end_vs_none",
               "missing", "mixed", "criterion", "chosen"]
    if not tuned:
        return pd.DataFrame(columns=columns)
    plain = guided_images(pipe, prompts, seeds, [(NO_GUIDANCE, False)], steps=steps, progress=False, **options)
    plain = plain.set_index(["prompt", "seed"])
    rows = []
    for scale in tqdm(candidates, desc="step sizes", disable=not progress):
        images = guided_images(pipe, prompts, seeds, [(m, False) for m in tuned], steps=steps, progress=False,
                               step_sizes=dict.fromkeys(tuned, float(scale)), **options)
        for method, frame in images.groupby("method", sort=False):
            paired = frame.join(plain[["missing", "soft_iou_t10", "soft_iou_end"]], on=["prompt", "seed"],
                                rsuffix="_none")
            rows.append({"method": method, "scale_factor": float(scale), "n": len(frame),
                         "loss_fell": float((frame.loss_end < frame.loss_start).mean()),
                         "missing_vs_none": float((paired.missing.astype(float) - paired.missing_none).mean()),
                         "iou_t10_vs_none": float((paired.soft_iou_t10 - paired.soft_iou_t10_none).mean()),
                         "iou_end_vs_none": float((paired.soft_iou_end - paired.soft_iou_end_none).mean()),
                         "missing": float(frame.missing.mean()), "mixed": float(frame.mixed.mean()),
                         "criterion": CRITERIA.get(method, OVERLAP_CRITERION)})
            rows[-1]["score"] = rows[-1][rows[-1]["criterion"]]
    table = pd.DataFrame(rows)
    best = table.sort_values(["score", "scale_factor"], ascending=[True, False]).groupby("method").head(1)
    table["chosen"] = table.index.isin(best.index)
    return table[columns]


def chosen_steps(calibration: pd.DataFrame) -> dict[str, float]:
    """{method: scale_factor} of :func:`calibrate_steps`' chosen rows."""
    chosen = calibration[calibration.chosen.astype(bool)]
    return dict(zip(chosen.method, chosen.scale_factor.astype(float)))


def study_steps(pipe, methods: Sequence[str], sets: Sequence[str], prompts: Sequence[dict], seeds: Sequence[int], *,
                steps: int, step_sizes: Mapping[str, float] | None, quick: bool, progress: bool = True,
                **options) -> tuple[dict[str, float], pd.DataFrame]:
    """The step sizes a study runs at: ``step_sizes`` where given, else :func:`calibrate_steps` on pilot prompts
    (:func:`pilot_prompts`: :data:`BASELINE_CALIBRATION_PROMPTS` per set for A&E, :data:`CALIBRATION_PROMPTS` for
    the others, one when ``quick``) at the study's first seed. Returns them and the calibration table (empty where
    they were given)."""
    if step_sizes is not None:
        return {m: float(v) for m, v in step_sizes.items()}, pd.DataFrame()
    candidates = QUICK_STEP_CANDIDATES if quick else STEP_CANDIDATES
    groups = [([m for m in methods if m == BASELINE], BASELINE_CALIBRATION_PROMPTS),
              ([m for m in methods if m not in (BASELINE, NO_GUIDANCE)], CALIBRATION_PROMPTS)]
    tables, counts = [], []
    for group, per_set in groups:
        if group:
            pilot = pilot_prompts(sets, prompts, 1 if quick else per_set)
            if not pilot:  # a small prompt set of the user's, all of it in the study
                warnings.warn(f"no prompts beyond the study's to calibrate {group} on: they run at the schedule's "
                              "step (pass step_sizes to choose it)", stacklevel=2)
                continue
            counts.append(len(pilot))
            tables.append(calibrate_steps(pipe, group, pilot, list(seeds)[:1], steps=steps, progress=progress,
                                          candidates=candidates, **options))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    chosen = chosen_steps(table) if tables else {}
    if progress and chosen:
        print("step sizes chosen on", " / ".join(map(str, counts)), "pilot prompts:",
              ", ".join(f"{m} {v:g}" for m, v in chosen.items()),
              f"(pass step_sizes={chosen!r} to skip the calibration)")
    return chosen, table
