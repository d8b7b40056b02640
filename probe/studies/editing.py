"""Tuning-free editing: self- vs cross-attention injection (Free-Prompt-Editing's claim).

Each edit type (colour, shape) runs on :data:`EDIT_PAIRS` distinct source / target prompt pairs drawn without
replacement from the shapes world's colours and shapes (:func:`edit_pairs`), so a verdict speaks for edits of that
type, not for one pair. The unit of inference is the prompt pair: a row's effect (mask IoU with the source beyond no
injection, paired on edit, origin, pair and seed) gets a bootstrap interval that resamples whole pairs and a
two-sided sign-flip p-value that flips whole pairs (:func:`probe.analysis.stats.cluster_sign_flip`). A table with one
pair per edit (made before this design) can only resample that pair's seeds, and its ``unit`` column says so.

Holm family (:func:`holm_family`): the headline's injected rows, edit × origin × {self, cross} injection at FPE's
setting (fraction closest to 0.8, layers coarser than the latent): 2 × 2 × 2 = 8 tests on the full study. A row is
a clear difference only where its Holm-adjusted p is below :data:`ALPHA`. The other fractions and layer sets in the
summary are descriptive; their p-values are unadjusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe import plots
from probe.analysis.stats import cluster_sign_flip, format_p, holm
from probe.checks import step_count, whole_number
from probe.models import load
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import require_shapes_world
from probe.shapes.settings import GUIDANCE, STEPS
from probe.shapes.world import COLOURS, SHAPES
from probe.steer.edit import DEFAULT_FRACTION, EDITS, FPE_LAYERS, ORIGINS, STEPS_FRACTIONS
from probe.steer.edit import study as edit_sweep
from probe.studies.answers import add_section_text, holm_p
from probe.studies.common import BOOTSTRAPS, QUICK_BOOTSTRAPS, QUICK_STEPS, mean_interval, save_figures
from probe.studies.registry import Study, register

EDIT_PAIRS = 20  # distinct prompt pairs per edit type
EDIT_SEEDS = 1  # seeds per pair (probe.steer.edit.study gives every pair the seeds 0 … n-1)
PAIR_SEED = 0  # the draw of the pairs
QUICK_EDIT_PAIRS = 1
QUICK_EDIT_SEEDS = 1
QUICK_EDIT_FRACTIONS = (DEFAULT_FRACTION,)
EDIT_KEYS = ["edit", "origin", "inject", "layer_set", "fraction"]
HEADLINE_LAYER_SETS = (FPE_LAYERS, "all")  # FPE's layer set first
INJECTED = ("self", "cross")  # the headline rows Holm adjusts together (with every edit and origin)
ALPHA = 0.05  # family-wise error rate of the Holm family
PROMPTS = ["source_prompt", "target_prompt"]  # what names a pair in the per-edit rows
SUMMARY_COLUMNS = [*EDIT_KEYS, "n", "success_rate", "success_ci_low", "success_ci_high", "iou", "iou_vs_none",
                   "iou_vs_none_ci_low", "iou_vs_none_ci_high", "displacement", "leaked_rate", "source_present_rate",
                   "n_pairs", "unit", "iou_vs_none_p"]


@dataclass
class EditStudy:
    """``results``: :func:`probe.steer.edit.study`'s rows; ``summary``: one row per edit × origin × inject × layer set ×
    fraction."""

    results: pd.DataFrame
    summary: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def _candidate_pairs() -> dict[str, list[tuple[str, str]]]:
    """Every one-object edit of each type: another colour of the same shape, another shape of the same colour."""
    return {"colour": [(f"a {a} {s}", f"a {b} {s}") for s in SHAPES for a in COLOURS for b in COLOURS if a != b],
            "shape": [(f"a {c} {a}", f"a {c} {b}") for c in COLOURS for a in SHAPES for b in SHAPES if a != b]}


def edit_pairs(n_pairs: int = EDIT_PAIRS, seed: int = PAIR_SEED) -> tuple[tuple[str, str, str], ...]:
    """``n_pairs`` distinct (edit type, source prompt, target prompt) per edit type, drawn without replacement from
    every colour and every shape edit of the shapes world's one-object prompts, so a verdict is not one pair's.

    The pair each type had before (:data:`probe.steer.edit.EDITS`) comes first, so one pair reproduces the earlier
    study; the rest are a seeded random draw from the others."""
    n_pairs = whole_number(n_pairs, "n_pairs", "the number of prompt pairs of each edit type")
    chosen = []
    for index, (name, pairs) in enumerate(_candidate_pairs().items()):
        if n_pairs > len(pairs):
            raise ValueError(f"{name} edits have {len(pairs)} distinct prompt pairs; n_pairs={n_pairs} is more")
        first = [(src, tgt) for kind, src, tgt in EDITS if kind == name and (src, tgt) in pairs][:1]
        rest = [pair for pair in pairs if pair not in first]
        order = np.random.default_rng([seed, index]).permutation(len(rest))
        chosen += [(name, src, tgt) for src, tgt in (first + [rest[i] for i in order])[:n_pairs]]
    return tuple(chosen)


def _pair_keys(results: pd.DataFrame) -> list[str]:
    """What pairs an injected row with its no-injection row: edit, origin, seed, and the prompts where kept."""
    return ["edit", "origin", "seed", *(c for c in PROMPTS if c in results)]


def _units(frame: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The resampled unit of a summary row: its prompt pairs where it has two or more, else each row (one pair's
    seeds: the only replication such a table has)."""
    if all(c in frame for c in PROMPTS):
        pairs = (frame.source_prompt.astype(str) + " → " + frame.target_prompt.astype(str)).to_numpy()
        if len(set(pairs)) >= 2:
            return "pair", pairs
    return "seed", np.arange(len(frame))


def _summary_row(key: tuple, frame: pd.DataFrame, plain: pd.Series, n_boot: int, seed: int) -> dict:
    """One summary row: rates, means, and the paired IoU gain over no injection with its interval and p-value."""
    unit, clusters = _units(frame)
    rate, low, high = mean_interval(frame.success.astype(float), clusters, n_boot=n_boot, seed=seed)
    leaked = frame.leaked.astype("Float64").astype(float)
    gain = (frame.set_index(_pair_keys(frame)).iou - plain).dropna() if key[2] != "none" else pd.Series(dtype=float)
    if len(gain):
        unit, clusters = _units(gain.reset_index())
    gain_mean, gain_low, gain_high = mean_interval(gain.to_numpy(), clusters[:len(gain)], n_boot=n_boot, seed=seed)
    return {**dict(zip(EDIT_KEYS, key)), "n": len(frame), "success_rate": rate, "success_ci_low": low,
            "success_ci_high": high, "iou": float(frame.iou.mean()),
            "iou_vs_none": gain_mean, "iou_vs_none_ci_low": gain_low, "iou_vs_none_ci_high": gain_high,
            "displacement": float(frame.displacement.mean()),
            "leaked_rate": float(leaked.mean()) if leaked.notna().any() else math.nan,
            "source_present_rate": float(frame.source_present.astype(float).mean()),
            "n_pairs": len(frame[PROMPTS].drop_duplicates()) if all(c in frame for c in PROMPTS) else 1,
            "unit": unit, "iou_vs_none_p": cluster_sign_flip(gain.to_numpy(), clusters) if len(gain) else math.nan}


def edit_summary(results: pd.DataFrame, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Aggregate :func:`probe.steer.edit.study`: success rate (bootstrap CI), structure IoU and displacement (means over
    edits where the objects were found), leak rate and the share of sources that show their own prompt.

    ``iou_vs_none`` (with ``iou_vs_none_ci_low`` / ``_high`` and ``iou_vs_none_p``): the structure IoU minus that of
    no injection on the same edit, origin, prompt pair and seed, averaged, with a bootstrap interval and a sign-flip
    p-value (unadjusted) over whole prompt pairs (``unit`` "pair"; "seed" where the row has one pair). This paired
    difference is FPE's claim in one number: does injecting keep the source's structure better than not injecting?"""
    plain = results[results.inject == "none"].set_index(_pair_keys(results)).iou
    rows = [_summary_row(key, frame, plain, n_boot, seed)
            for key, frame in results.groupby(EDIT_KEYS, sort=False, dropna=False)]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def edit_study(pipe, n_seeds: int = EDIT_SEEDS, steps: int = STEPS, quick: bool = False,
               out: str | Path | None = None, steps_fractions: Sequence[float] = STEPS_FRACTIONS,
               progress: bool = True, n_pairs: int = EDIT_PAIRS, seed_offset: int = 0) -> EditStudy:
    """Free-Prompt-Editing's claim on the shapes world (:func:`probe.steer.edit.study`), aggregated and drawn.

    Colour and shape edits, ``n_pairs`` prompt pairs each (:func:`edit_pairs`), ``n_seeds`` seeds per pair, of
    generated and of rendered (DDIM-inverted) sources; self- vs cross-attention injection vs none, per injected
    fraction of the steps and layer set. ``quick``: one pair per edit type, one seed, fraction 0.8 only, at most 20
    steps, 200 bootstrap resamples. ``seed_offset``: the first seed (every pair has seeds ``seed_offset`` …
    ``seed_offset + n_seeds − 1``), so that a registered run does not reuse an earlier run's images.
    """
    pipe = load(pipe)
    n_seeds = whole_number(n_seeds, "n_seeds", "the number of seeds of each prompt pair")
    seed_offset = whole_number(seed_offset, "seed_offset", "the first seed of every prompt pair", minimum=0)
    steps = step_count(steps)
    require_shapes_world(pipe, exact_judge, "editing")  # FPE's edits are judged by the shapes world's rules
    if quick:
        n_seeds, steps, steps_fractions = min(n_seeds, QUICK_EDIT_SEEDS), min(steps, QUICK_STEPS), QUICK_EDIT_FRACTIONS
        n_pairs = min(n_pairs, QUICK_EDIT_PAIRS)
    results = edit_sweep(pipe, n_seeds=n_seeds, steps_fractions=steps_fractions, steps=steps,
                         edits=edit_pairs(n_pairs), progress=progress, seed_offset=seed_offset,
                         guidance_scale=GUIDANCE)
    summary = edit_summary(results, QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
    figures = {"edit_success": plots.edit_success(summary)}
    return EditStudy(results, summary, figures, save_figures(figures, out))


def edit_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per edit, origin and injection: the row at FPE's setting (fraction closest to 0.8, layers coarser than the latent
    where the model has such a set); "none" is its single row. ``iou_vs_none_p_holm``: Holm over the injected rows
    (:func:`holm_family`)."""
    rows = []
    for (_, _, inject), frame in summary.groupby(["edit", "origin", "inject"], sort=False):
        if inject != "none":
            gap = (frame.fraction - DEFAULT_FRACTION).abs()
            frame = frame[gap == gap.min()]
            preferred = [s for s in HEADLINE_LAYER_SETS if s in set(frame.layer_set)]
            frame = frame[frame.layer_set == (preferred[0] if preferred else frame.layer_set.iloc[0])]
        rows.append(frame.iloc[0])
    headline = pd.DataFrame(rows, columns=summary.columns).reset_index(drop=True)
    if "iou_vs_none_p" in headline:
        tested = headline.inject.isin(INJECTED).to_numpy()
        adjusted = np.full(len(headline), math.nan)
        adjusted[tested] = holm(headline.iou_vs_none_p.to_numpy(float)[tested])
        headline["iou_vs_none_p_holm"] = adjusted
    return headline


def holm_family(headline: pd.DataFrame | None = None) -> str:
    """The editing study's Holm family in one line, which the report prints under the answer (counted from
    ``headline`` where given, else the design's count)."""
    flips = "whole prompt pairs"
    if headline is not None and "inject" in headline:
        tested = headline[headline.inject.isin(INJECTED)]
        if "iou_vs_none_p" in tested:
            tested = tested[tested.iou_vs_none_p.notna()]
        count, edits, origins = len(tested), tested.edit.nunique(), tested.origin.nunique()
        if "unit" in tested and (tested.unit == "seed").any():
            flips = "the seeds of each edit's one prompt pair"
    else:
        edits, origins = len(_candidate_pairs()), len(ORIGINS)
        count = edits * origins * len(INJECTED)
    return (f"Holm family: the {count} injected headline rows ({edits} edit types × {origins} origins × self and "
            f"cross injection at FPE's setting: fraction {DEFAULT_FRACTION:g}, layers {FPE_LAYERS}), each a two-sided "
            f"sign-flip test of the mask-IoU gain over no injection that flips {flips}; a row is a clear "
            f"difference only at Holm p < {ALPHA:g}. The summary's other fractions and layer sets are descriptive.")


def _row_text(row) -> str:
    """"self -0.014 [-0.034, -0.000] (no clear difference, Holm p = 0.28), success 100%"."""
    p = getattr(row, "iou_vs_none_p_holm", math.nan)
    clear = p is not None and not math.isnan(p) and p < ALPHA
    tested = "no test over prompt pairs" if format_p(p) == "n/a" else holm_p(p)
    return (f"{row.inject} {row.iou_vs_none:+.3f} [{row.iou_vs_none_ci_low:+.3f}, {row.iou_vs_none_ci_high:+.3f}] "
            f"({tested if clear else 'no clear difference, ' + tested}), success {row.success_rate:.0%}")


def editing_answer(headline: pd.DataFrame) -> str:
    """Per edit and image origin, how much of the source object's mask self- and cross-attention injection kept
    beyond no injection (IoU difference, paired interval), and each arm's success rate, no injection's beside. A
    difference is clear only where its Holm-adjusted sign-flip p is below :data:`ALPHA` (a table without p-values
    calls none clear)."""
    parts = []
    for (edit, origin), rows in headline.groupby(["edit", "origin"], sort=False):
        said = [_row_text(row) for row in rows[rows.inject.isin(INJECTED)].itertuples(index=False)
                if not math.isnan(row.iou_vs_none)]
        plain = rows[rows.inject == "none"]
        if said and len(plain):  # the success an injection's own is read against
            said.append(f"none: success {plain.success_rate.iloc[0]:.0%}")
        if said:
            parts.append(f"{edit} edits of {origin} images: " + ", ".join(said))
    if not parts:
        return "No attention-injection edit was run."
    answer = "Mask IoU with the source beyond no injection: " + "; ".join(parts) + "."
    injected = headline[headline.inject.isin(INJECTED)]
    if "unit" in injected and (injected.unit == "seed").any():
        answer += (" These rows had one prompt pair per edit, so their intervals and tests resample that pair's seeds"
                   " and say nothing about other prompts.")
    elif "n_pairs" in injected and injected.n_pairs.notna().any():
        low, high = int(injected.n_pairs.min()), int(injected.n_pairs.max())
        pairs = f"{low}" if low == high else f"{low}–{high}"
        answer += f" Each row pools {pairs} prompt pairs; intervals and tests resample pairs."
    return answer


add_section_text("editing", holm_family)
register(Study(
    name="editing", title="Tuning-free editing: self- vs cross-attention injection", order=30, run=edit_study,
    tables=lambda study: {"edit_results": study.results, "edit_summary": study.summary},
    headline=lambda study: edit_headline(study.summary),
    source="edit_results", recompute=lambda table, n_boot: edit_headline(edit_summary(table, n_boot)),
    answer=editing_answer, figures=("edit_success",), aliases=("edit",)))
