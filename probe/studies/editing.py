"""Tuning-free editing: self- vs cross-attention injection (Free-Prompt-Editing's claim)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from probe import plots
from probe.checks import step_count, whole_number
from probe.models import load
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import require_shapes_world
from probe.shapes.settings import STEPS
from probe.steer.edit import DEFAULT_FRACTION, FPE_LAYERS, STEPS_FRACTIONS
from probe.steer.edit import study as edit_sweep
from probe.studies.common import BOOTSTRAPS, QUICK_BOOTSTRAPS, QUICK_STEPS, mean_interval, save_figures
from probe.studies.registry import Study, register

EDIT_SEEDS = 20
QUICK_EDIT_SEEDS = 1
QUICK_EDIT_FRACTIONS = (DEFAULT_FRACTION,)
EDIT_KEYS = ["edit", "origin", "inject", "layer_set", "fraction"]
HEADLINE_LAYER_SETS = (FPE_LAYERS, "all")  # FPE's layer set first




@dataclass
class EditStudy:
    """``results``: :func:`probe.steer.edit.study`'s rows; ``summary``: one row per edit × origin × inject × layer set ×
    fraction."""

    results: pd.DataFrame
    summary: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def edit_summary(results: pd.DataFrame, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Aggregate :func:`probe.steer.edit.study`: success rate (bootstrap CI), structure IoU and displacement (means over
    edits where the objects were found), leak rate and the share of sources that show their own prompt.

    ``iou_vs_none`` (with ``iou_vs_none_ci_low`` / ``_high``): the structure IoU minus that of no injection on the
    same edit, origin and seed, averaged with a bootstrap interval over seeds. This paired difference is FPE's
    claim in one number: does injecting keep the source's structure better than not injecting?"""
    pair = ["edit", "origin", "seed"]
    plain = results[results.inject == "none"].set_index(pair).iou
    rows = []
    for key, frame in results.groupby(EDIT_KEYS, sort=False, dropna=False):
        rate, low, high = mean_interval(frame.success.astype(float), n_boot=n_boot, seed=seed)
        leaked = frame.leaked.astype("Float64").astype(float)
        gain = (frame.set_index(pair).iou - plain).dropna() if key[2] != "none" else pd.Series(dtype=float)
        gain_mean, gain_low, gain_high = mean_interval(gain.to_numpy(), n_boot=n_boot, seed=seed)
        rows.append({**dict(zip(EDIT_KEYS, key)), "n": len(frame), "success_rate": rate, "success_ci_low": low,
                     "success_ci_high": high, "iou": float(frame.iou.mean()),
                     "iou_vs_none": gain_mean, "iou_vs_none_ci_low": gain_low, "iou_vs_none_ci_high": gain_high,
                     "displacement": float(frame.displacement.mean()),
                     "leaked_rate": float(leaked.mean()) if leaked.notna().any() else math.nan,
                     "source_present_rate": float(frame.source_present.astype(float).mean())})
    return pd.DataFrame(rows, columns=[*EDIT_KEYS, "n", "success_rate", "success_ci_low", "success_ci_high", "iou",
                                       "iou_vs_none", "iou_vs_none_ci_low", "iou_vs_none_ci_high", "displacement",
                                       "leaked_rate", "source_present_rate"])


def edit_study(pipe, n_seeds: int = EDIT_SEEDS, steps: int = STEPS, quick: bool = False,
               out: str | Path | None = None, steps_fractions: Sequence[float] = STEPS_FRACTIONS,
               progress: bool = True) -> EditStudy:
    """Free-Prompt-Editing's claim on the shapes world (:func:`probe.steer.edit.study`), aggregated and drawn.

    Colour and shape edits of generated and of rendered (DDIM-inverted) sources; self- vs cross-attention injection
    vs none, per injected fraction of the steps and layer set. ``quick``: one seed, fraction 0.8 only, at most 20
    steps, 200 bootstrap resamples.
    """
    pipe = load(pipe)
    n_seeds = whole_number(n_seeds, "n_seeds", "the number of seeds of each edit")
    steps = step_count(steps)
    require_shapes_world(pipe, exact_judge, "editing")  # FPE's edits are judged by the shapes world's rules
    if quick:
        n_seeds, steps, steps_fractions = min(n_seeds, QUICK_EDIT_SEEDS), min(steps, QUICK_STEPS), QUICK_EDIT_FRACTIONS
    results = edit_sweep(pipe, n_seeds=n_seeds, steps_fractions=steps_fractions, steps=steps,
                         progress=progress)
    summary = edit_summary(results, QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
    figures = {"edit_success": plots.edit_success(summary)}
    return EditStudy(results, summary, figures, save_figures(figures, out))


def edit_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per edit, origin and injection: the row at FPE's setting (fraction closest to 0.8, layers coarser than the latent
    where the model has such a set); "none" is its single row."""
    rows = []
    for (_, _, inject), frame in summary.groupby(["edit", "origin", "inject"], sort=False):
        if inject != "none":
            gap = (frame.fraction - DEFAULT_FRACTION).abs()
            frame = frame[gap == gap.min()]
            preferred = [s for s in HEADLINE_LAYER_SETS if s in set(frame.layer_set)]
            frame = frame[frame.layer_set == (preferred[0] if preferred else frame.layer_set.iloc[0])]
        rows.append(frame.iloc[0])
    return pd.DataFrame(rows, columns=summary.columns).reset_index(drop=True)


def _clear(low: float, high: float) -> bool:
    return low > 0 or high < 0


def editing_answer(headline: pd.DataFrame) -> str:
    """Per edit and image origin, how much of the source object's mask self- and cross-attention injection kept
    beyond no injection (IoU difference, paired interval), and the self edit's success rate."""
    parts = []
    for (edit, origin), rows in headline.groupby(["edit", "origin"], sort=False):
        said = []
        for row in rows[rows.inject.isin(["self", "cross"])].itertuples(index=False):
            if math.isnan(row.iou_vs_none):
                continue
            clear = _clear(row.iou_vs_none_ci_low, row.iou_vs_none_ci_high)
            said.append(f"{row.inject} {row.iou_vs_none:+.3f} [{row.iou_vs_none_ci_low:+.3f}, "
                        f"{row.iou_vs_none_ci_high:+.3f}]{'' if clear else ' (no clear difference)'}, "
                        f"success {row.success_rate:.0%}")
        if said:
            parts.append(f"{edit} edits of {origin} images: " + ", ".join(said))
    return ("Mask IoU with the source beyond no injection: " + "; ".join(parts) + ".") if parts else \
        "No attention-injection edit was run."


register(Study(
    name="editing", title="Tuning-free editing: self- vs cross-attention injection", order=30, run=edit_study,
    tables=lambda study: {"edit_results": study.results, "edit_summary": study.summary},
    headline=lambda study: edit_headline(study.summary),
    source="edit_results", recompute=lambda table, n_boot: edit_headline(edit_summary(table, n_boot)),
    answer=editing_answer, figures=("edit_success",), aliases=("edit",)))
