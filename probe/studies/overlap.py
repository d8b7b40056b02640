"""Overlap between the subjects' maps and entity missing / mixing (Marioriyad et al.'s argument)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from tqdm.auto import tqdm

from probe import plots
from probe.analysis.maps import aggregate_self_attention
from probe.analysis.overlap import (
    PAIR_OVERLAP,
    ae_response,
    aggregation_loss,
    intensity,
    pair_overlap,
    self_cross_overlap,
    spread,
)
from probe.analysis.probes import (
    LinearProbe,
    attn_tensor,
    step_bins,
)
from probe.analysis.subjects import sample_tokens, subject_maps
from probe.checks import step_count, whole_number
from probe.models import load
from probe.record import record
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import parse_prompt, require_shapes_world
from probe.shapes.settings import HELD_OUT_SEED, STEPS
from probe.shapes.world import COLOURS, SHAPES
from probe.studies.answers import overlap_answer
from probe.studies.common import (
    BOOTSTRAPS,
    CHUNK,
    CONFIDENCE,
    QUICK_BOOTSTRAPS,
    Judge,
    Subject,
    nearest_grid,
    recorded_samples,
    sample_chunks,
    save_figures,
    subject_word,
)
from probe.studies.registry import Study, register

OVERLAP_SEED = HELD_OUT_SEED + 30_000  # seeds and prompt draw of the overlap study
OVERLAP_SEEDS_PER_PROMPT = 4
FOLDS = 5
EXAMPLES_PER_CLASS = 3  # images kept per outcome class (present, missing, mixed) for the examples figure
QUICK_OVERLAP_IMAGES = 16  # four prompts, four seeds: one chunk
METRICS = (*PAIR_OVERLAP, "self_cross", "intensity_min", "spread_max", "ae_loss", "aggregation_max")
ALL_METRICS = "all (logistic)"
OVERLAP_OUTCOMES = ("missing", "mixed")  # an image's failures whose association with overlap is measured



@dataclass
class Example:
    """One two-object image kept for the examples figure, with its subjects' maps at the last recorded step."""

    prompt: str
    seed: int
    words: tuple[str, str]
    statuses: tuple[str, str]
    image: np.ndarray  # uint8 (H, W, 3)
    maps: np.ndarray  # (2, h, w) layer-mean cross-attention

    @property
    def missing(self) -> bool:
        return "missing" in self.statuses

    @property
    def mixed(self) -> bool:
        return "mixed" in self.statuses

    @property
    def all_present(self) -> bool:
        return all(s == "present" for s in self.statuses)


@dataclass
class OverlapStudy:
    """``metrics``: one row per (image, step); ``association``: one row per (outcome, metric, step)."""

    metrics: pd.DataFrame
    association: pd.DataFrame
    examples: list[Example]
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def overlap_prompts(n: int, seed: int = OVERLAP_SEED) -> list[str]:
    """``n`` two-object prompts with two different colours and two different shapes (so nouns do not repeat)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        colours = rng.choice(list(COLOURS), 2, replace=False)
        shapes = rng.choice(list(SHAPES), 2, replace=False)
        prompts.append(" and ".join(f"a {c} {s}" for c, s in zip(colours, shapes)))
    return prompts


def pair_metrics(maps: torch.Tensor, self_maps: torch.Tensor, ae_maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic of two subjects' maps (..., 2, H, W) → (...,): overlap of the pair and each subject's own.

    ``maps``: cross-attention; ``self_maps``: Otsu-aggregated self-attention; ``ae_maps``: token-softmaxed and
    smoothed cross-attention (Attend-and-Excite's view). Suffix ``_a`` / ``_b``: first / second subject of the
    prompt; ``_min`` / ``_max``: the weaker subject, which is the one that goes missing. The pair's overlap is
    :func:`probe.analysis.overlap.pair_overlap` (centre-of-mass distance and KL on min-max normalised maps).
    """
    own = {"intensity": intensity(maps), "spread": spread(maps), "ae": ae_response(ae_maps),
           "aggregation": aggregation_loss(maps)}
    return {
        **pair_overlap(maps[..., 0, :, :], maps[..., 1, :, :]),
        "self_cross": self_cross_overlap(maps, self_maps),
        "intensity_min": own["intensity"].amin(-1),
        "spread_max": own["spread"].amax(-1),
        "ae_loss": own["ae"].amax(-1),
        "aggregation_max": own["aggregation"].amax(-1),
        **{f"{name}_{s}": values[..., i] for name, values in own.items() for i, s in enumerate("ab")},
    }


def _subject_maps(cross: torch.Tensor, one, words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's subject maps (step, 2, H, W) and their A&E view, from layer-mean cross (step, H, W, T) and the
    sample's recorded coordinates ``one`` (:func:`probe.analysis.subjects.sample_tokens`)."""
    tokens, softmax_over = sample_tokens(one, words)
    return subject_maps(cross, tokens), subject_maps(cross, tokens, softmax_over, view="ae")


def overlap_chunk(tree, grid: int, subject: Subject = "noun", judge: Judge = exact_judge
                  ) -> tuple[list[dict], list[Example]]:
    """Reduce one recorded chunk to per-(image, step) metric rows, plus every image as a candidate example."""
    cross, ds = attn_tensor(tree["cross"][f"res{grid}"])
    selfattn, _ = attn_tensor(tree["self"][f"res{grid}"])
    cross, selfattn = cross.mean(2), selfattn.mean(2)  # layer means: (S, step, y, x, T), (S, step, y, x, ky, kx)
    prompts, seeds, images = recorded_samples(tree)
    words = [[subject_word(c, s, subject) for c, s in parse_prompt(p)] for p in prompts]
    pairs = [_subject_maps(cross[i], ds.isel(sample=i), words[i]) for i in range(len(prompts))]
    maps, ae_maps = torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs])
    values = pair_metrics(maps, aggregate_self_attention(maps, selfattn[:, :, None]), ae_maps)
    values = {name: v.numpy() for name, v in values.items()}
    steps, timesteps = ds["step"].values, ds["timestep"].values
    rows, examples = [], []
    for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
        statuses = tuple(s.status for s in judge(image, prompt))
        examples.append(Example(prompt, seed, tuple(words[i]), statuses, image, maps[i, -1].numpy()))
        for j, (step, timestep) in enumerate(zip(steps, timesteps)):
            rows.append({"prompt": prompt, "seed": seed, "step": int(step), "timestep": float(timestep),
                         "status_a": statuses[0], "status_b": statuses[1],
                         **{outcome: outcome in statuses for outcome in OVERLAP_OUTCOMES},
                         **{name: float(v[i, j]) for name, v in values.items()}})
    return rows, examples


def _keep_examples(kept: list[Example], new: list[Example], per_class: int = EXAMPLES_PER_CLASS) -> list[Example]:
    """The first ``per_class`` images with every subject present, with a subject missing and with subjects mixed."""
    for example in new:
        flags = [flag for flag in plots.EXAMPLE_GROUPS.values() if getattr(example, flag)]
        if any(sum(getattr(e, flag) for e in kept) < per_class for flag in flags):
            kept.append(example)
    return kept


def overlap_study(pipe, n_images: int = 400, steps: int = STEPS, quick: bool = False, out: str | Path | None = None,
                  subject: Subject = "noun", judge: Judge = exact_judge,
                  seeds_per_prompt: int = OVERLAP_SEEDS_PER_PROMPT, progress: bool = True) -> OverlapStudy:
    """Overlap statistics of two-object images at every step, and their association with entity missing and mixing.

    ``n_images / seeds_per_prompt`` prompts (two colours, two shapes, all different), each with the same seeds.
    Maps are layer means at the cross-attention grid closest to 16×16; the self-cross overlap uses the
    Otsu-aggregated self-attention at that grid. An image counts as missing (mixed) when the judge finds any subject
    missing (mixed with the other). ``quick``: at most 16 images, three steps (early / middle / late), 200 bootstrap
    resamples.
    """
    pipe = load(pipe)
    n_images = whole_number(n_images, "n_images", "the number of two-object images")
    seeds_per_prompt = whole_number(seeds_per_prompt, "seeds_per_prompt", "the number of seeds of each prompt")
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "overlap")
    n_images = min(n_images, QUICK_OVERLAP_IMAGES) if quick else n_images
    prompts = overlap_prompts(max(1, math.ceil(n_images / seeds_per_prompt)))
    seeds = [OVERLAP_SEED + i for i in range(seeds_per_prompt)]
    keep = sorted({s for v in step_bins(steps, per_bin=1).values() for s in v}) if quick else None
    grid = nearest_grid(pipe)
    rows, examples = [], []
    chunks = list(sample_chunks(prompts, seeds))
    for chunk_prompts, chunk_seeds in tqdm(chunks, desc="overlap study", disable=not progress):
        tree = record(pipe, chunk_prompts, seeds=chunk_seeds, steps=steps, layers=[grid], keep_steps=keep,
                      batch_size=CHUNK, progress=False)
        chunk_rows, chunk_examples = overlap_chunk(tree, grid, subject, judge)
        rows += chunk_rows
        examples = _keep_examples(examples, chunk_examples)
    metrics = pd.DataFrame(rows)
    association = failure_association(metrics, n_boot=QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
    figures = {"overlap_auc": plots.overlap_auc(association), "overlap_examples": plots.overlap_examples(examples)}
    return OverlapStudy(metrics, association, examples, figures, save_figures(figures, out))


def _auc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (..., n) for labels ``y`` (..., n) by the Mann–Whitney rank sum (ties ½)."""
    ranks = rankdata(scores, axis=-1)
    positives = y.sum(-1)
    negatives = y.shape[-1] - positives
    return ((ranks * y).sum(-1) - positives * (positives + 1) / 2) / (positives * negatives)


def auc_interval(y: np.ndarray, scores: np.ndarray, clusters=None, n_boot: int = BOOTSTRAPS,
                 confidence: float | Sequence[float] = CONFIDENCE, seed: int = 0) -> tuple[float, ...]:
    """ROC AUC of ``scores`` for the binary ``y`` and its percentile bootstrap interval, whole ``clusters``
    (prompts) resampled (default: each image its own). Several ``confidence`` levels give (auc, low, high, low₂,
    high₂, …) from the same resamples.

    NaN when ``y`` holds one class only; resamples with one class are skipped.
    """
    levels = [confidence] if np.isscalar(confidence) else list(confidence)
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return (float("nan"),) * (1 + 2 * len(levels))
    auc = float(_auc_rows(y, scores))
    _, cluster = np.unique(np.asarray(np.arange(len(y)) if clusters is None else clusters).astype(str),
                           return_inverse=True)
    members = [np.flatnonzero(cluster == c) for c in range(cluster.max() + 1)]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        index = np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        yb = y[index]
        if yb.any() and not yb.all():
            boot.append(float(_auc_rows(yb, scores[index])))
    out = [auc]
    for level in levels:
        tail = (1 - level) / 2 * 100
        out += list(np.percentile(boot, [tail, 100 - tail])) if boot else [np.nan, np.nan]
    return tuple(float(v) for v in out)


def cross_validated_scores(X: np.ndarray, y: np.ndarray, groups=None, folds: int = FOLDS,
                           seed: int = 0) -> np.ndarray | None:
    """Out-of-fold P(outcome) of a standardised logistic regression on all metrics, folds grouped by prompt (the
    images of one prompt never sit on both sides of a split); None if a class is too rare."""
    y = np.asarray(y, bool)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups).astype(str)
    folds = min(folds, len(set(groups[y])), len(set(groups[~y])))
    if folds < 2:
        return None
    split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(LinearProbe()._pipeline(), X, y, cv=split, groups=groups, method="predict_proba")[:, 1]


def failure_association(metrics: pd.DataFrame, outcomes: Sequence[str] = OVERLAP_OUTCOMES,
                        names: Sequence[str] = METRICS, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Per outcome and step: ROC AUC of each metric for the outcome (a boolean column of ``metrics``: "any subject
    missing", "subjects mixed"), and of all metrics together, with intervals that resample prompts.

    AUC > 0.5: larger values go with the failure (expected for soft IoU, self-cross overlap, A&E loss); < 0.5:
    smaller values do (expected for centre distance, KL, intensity). The joint row (``metric == ALL_METRICS``) is
    the cross-validated AUC (folds grouped by prompt) of a logistic regression on every metric. ``ci_low`` /
    ``ci_high``: 95%; ``ci_low_adj`` / ``ci_high_adj``: Bonferroni over the steps (95% family-wise for a step
    chosen after looking at all of them). ``n_cases``: images with the outcome; where it is 0 or ``n`` the AUC is NaN.
    """
    rows = []
    steps = metrics.groupby(["step", "timestep"], sort=True)
    adjusted = 1 - (1 - CONFIDENCE) / max(1, steps.ngroups)
    for outcome, ((step, timestep), frame) in itertools.product(outcomes, steps):
        y = frame[outcome].to_numpy(bool)
        prompts = frame.prompt.to_numpy()
        base = {"outcome": outcome, "step": int(step), "timestep": float(timestep), "n": len(y),
                "n_prompts": len(set(prompts)), "n_cases": int(y.sum())}
        scored = [(name, frame[name].to_numpy()) for name in names]
        joint = cross_validated_scores(frame[list(names)].to_numpy(np.float64), y, prompts, seed=seed)
        scored.append((ALL_METRICS, np.full(len(y), np.nan) if joint is None else joint))
        for name, scores in scored:
            auc, low, high, low_adj, high_adj = (
                (np.nan,) * 5 if np.isnan(scores).all() else
                auc_interval(y, scores, prompts, n_boot, (CONFIDENCE, adjusted), seed=seed))
            rows.append({"metric": name, **base, "auc": auc, "ci_low": low, "ci_high": high,
                         "ci_low_adj": low_adj, "ci_high_adj": high_adj})
    return pd.DataFrame(rows, columns=["outcome", "metric", "step", "timestep", "n", "n_prompts", "n_cases", "auc",
                                       "ci_low", "ci_high", "ci_low_adj", "ci_high_adj"])


def overlap_headline(association: pd.DataFrame) -> pd.DataFrame:
    """Per outcome and metric: AUC at the last step (with CI), and the step where the AUC lies furthest from 0.5 with
    its Bonferroni-adjusted interval (the step was chosen among all of them; ``strongest_clear``: that interval
    excludes 0.5). None when the outcome never happened, so no AUC exists."""
    rows = []
    for (outcome, metric), frame in association.groupby(["outcome", "metric"], sort=False):
        last = frame.loc[frame.step.idxmax()]
        known = frame.dropna(subset=["auc"])
        best = known.loc[(known.auc - 0.5).abs().idxmax()] if len(known) else None
        clear = best is not None and not (best.ci_low_adj <= 0.5 <= best.ci_high_adj)
        rows.append({"outcome": outcome, "metric": metric, "auc_last": last.auc, "ci_low_last": last.ci_low,
                     "ci_high_last": last.ci_high, "strongest_step": pd.NA if best is None else int(best.step),
                     "auc_strongest": math.nan if best is None else best.auc,
                     "ci_low_strongest_adj": math.nan if best is None else best.ci_low_adj,
                     "ci_high_strongest_adj": math.nan if best is None else best.ci_high_adj,
                     "strongest_clear": bool(clear), "n": int(last.n), "n_prompts": int(last.n_prompts),
                     "n_cases": int(last.n_cases)})
    return pd.DataFrame(rows)


register(Study(
    name="overlap", title="Overlap between the subjects' maps vs entity missing and mixing", order=20,
    run=overlap_study, headline=lambda study: overlap_headline(study.association),
    tables=lambda study: {"overlap_metrics": study.metrics, "overlap_association": study.association},
    source="overlap_metrics",
    recompute=lambda table, n_boot: overlap_headline(failure_association(table, n_boot=n_boot)),
    answer=overlap_answer, figures=("overlap_auc", "overlap_examples")))
