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
from probe.studies.common import ImageRows, Judge, cell_differences, judged, settings_id
from probe.studies.intervention.analysis import (  # noqa: F401 (the study's names, read as probe.studies.intervention.X)
    EXPLORATORY,
    MANIPULATION_TOLERANCE,
    answer,
    arm_summary,
    contrast,
    dose_response,
    guidance_pairs,
    manipulation_holds,
    mediated_share,
    primary_family,
    relative_manipulation,
    relative_timing_answer,
    timing_answer,
    timing_family,
    unit_slopes,
)
from probe.studies.intervention.design import (  # noqa: F401
    ALPHA,
    CATEGORIES,
    COMMON_STEP,
    DOSES,
    EARLY,
    EFFECT_POINTS,
    GRIDS,
    INTERVENTION_SEED,
    PILOT_SETS,
    POWER,
    REGISTRATION,
    REGISTRATIONS,
    WINDOWS,
    Arm,
    category,
    check_registered,
    design,
    detectable_points,
    draw_units,
    e1_arms,
    e2_arms,
    e2b_arms,
    e3_arms,
    intervened_layers,
    object_sets,
    prompt_units,
    registration,
    unit_angle,
    units_for_power,
)
from probe.studies.registry import Study, register
from probe.studies.shards import in_shard, run_processes, shard_of, shard_path, without_option
from probe.tap import Tap


def _summary(checks: list[dict]) -> dict:
    """Means over a unit's intervened calls of what the manipulation check measured."""
    if not checks:
        return {}
    frame = pd.DataFrame(checks)
    out = {"iou_before": frame.iou_before.mean(), "iou_after": frame.iou_after.mean(),
           "iou_ratio": (frame.iou_after / frame.iou_before.where(frame.iou_before > 0)).mean(),
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
    layers = intervened_layers(pipe)
    keys = [(u.prompt, int(u.seed), arm.name, False) for u in units.itertuples() for arm in arms]
    rows = ImageRows(store, settings_id(weights=weights_id(pipe), steps=steps, guidance_scale=guidance_scale,
                                        experiment=experiment, arms=[a.settings() for a in arms], grids=GRIDS,
                                        judge=getattr(judge, "__qualname__", repr(judge))), keys)
    todo = [(k, u) for k, u in enumerate(units.itertuples())
            if in_shard(k, shard) and any(rows.get((u.prompt, int(u.seed), a.name, False))
                                                                    is None for a in arms)]
    device = pipe._execution_device
    for k, unit in tqdm(todo, desc=experiment, disable=not progress):
        columns, _ = subject_keys(pipe, unit.prompt, list(unit.subjects))
        angle = unit_angle(unit.set_id, unit.seed)
        plans = [Unit(tuple(columns), arm.dose, angle, arm.steps(steps), arm.relative) for arm in arms]
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
                   "relative": arm.relative,
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



KINDS = {"e1": "dose_response", "e2": "timing"}  # the first registration's experiments name no analysis


def kind(experiment: str, registered: str | Path | None = None) -> str:
    """Which registered analysis an experiment has: dose_response, timing, timing_relative or factorial
    (``registered``: one registration file, else every one of the study's)."""
    return registration(registered)["experiments"][experiment].get("analysis", KINDS.get(experiment, "timing"))


def family_of(experiment: str, rows: pd.DataFrame, n_boot: int = 2000, registered: str | Path | None = None
              ) -> pd.DataFrame:
    """The experiment's registered family table (its tests, Holm-adjusted where registered)."""
    from probe.studies.intervention.factorial import factorial_family

    return {"dose_response": primary_family, "timing": timing_family, "timing_relative": timing_family,
            "factorial": factorial_family}[kind(experiment, registered)](rows, n_boot)


def read_experiment(experiment: str, out: Path) -> tuple[pd.DataFrame, bool]:
    """An experiment's per-image table from ``out`` (its shards merged), and whether it came from shards."""
    name = f"intervention_{experiment}_images"
    parts = sorted(out.glob(f"{name}_shard*of*.csv"))
    tables = [pd.read_csv(p) for p in (parts or ([out / f"{name}.csv"] if (out / f"{name}.csv").exists() else []))]
    if not tables:
        raise FileNotFoundError(f"no {name}.csv (or shards) in {out}: run the experiment first")
    return (merge(tables) if len(tables) > 1 else tables[0]), len(tables) > 1


def analyse(experiment: str, out: str | Path = "figures", n_boot: int = 2000, registered: str | Path | None = None
            ) -> dict:
    """The registered analysis of a whole experiment: its table (the shards merged into it where there are shards),
    family, per-arm summary, figure and answer, written beside the table. Refused before the registered size is
    complete."""
    from probe.writes import write_csv, write_text

    out = Path(out)
    rows, sharded = read_experiment(experiment, out)
    check_registered(rows, experiment, registered)
    if sharded:
        write_csv(rows, out / f"intervention_{experiment}_images.csv", float_format="%.6g")
    summary = arm_summary(rows, n_boot)
    family = family_of(experiment, rows, n_boot, registered)
    write_csv(summary, out / f"intervention_{experiment}_summary.csv", float_format="%.6g")
    write_csv(family, out / f"intervention_{experiment}_family.csv", float_format="%.6g")
    found = {"rows": rows, "summary": summary, "family": family,
             "answer": _answer(experiment, rows, summary, family, out, n_boot, registered)}
    write_text(out / f"intervention_{experiment}_answer.md", found["answer"] + "\n")
    return found


def _answer(experiment: str, rows: pd.DataFrame, summary: pd.DataFrame, family: pd.DataFrame, out: Path,
            n_boot: int, registered: str | Path | None = None) -> str:
    """The experiment's answer paragraph and figure (with the mediated share where the tables for it exist)."""
    from probe import plots
    from probe.studies.common import save_figures
    from probe.studies.intervention.factorial import factorial_answer, factorial_pairs
    from probe.writes import write_csv

    spec, analysis = registration(registered)["experiments"][experiment], kind(experiment, registered)
    if analysis == "timing":
        return timing_answer(family, summary)
    if analysis == "timing_relative":
        figure = plots.arm_outcomes(summary, title="overlap moved per window")
        save_figures({f"intervention_{experiment}_windows": figure}, out)
        e1_family = out / "intervention_e1_family.csv"
        slope = None
        if e1_family.exists():
            table = pd.read_csv(e1_family)
            trend = table[table.test.str.startswith("trend") & (table.outcome == "all_present")]
            slope = float(trend["points_per_0.1_iou"].iloc[0]) if len(trend) else None
        return relative_timing_answer(family, summary, detectable_points(spec), slope)
    e1 = rows if analysis == "dose_response" else (pd.read_csv(out / "intervention_e1_images.csv")
                                                   if (out / "intervention_e1_images.csv").exists() else None)
    if analysis == "dose_response":
        save_figures({"intervention_dose_response": plots.dose_response(summary)}, out)
        guidance = out / "guidance_images.csv"
        pairs = guidance_pairs(pd.read_csv(guidance)) if guidance.exists() else None
    else:
        save_figures({f"intervention_{experiment}_factorial": plots.arm_outcomes(summary, title="A&E × overlap term")},
                     out)
        pairs = factorial_pairs(rows)
    mediation = mediated_share(e1, pairs, n_boot) if e1 is not None and pairs is not None else None
    if mediation is not None:
        write_csv(pd.DataFrame([mediation]), out / f"intervention_{experiment}_mediation.csv", float_format="%.6g")
    if analysis == "dose_response":
        return answer(family, summary, detectable_points(spec), mediation)
    return factorial_answer(family, detectable_points(spec), mediation,
                            e1_without_floor=e1 is not None and "confidences" not in e1.columns)


PILOTS = {  # pilots of the second registration: the pilot's object sets, seeds apart from every experiment's
    "e2b": {"arms": lambda: e2b_arms((0.5, 2.0)), "seed_offset": 800, "power_arms": ("early x2", "none"),
            "family": 3},
    "e3": {"arms": e3_arms, "seed_offset": 900, "power_arms": ("ae+iou", "ae"), "family": 2},
}


def pilot(experiment: str, pipe="shapes", out: str | Path = "figures", progress: bool = True) -> dict:
    """Run (or resume) an experiment's pilot on the pilot's object sets (never reused) and return its power figures
    (:func:`units_for_power`) and per-arm summary; the table is ``<out>/intervention_pilot_<E>_images.csv``."""
    from probe.studies.intervention.factorial import run_factorial

    plan = PILOTS[experiment]
    units, arms = draw_units(PILOT_SETS, 1, seed_offset=plan["seed_offset"]), plan["arms"]()
    store = Path(out) / f"intervention_pilot_{experiment}_images.csv"
    if experiment == "e3":
        rows = run_factorial(pipe, units, arms, step_size=COMMON_STEP, steps=STEPS, store=store,
                             experiment=f"pilot {experiment}", progress=progress)
    else:
        rows = run(pipe, units, arms, experiment=f"pilot {experiment}", steps=STEPS, store=store, progress=progress)
    power = units_for_power(rows, arms=plan["power_arms"], family=plan["family"])
    return {"rows": rows, "summary": arm_summary(rows), "power": power}


def _parser(registered: str | Path | None):
    import argparse

    parser = argparse.ArgumentParser(prog="probe study intervention")
    parser.add_argument("action", choices=("run", "analyse", "pilot"))
    parser.add_argument("experiment", choices=sorted({*registration(registered)["experiments"], *PILOTS}))
    parser.add_argument("--shard", default=None, metavar="I/N", help="I/N, or auto (RANK/WORLD_SIZE of a launcher)")
    parser.add_argument("--processes", type=int, default=1, help="run as this many shards at once, then stop")
    parser.add_argument("--registration", default=None, help="a registration file (default: the study's own)")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--out", default="figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``probe study intervention run E [--shard I/N|auto] [--processes N] [--model DIR] [--out figures]
    [--registration FILE]`` (or ``python -m probe.studies.intervention run E …``): run (or resume) a registered
    experiment into ``<out>/intervention_<E>_images.csv`` (a shard: ``…_shard<I>of<N>.csv``); ``… analyse E``: its
    registered analysis, once every registered image is made; ``… pilot E``: the pilot a registration is sized on.
    The study's command line, registered on its :class:`Study`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    found_file = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--registration"]
    registered = found_file[-1] if found_file else None
    parser = _parser(registered)
    args = parser.parse_args(argv)
    try:
        shard = shard_of(args.shard)
    except ValueError as error:
        parser.error(str(error))
    if args.action == "pilot":
        found = pilot(args.experiment, args.model, args.out)
        print(found["summary"].to_string(index=False))
        print(found["power"])
        return 0
    if args.experiment not in registration(registered)["experiments"]:
        parser.error(f"{args.experiment} has a pilot but no registration yet: register it before it runs")
    if args.action == "analyse":
        found = analyse(args.experiment, args.out, registered=registered)
        print(found["family"].to_string(index=False))
        print(found["answer"])
        return 0
    if args.processes > 1:
        if shard is not None:
            parser.error("give --processes or --shard, not both")
        return run_processes(["-m", "probe.studies.intervention", *without_option(argv, "--processes")], args.processes)
    _run_registered(args.experiment, args.model, Path(args.out), shard, registered)
    return 0


def _run_registered(experiment: str, model, out: Path, shard: tuple[int, int] | None,
                    registered: str | Path | None) -> pd.DataFrame:
    """Run (or resume) one registered experiment, or one shard of it, into its table in ``out``."""
    from probe.judges import judge_from_spec

    units, arms, spec = design(experiment, registered)
    store = shard_path(out / f"intervention_{experiment}_images.csv", shard)
    judge = judge_from_spec(spec["judge"]) if spec.get("judge") else exact_judge  # the registration's instrument
    if kind(experiment, registered) == "factorial":
        from probe.studies.intervention.factorial import run_factorial

        rows = run_factorial(model, units, arms, step_size=spec["step_size"], steps=spec["steps"], store=store,
                             shard=shard, experiment=experiment, judge=judge)
    else:
        rows = run(model, units, arms, experiment=experiment, steps=spec["steps"], store=store, shard=shard,
                   judge=judge)
    print(f"{len(rows)} registered images in {store}")
    return rows


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
        fresh = {"summary": arm_summary(rows), "family": family_of(experiment, rows)}
        for what, path in kept.items():
            problems += cell_differences(f"intervention {experiment} {what}", pd.read_csv(path), fresh[what], rtol,
                                         atol)
    return problems


ANSWER_LABELS = {"e1": "E1, dose–response", "e2": "E2, timing at one soft IoU", "e2b": "E2b, timing at each "
                 "window's own overlap", "e3": "E3, A&E term × overlap term"}
TITLE = "Intervention: does moving the subjects' maps' overlap change entity missing?"


def index_section(out: str | Path = "figures") -> str | None:
    """The study's section of ``figures/README.md``: its registrations, commands, figures and one answer paragraph
    made of each analysed experiment's answer (the files ``analyse`` wrote), None before any is analysed."""
    out = Path(out)
    answers = {e: (out / f"intervention_{e}_answer.md").read_text().strip() for e in registration()["experiments"]
               if (out / f"intervention_{e}_answer.md").exists()}
    if not answers:
        return None
    files = ", ".join(f"`figures/{p.name}`" for p in REGISTRATIONS if p.exists())
    figures = [f"![{p.stem}]({p.name})" for p in sorted(out.glob("intervention_*.png"))]
    said = " ".join(f"**{ANSWER_LABELS.get(e, e)}.** {text}" for e, text in answers.items())
    return "\n".join([f"## {TITLE}", "", f"Pre-registered ({files}, each committed before its runs), run and "
                      "analysed by its own commands; the per-image, family and summary tables beside this file.", "",
                      "```\nprobe study intervention run|analyse E [--processes N]\n```", "", *figures, "",
                      f"**Answer.** {said}"])


register(Study(name="intervention", title=TITLE, order=60, in_run_all=False, main=main, differences=differences,
               section=index_section))
