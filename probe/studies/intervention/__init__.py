"""Does attention overlap cause entity missing? A direct intervention on the maps (:mod:`probe.steer.intervene`).

Units are distinct object sets of the built-in world (two objects, distinct shapes and colours) in both word orders,
each with its own seeds; every arm of a unit runs on the same seed, in one batch. Experiments:

- **E1, dose–response**: none (the same explicit-softmax path, nothing moved), sham (the same code, a zero move) and
  :data:`DOSES` of soft IoU, applied in the cross-attention layers nearest 16² and 8² at the first
  :data:`EARLY` share of the steps;
- **E2, timing**: the strongest push apart (the lowest dose) applied only early, in the middle or late.

Outcome per image, three exclusive categories (:func:`category`): all subjects present, any missing, any mixed
(missing first where both). Primary: all present. Each row carries its manipulation check: the soft IoU before and
after the move, each map's mass, peak and spread before and after (means over the intervened calls), the share of
calls where the dose was in reach.
"""


from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from probe.fingerprint import weights_id
from probe.images import to_uint8
from probe.models import load
from probe.prompts import subject_keys
from probe.shapes.judge import judge as exact_judge
from probe.shapes.settings import GUIDANCE, STEPS
from probe.steer.intervene import OverlapShift, Unit
from probe.studies.common import ImageRows, Judge, cell_differences, judged, nearest_grid, settings_id
from probe.studies.intervention.analysis import (  # noqa: F401 (the study's names, read as probe.studies.intervention.X)
    EXPLORATORY,
    MANIPULATION_TOLERANCE,
    answer,
    arm_summary,
    contrast,
    dose_response,
    manipulation_holds,
    mediated_share,
    primary_family,
    timing_answer,
    timing_family,
)
from probe.studies.intervention.design import (  # noqa: F401
    ALPHA,
    CATEGORIES,
    DOSES,
    EARLY,
    EFFECT_POINTS,
    GRIDS,
    INTERVENTION_SEED,
    PILOT_SETS,
    POWER,
    REGISTRATION,
    WINDOWS,
    Arm,
    category,
    check_registered,
    design,
    draw_units,
    e1_arms,
    e2_arms,
    object_sets,
    registration,
    unit_angle,
    units_for_power,
)
from probe.studies.registry import Study, register
from probe.tap import Tap, attention_layers


def _summary(checks: list[dict]) -> dict:
    """Means over a unit's intervened calls of what the manipulation check measured."""
    if not checks:
        return {}
    frame = pd.DataFrame(checks)
    out = {"iou_before": frame.iou_before.mean(), "iou_after": frame.iou_after.mean(),
           "reachable": frame.reachable.astype(float).mean(), "clamped": frame.clamped_queries.mean(),
           "calls": len(frame)}
    for what in ("mass", "peak", "spread"):
        ratios = [frame[f"{what}_{s}_after"] / frame[f"{what}_{s}_before"].where(frame[f"{what}_{s}_before"] != 0)
                  for s in "ab"]
        out[f"{what}_ratio"] = float(pd.concat(ratios).mean())
        out[f"{what}_ratio_worst"] = float(pd.concat(ratios).sub(1).abs().max())
    return out


def run(pipe, units: pd.DataFrame, arms: Sequence[Arm], *, experiment: str, steps: int = STEPS,
        guidance_scale: float = GUIDANCE, judge: Judge = exact_judge, store: str | Path | None = None,
        shard: tuple[int, int] | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per (unit, arm): the judge's verdict, its category and the manipulation check. Every arm of a unit is
    made in one batch from the unit's seed. ``store``: a CSV the rows are kept in as they are made (a stopped run
    resumes); ``shard=(i, n)``: only the units ``k`` with ``k % n == i`` (merge the shards' tables with
    :func:`merge`)."""
    pipe = load(pipe)
    grids = {nearest_grid(pipe, g) for g in GRIDS}  # the built-in model's 16² and 8²; a DiT's one grid
    layers = [la for la in attention_layers(pipe) if la.kind == "cross" and la.grid[0] in grids]
    keys = [(u.prompt, int(u.seed), arm.name, False) for u in units.itertuples() for arm in arms]
    rows = ImageRows(store, settings_id(weights=weights_id(pipe), steps=steps, guidance_scale=guidance_scale,
                                        experiment=experiment, arms=[vars(a) for a in arms], grids=GRIDS,
                                        judge=getattr(judge, "__qualname__", repr(judge))), keys)
    todo = [(k, u) for k, u in enumerate(units.itertuples())
            if (shard is None or k % shard[1] == shard[0]) and any(rows.get((u.prompt, int(u.seed), a.name, False))
                                                                    is None for a in arms)]
    device = pipe._execution_device
    for k, unit in tqdm(todo, desc=experiment, disable=not progress):
        columns, _ = subject_keys(pipe, unit.prompt, list(unit.subjects))
        angle = unit_angle(unit.set_id, unit.seed)
        plans = [Unit(tuple(columns), arm.dose, angle, arm.steps(steps)) for arm in arms]
        start = time.perf_counter()
        with Tap(pipe, [OverlapShift(layers, (), plans)]):
            images = pipe([unit.prompt] * len(arms), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=[torch.Generator(device).manual_seed(int(unit.seed)) for _ in arms],
                          output_type="np").images
        seconds = (time.perf_counter() - start) / len(arms)
        for arm, plan, image in zip(arms, plans, images):
            pixels = to_uint8(image)
            row = {"experiment": experiment, "steps": steps, "unit": k, "set_id": unit.set_id, "order": unit.order,
                   "prompt": unit.prompt, "seed": int(unit.seed), "method": arm.name, "initno": False,
                   "dose": arm.dose if isinstance(arm.dose, float) else math.nan, "window": f"{arm.window}",
                   **judged(pixels, unit.prompt, judge), "seconds": seconds, **_summary(plan.checks)}
            row["category"] = category(row)
            rows.add(row)
    rows.save()
    found = [rows.get(key) for key in keys]
    return pd.DataFrame([r for r in found if r is not None])


def merge(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The shards' rows as one process's table: the same rows in unit and arm order."""
    frame = pd.concat(tables, ignore_index=True)
    if frame.duplicated(["unit", "method"]).any():
        raise ValueError("the shards overlap: a (unit, arm) row occurs twice")
    order = {m: i for i, m in enumerate(dict.fromkeys(frame.method))}
    return frame.assign(_arm=frame.method.map(order)).sort_values(["unit", "_arm"]).drop(columns="_arm").reset_index(
        drop=True)



def analyse(experiment: str, out: str | Path = "figures", n_boot: int = 2000) -> dict:
    """The registered analysis of a whole experiment: its table (the shards merged into it where there are shards),
    family, per-arm summary, figure and, for E1, the answer; written beside the table. Refused before the
    registered size is complete."""
    from probe import plots
    from probe.studies.common import save_figures
    from probe.writes import write_csv, write_text

    out = Path(out)
    name = f"intervention_{experiment}_images"
    parts = sorted(out.glob(f"{name}_shard*of*.csv"))
    tables = [pd.read_csv(p) for p in (parts or ([out / f"{name}.csv"] if (out / f"{name}.csv").exists() else []))]
    if not tables:
        raise FileNotFoundError(f"no {name}.csv (or shards) in {out}: run the experiment first")
    rows = merge(tables) if len(tables) > 1 else tables[0]
    check_registered(rows, experiment)
    if len(tables) > 1:
        write_csv(rows, out / f"{name}.csv", float_format="%.6g")
    summary = arm_summary(rows, n_boot)
    family = primary_family(rows, n_boot) if experiment == "e1" else timing_family(rows, n_boot)
    write_csv(summary, out / f"intervention_{experiment}_summary.csv", float_format="%.6g")
    write_csv(family, out / f"intervention_{experiment}_family.csv", float_format="%.6g")
    found = {"rows": rows, "summary": summary, "family": family}
    if experiment == "e2":
        found["answer"] = timing_answer(family, summary)
        write_text(out / "intervention_e2_answer.md", found["answer"] + "\n")
    if experiment == "e1":
        save_figures({"intervention_dose_response": plots.dose_response(summary)}, out)
        spec = registration()
        detectable = _detectable(spec)
        guidance = out / "guidance_images.csv"
        mediation = mediated_share(rows, pd.read_csv(guidance), n_boot) if guidance.exists() else None
        if mediation is not None:
            write_csv(pd.DataFrame([mediation]), out / "intervention_e1_mediation.csv", float_format="%.6g")
        found["answer"] = answer(family, summary, detectable, mediation)
        write_text(out / "intervention_e1_answer.md", found["answer"] + "\n")
    return found


def _detectable(spec: dict) -> float:
    """The extreme-dose difference E1's registered size detects (points), from the pilot's figures it records."""
    from scipy.stats import norm

    e1, pilot = spec["experiments"]["e1"], spec["pilot"]
    units, per_set = e1["sets"] * 2 * e1["seeds_per_order"], 2 * e1["seeds_per_order"]
    design = 1 + (per_set - 1) * pilot["icc"]
    z = norm.ppf(1 - e1["alpha"] / len(e1["family"]) / 2) + norm.ppf(POWER)
    return float(z * pilot["sd_points"] * math.sqrt(design / units))


def main(argv: Sequence[str] | None = None) -> int:
    """``probe study intervention run E [--shard I/N] [--model DIR] [--out figures]`` (or ``python -m
    probe.studies.intervention run E …``): run (or resume) a registered experiment into
    ``<out>/intervention_<E>_images.csv`` (a shard: ``…_shard<I>of<N>.csv``); ``… analyse E``: its registered
    analysis, once every registered image is made. The study's command line, registered on its :class:`Study`."""
    import argparse

    parser = argparse.ArgumentParser(prog="probe study intervention")
    parser.add_argument("action", choices=("run", "analyse"))
    parser.add_argument("experiment", choices=sorted(registration()["experiments"]))
    parser.add_argument("--shard", default=None, metavar="I/N")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)
    if args.action == "analyse":
        found = analyse(args.experiment, args.out)
        print(found["family"].to_string(index=False))
        print(found.get("answer", ""))
        return 0
    units, arms, spec = design(args.experiment)
    shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else None
    name = f"intervention_{args.experiment}_images" + (f"_shard{shard[0]}of{shard[1]}" if shard else "")
    rows = run(args.model, units, arms, experiment=args.experiment, steps=spec["steps"],
               store=Path(args.out) / f"{name}.csv", shard=shard)
    print(f"{len(rows)} registered images in {Path(args.out) / name}.csv")
    return 0






def differences(out: str | Path = "figures", rtol: float = 1e-4, atol: float = 1e-6) -> list[str]:
    """Where a committed family or summary table of an analysed experiment in ``out`` disagrees with the same
    analysis recomputed from its per-image table (``probe figures --check``): one line per differing cell."""
    out, problems = Path(out), []
    for experiment in registration()["experiments"]:
        images = out / f"intervention_{experiment}_images.csv"
        kept = {what: out / f"intervention_{experiment}_{what}.csv" for what in ("family", "summary")}
        if not images.exists() or not all(p.exists() for p in kept.values()):
            continue
        rows = pd.read_csv(images)
        fresh = {"summary": arm_summary(rows),
                 "family": primary_family(rows) if experiment == "e1" else timing_family(rows)}
        for what, path in kept.items():
            problems += cell_differences(f"intervention {experiment} {what}", pd.read_csv(path), fresh[what], rtol,
                                         atol)
    return problems


register(Study(
    name="intervention", title="Intervention: does moving the subjects' maps' overlap change entity missing?",
    order=60, in_run_all=False, main=main, differences=differences))
