"""Linear probes of what cross- and self-attention encode (Free-Prompt-Editing's probing argument).

Each (kind, feature) arm is scored twice: every block (resolution × layer × step bin) on its own, and the arm as a
whole by nested cross-validation (:func:`probe.analysis.probes.nested_probe_features`), whose inner folds choose the
block and whose outer folds score it, over the same number of candidate blocks for every arm. The headline and the
answer read the nested scores: the best of many blocks is a maximum over a search, and would favour self-attention,
which has two features per block to cross-attention's one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from probe import plots
from probe.analysis.probes import (
    BLOCK,
    COLUMNS,
    NESTED,
    NESTED_COLUMNS,
    LinearProbe,
    concat_features,
    nested_probe_features,
    probe_features,
    step_bins,
    subject_features,
)
from probe.checks import step_count, whole_number
from probe.models import load
from probe.record import record
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import parse_prompt, require_shapes_world
from probe.shapes.settings import HELD_OUT_SEED, STEPS
from probe.shapes.world import COLOURS, SHAPES
from probe.studies.common import CHUNK, Judge, Subject, recorded_samples, sample_chunks, save_figures, subject_word
from probe.studies.registry import Study, register
from probe.tap import attention_layers

PROBE_SEED = HELD_OUT_SEED + 20_000  # seeds of the probe study's images (shared by all prompts)
SELF_MAX_GRID = 16  # self-attention is recorded only at grids up to this (memory grows as grid⁴)
LAYOUT_TARGETS = ("position", "extent", "size", "judge_shape")  # where and shape: what FPE says self-attention holds
STEPS_PER_BIN = 2  # probe study: steps kept at the centre of each of early / middle / late
POSITION_BINS = 3  # object centre binned into a 3×3 grid of the image
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "centre", "right")
QUICK_PROBE_IMAGES = 24  # every colour × shape, one seed
PROBE_TARGETS = ("colour", "shape", "position", "size", "extent", "judge_colour", "judge_shape")
PROMPT_GIVEN = ("colour", "shape")  # targets the prompt's own words give away: a control for token identity, not
# evidence of what a map encodes. The others are what the judge measured of the object actually drawn.
SIZE_NAMES = ("small", "medium", "large")  # terciles of the drawn objects' areas in the study
WIDE, TALL = 0.8, 1.25  # bounding-box height / width below / above which an object is "wide" / "tall"
COMPARED_FEATURES = {"self": "aggregated", "cross": "map"}  # the one arm of each kind the answer compares, fixed in
# advance: the subject's own self-attention region against the subject's own cross map (picking the better of the
# two self features would search self twice as widely again); the plain mean self map stays in the tables
ATTRIBUTE_TARGET = "colour"  # the attribute FPE says cross-attention carries
FAR_BETTER = 0.2  # an accuracy gap (disjoint intervals) at least this large is "far" better
SEARCHED = "best block"  # a headline row from a table without nested rows: the maximum over its blocks (optimistic)


@dataclass
class ProbeStudy:
    """``labels``: one row per image; ``accuracy``: the probe table, one row per block
    (:func:`probe.analysis.probes.probe_features`, ``search`` "block") and one per (target, kind, feature) chosen
    inside nested cross-validation (:func:`probe.analysis.probes.nested_probe_features`, ``search`` "nested")."""

    labels: pd.DataFrame
    accuracy: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def probe_layers(pipe, self_max_grid: int = SELF_MAX_GRID) -> list[str]:
    """Every cross-attention layer, and the self-attention layers whose grid is at most ``self_max_grid``."""
    return [layer.name for layer in attention_layers(pipe)
            if layer.kind == "cross" or max(layer.grid) <= self_max_grid]


def position_bin(mask: np.ndarray, bins: int = POSITION_BINS) -> str:
    """Where an object's centre lies in a 3×3 grid of the image: "top-left" … "middle-centre" … "bottom-right"."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    row = min(int((rows.mean() + 0.5) * bins / height), bins - 1)  # pixel centres sit at index + 0.5
    col = min(int((cols.mean() + 0.5) * bins / width), bins - 1)
    return f"{ROW_NAMES[row]}-{COLUMN_NAMES[col]}"


def extent(mask: np.ndarray) -> str:
    """"wide", "tall" or "even": the drawn object's bounding-box height over width."""
    rows, cols = np.nonzero(mask)
    ratio = (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)
    return "wide" if ratio < WIDE else "tall" if ratio > TALL else "even"


def object_labels(image: np.ndarray, prompt: str, judge: Judge = exact_judge) -> dict:
    """Labels of a single-object image: colour and shape asked for, and, where the judge found the subject
    (any status but missing), the colour, shape, position bin, area (pixels) and extent of what it found."""
    colour, shape = parse_prompt(prompt)[0]
    status = judge(image, prompt)[0]
    found = status.detection if status.status != "missing" else None
    return {"colour": colour, "shape": shape, "status": status.status,
            "judge_colour": found.colour if found is not None else None,
            "judge_shape": found.shape if found is not None else None,
            "position": position_bin(found.mask) if found is not None else None,
            "area": int(found.mask.sum()) if found is not None else None,
            "extent": extent(found.mask) if found is not None else None}


def size_terciles(area: pd.Series) -> pd.Series:
    """Each found object's area as small / medium / large, by the terciles of the study's areas."""
    known = area.dropna()
    if known.nunique() < len(SIZE_NAMES):
        return pd.Series([None] * len(area), index=area.index, dtype=object)
    cut = pd.qcut(known.rank(method="first"), len(SIZE_NAMES), labels=SIZE_NAMES)
    return cut.astype(object).reindex(area.index)


def probe_study(pipe, n_images: int = 500, steps: int = STEPS, quick: bool = False, out: str | Path | None = None,
                subject: Subject = "noun", judge: Judge = exact_judge, progress: bool = True,
                seed_offset: int = 0) -> ProbeStudy:
    """Probe colour, shape and position from cross vs self maps of single-object images, by layer and step.

    Prompts are "a {colour} {shape}" for every colour × shape, each with the same ``ceil(n_images / 24)`` seeds
    (so positions, drawn by the seed, are independent of colour and shape). Colour and shape labels are what the
    prompt asked for (:data:`PROMPT_GIVEN`: a noun's map "knows" its own noun, so these measure token identity);
    ``position``, ``size``, ``extent``, ``judge_colour`` and ``judge_shape`` are what the judge found of the object
    drawn (only images where it found the subject), which the prompt does not give away. Cross-validation keeps each
    seed's images in one fold (a seed fixes much of the layout). Steps: two at the centre of each of early / middle /
    late (one when ``quick``). ``quick`` also caps the images at 24 and probes only the layer means.
    ``seed_offset``: added to every seed, so that a registered run does not reuse an earlier run's images.
    """
    pipe = load(pipe)
    n_images = whole_number(n_images, "n_images", "the number of single-object images probed")
    seed_offset = whole_number(seed_offset, "seed_offset", "added to every seed of the study", minimum=0)
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "probe")
    n_images = min(n_images, QUICK_PROBE_IMAGES) if quick else n_images
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    seeds = [PROBE_SEED + seed_offset + i for i in range(max(1, math.ceil(n_images / len(prompts))))]
    bins = step_bins(steps, per_bin=1 if quick else STEPS_PER_BIN)
    keep = sorted({s for steps_ in bins.values() for s in steps_})
    layers = probe_layers(pipe)
    parts, rows = [], []
    chunks = list(sample_chunks(prompts, seeds))
    for chunk_prompts, chunk_seeds in tqdm(chunks, desc="probe study", disable=not progress):
        tree = record(pipe, chunk_prompts, seeds=chunk_seeds, steps=steps, layers=layers, keep_steps=keep,
                      batch_size=CHUNK, progress=False)
        chunk_prompts_, chunk_seeds_, images = recorded_samples(tree)
        words = [subject_word(*parse_prompt(p)[0], subject) for p in chunk_prompts_]
        parts.append(subject_features(tree, words, bins, per_layer=not quick))
        rows += [{"prompt": p, "seed": s, **object_labels(im, p, judge)}
                 for p, s, im in zip(chunk_prompts_, chunk_seeds_, images)]
    labels = pd.DataFrame(rows)
    labels["size"] = size_terciles(labels.area)
    accuracy = probe_tables(concat_features(parts), labels, LinearProbe())
    figures = {"probe_accuracy": plots.probe_accuracy(accuracy[accuracy.search == BLOCK])}
    return ProbeStudy(labels, accuracy, figures, save_figures(figures, out))


def probe_tables(features: dict, labels: pd.DataFrame, probe: LinearProbe) -> pd.DataFrame:
    """Every block's score and every arm's nested score, one table (columns :data:`probe.analysis.probes.COLUMNS`,
    ``given_by_prompt``, then :data:`probe.analysis.probes.SEARCH_COLUMNS`); seeds keep their images in one fold."""
    groups = labels.seed.to_numpy() if labels.seed.nunique() >= 2 else None
    targets = labels[list(PROBE_TARGETS)]
    blocks = probe_features(features, targets, probe, groups=groups).assign(
        search=BLOCK, n_candidates=1, best_of_n=math.nan, chosen_folds=math.nan, C=probe.C)
    nested = nested_probe_features(features, targets, probe, groups=groups)
    accuracy = pd.concat([blocks[NESTED_COLUMNS], nested], ignore_index=True)
    accuracy.insert(len(COLUMNS), "given_by_prompt", accuracy.target.isin(PROMPT_GIVEN))
    return accuracy  # the earlier table's columns, then the search's


HEADLINE_COLUMNS = ["target", "given_by_prompt", "kind", "feature", "accuracy", "ci_low", "ci_high", "chance",
                    "resolution", "layer", "step_bin", "n", "search", "n_candidates", "best_of_n", "chosen_folds"]


def probe_headline(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per target and feature: the nested score (the block chosen inside nested cross-validation, scored on folds
    that did not choose it; the block most outer folds chose, by ``chosen_folds`` of them) and ``best_of_n``, the
    best single block of the same ``n_candidates``, for comparison.

    A table without nested rows (made before them) gives its best block per arm, as it did then (``search`` "best
    block"): a maximum over the search, optimistic.
    """
    if accuracy.empty:
        return accuracy
    accuracy = accuracy.assign(given_by_prompt=accuracy.target.isin(PROMPT_GIVEN))
    keys = ["target", "kind", "feature"]
    if "search" in accuracy and (accuracy.search == NESTED).any():
        best = accuracy[accuracy.search == NESTED]
    else:
        best = accuracy.loc[accuracy.groupby(keys).accuracy.idxmax()]
        sizes = accuracy.groupby(keys).size().rename("n_candidates")
        best = best.drop(columns=["n_candidates"], errors="ignore").join(sizes, on=keys).assign(
            search=SEARCHED, best_of_n=best.accuracy, chosen_folds=math.nan)
    return best[HEADLINE_COLUMNS].sort_values(keys).reset_index(drop=True)


def _compared(headline: pd.DataFrame, target: str) -> dict[str, pd.Series]:
    """The row of each kind the answer compares for ``target`` (:data:`COMPARED_FEATURES`; every row of the kind
    where the table names no feature), the best where several remain."""
    rows = headline[headline.target == target]
    found = {}
    for kind, feature in COMPARED_FEATURES.items():
        part = rows[(rows.kind == kind) & ((rows.feature == feature) if "feature" in rows else True)]
        if len(part):
            found[kind] = part.sort_values("accuracy").iloc[-1]
    return found


def _verdict(s: pd.Series, c: pd.Series) -> str:
    """"better" / "worse" only with disjoint intervals."""
    return "better" if s.ci_low > c.ci_high else "worse" if s.ci_high < c.ci_low else "as well (intervals overlap)"


def attribute_sentence(headline: pd.DataFrame, target: str = ATTRIBUTE_TARGET) -> str:
    """FPE's other half, from the table's numbers: which kind carries an attribute (colour) better. "Better" needs
    disjoint intervals, "far better" also a gap of :data:`FAR_BETTER`; empty where a kind was not probed."""
    best = _compared(headline, target)
    if len(best) < 2:
        return ""
    s, c = best["self"], best["cross"]
    name = target.replace("_", " ").capitalize() + (" (as the prompt named it)" if target in PROMPT_GIVEN else "")
    far = "far " if abs(s.accuracy - c.accuracy) >= FAR_BETTER else ""
    if s.ci_low > c.ci_high:
        return (f"{name} is carried {far}better by self-attention ({s.accuracy:.2f}) than by cross-attention "
                f"({c.accuracy:.2f}), against FPE's claim that cross-attention carries attributes.")
    if s.ci_high < c.ci_low:
        return (f"{name} is carried {far}better by cross-attention ({c.accuracy:.2f}) than by self-attention "
                f"({s.accuracy:.2f}), as FPE claims (cross-attention carries attributes).")
    return (f"{name} is carried about as well by self-attention ({s.accuracy:.2f}) as by cross-attention "
            f"({c.accuracy:.2f}) (intervals overlap), not better by cross-attention as FPE claims.")


def probe_answer(headline: pd.DataFrame) -> str:
    """FPE's claim on targets the prompt does not give away: does self-attention carry where and shape better than
    cross-attention? Per layout target, the compared arm of each kind (:data:`COMPARED_FEATURES`, equal search
    budgets, nested scores); "better" needs disjoint Wilson intervals. Then :func:`attribute_sentence`."""
    targets = [t for t in LAYOUT_TARGETS if t in set(headline.target)]
    if not targets:
        return "No layout target was probed."
    verdicts = []
    for target in targets:
        best = _compared(headline, target)
        if len(best) == 2:
            s, c = best["self"], best["cross"]
            verdicts.append((target, _verdict(s, c), s.accuracy, c.accuracy))
    better = sum(w == "better" for _, w, _, _ in verdicts)
    listed = "; ".join(f"{t}: self {s:.2f} vs cross {c:.2f}, {w}" for t, w, s, c in verdicts)
    answer = (f"Self-attention carries where and shape better than cross-attention on {better} of {len(verdicts)} "
              f"targets the prompt does not give away ({listed}), so FPE's claim is "
              f"{'confirmed' if better == len(verdicts) else 'partly confirmed' if better else 'not confirmed'} "
              "on this model.")
    return " ".join(part for part in (answer, _other_self_sentence(headline, targets), attribute_sentence(headline),
                                      _search_note(headline)) if part)


def _other_self_sentence(headline: pd.DataFrame, targets: list[str], feature: str = "mean") -> str:
    """Where self-attention's other feature (the layer mean, not the subject's own map) and cross-attention differ
    with disjoint intervals: said beside the compared arm's verdicts, so the answer says what the table holds."""
    parts = []
    for target in targets:
        rows = headline[(headline.target == target) & (headline.kind == "self")]
        other = rows[rows.feature == feature] if "feature" in rows else rows.iloc[:0]
        cross = _compared(headline, target).get("cross")
        if len(other) and cross is not None:
            row = other.sort_values("accuracy").iloc[-1]
            verdict = _verdict(row, cross)
            if verdict != "as well (intervals overlap)":
                parts.append(f"{target} {verdict} ({row.accuracy:.2f} vs {cross.accuracy:.2f})")
    if not parts:
        return ""
    return ("Self-attention's layer mean (not the subject's own map), against cross-attention with disjoint "
            f"intervals: {'; '.join(parts)}.")


def _search_note(headline: pd.DataFrame) -> str:
    """What the scores are: nested (and over how many set-ups per arm), or the optimistic best block."""
    if "search" not in headline or "n_candidates" not in headline:
        return ""
    counts = sorted({int(n) for n in headline.n_candidates.dropna()})
    each = f"{counts[0]}" if len(counts) == 1 else "/".join(map(str, counts))
    if (headline.search == NESTED).all():
        return (f"Scores are nested cross-validation over {each} candidate set-ups per arm (self: the subject's "
                "aggregated self-attention; cross: its cross-attention map).")
    return (f"Scores are each arm's best of {each} set-ups, not nested: optimistic (self: the subject's aggregated "
            "self-attention; cross: its cross-attention map).")


register(Study(
    name="probe", title="Linear probes: what cross- and self-attention encode", order=10, run=probe_study,
    tables=lambda study: {"probe_labels": study.labels, "probe_accuracy": study.accuracy},
    headline=lambda study: probe_headline(study.accuracy),
    source="probe_accuracy", recompute=lambda table, n_boot: probe_headline(table),  # probes' scores: features not kept
    answer=probe_answer, figures=("probe_accuracy",)))
