"""Overlap between the subjects' maps and entity missing / mixing (Marioriyad et al.'s argument).

Comparison groups: each failure is compared with the images where every subject is present, missing vs all present
and mixed vs all present. An image with a subject missing cannot show its subjects mixed, so it is no control for
mixing (nor a mixed image for missing). "All present": no subject missing and none mixed; a subject drawn in the wrong
colour or shape is present. An exact copy of an image (same prompt, same seed) counts once.

Cause is read early. The headline's primary rows are step 10 of 50 (scaled to the run's steps: the nearest step
the table has); the last step is reported beside them as an outcome read-out, not a cause. By the last step the
maps show what was drawn: the built-in model is trained to keep a named-but-absent object's words off every object,
so a missing subject's map ends flat by construction and any statistic of it then reads the outcome.

All statistics together: a standardised logistic regression's out-of-fold AUC (folds grouped by prompt), averaged
over :data:`FOLD_SEEDS` fold seeds and reported with its SD and min–max over them, since one seed's split moves it.

Multiplicity: the study prints no p-value. Its family is each outcome's AUCs at one step (the statistics and all of
them together): ``ci_low_family`` / ``ci_high_family`` are Bonferroni intervals over it (Holm, the family's test in
its registration, has no interval form; its power calculation used this bound), and an AUC whose family
interval excludes 0.5 stands apart from chance (``apart_from_chance``, :func:`family_text`); the 95% intervals beside
are per comparison, and ``ci_low_adj`` / ``ci_high_adj`` (association table) are Bonferroni over the steps, for a
step chosen after looking at all of them. The headline's two steps are fixed in advance.
"""

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
from probe.studies.answers import add_section_text
from probe.studies.common import (
    BOOTSTRAPS,
    CHUNK,
    CONFIDENCE,
    QUICK_BOOTSTRAPS,
    Judge,
    Subject,
    as_written,
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
CONTROL = "all present"  # the comparison group of every outcome: no subject missing, none mixed
IMAGE = ("prompt", "seed", "step")  # one image at one step: rows that repeat these are copies of one image
FOLD_SEEDS = 20  # fold seeds the logistic regression's cross-validated AUC is averaged over
EARLY_STEP, REFERENCE_STEPS = 10, 50  # cause is read at step 10 of 50, as the guidance studies read overlap
CAUSE_READ, OUTCOME_READ = "cause (early step)", "outcome read-out, not cause"
ASSOCIATION_COLUMNS = ["outcome", "metric", "step", "timestep", "n", "n_prompts", "n_cases", "auc", "ci_low",
                       "ci_high", "ci_low_adj", "ci_high_adj", "ci_low_family", "ci_high_family", "control",
                       "n_controls", "fold_seeds", "auc_sd", "auc_min", "auc_max"]
HEADLINE_COLUMNS = ["outcome", "control", "metric", "read", "primary", "step", "timestep", "auc", "ci_low", "ci_high",
                    "ci_low_family", "ci_high_family", "apart_from_chance", "fold_seeds", "auc_sd", "auc_min",
                    "auc_max", "n", "n_prompts", "n_cases", "n_controls"]


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


def distinct_prompts() -> list[str]:
    """Every two-object prompt with two different colours and two different shapes (so nouns do not repeat), in a
    fixed order; the two orders of one pair of objects are two prompts."""
    return [f"a {c1} {s1} and a {c2} {s2}" for c1, c2 in itertools.permutations(COLOURS, 2)
            for s1, s2 in itertools.permutations(SHAPES, 2)]


def overlap_prompts(n: int, seed: int = OVERLAP_SEED) -> list[str]:
    """``n`` distinct two-object prompts, drawn without replacement: a prompt drawn twice would make the same images
    again (same prompt, same seeds), counted as new evidence."""
    every = distinct_prompts()
    if n > len(every):
        raise ValueError(f"the overlap study draws distinct prompts: {n} asked for, but only {len(every)} distinct "
                         f"two-object prompts exist ({len(COLOURS)} colours, {len(SHAPES)} shapes)")
    rng = np.random.default_rng(seed)
    return [every[i] for i in rng.choice(len(every), n, replace=False)]


def overlap_design(n_images: int, seeds_per_prompt: int = OVERLAP_SEEDS_PER_PROMPT, seed_offset: int = 0
                   ) -> tuple[list[str], list[int]]:
    """The study's prompts and seeds (every prompt with every seed): ``n_images / seeds_per_prompt`` distinct prompts,
    so no (prompt, seed) pair repeats; too many images for the distinct prompts is an error that says how many."""
    needed = max(1, math.ceil(n_images / seeds_per_prompt))
    available = len(distinct_prompts())
    if needed > available:
        raise ValueError(f"{n_images} images at {seeds_per_prompt} seeds per prompt need {needed} prompts, but only "
                         f"{available} distinct two-object prompts exist: ask for at most "
                         f"{available * seeds_per_prompt} images, or more seeds per prompt")
    return overlap_prompts(needed), [OVERLAP_SEED + seed_offset + i for i in range(seeds_per_prompt)]


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
                  seeds_per_prompt: int = OVERLAP_SEEDS_PER_PROMPT, progress: bool = True,
                  seed_offset: int = 0) -> OverlapStudy:
    """Overlap statistics of two-object images at every step, and their association with entity missing and mixing.

    ``n_images / seeds_per_prompt`` distinct prompts (two colours, two shapes, all different; drawn without
    replacement), each with the same seeds.
    Maps are layer means at the cross-attention grid closest to 16×16; the self-cross overlap uses the
    Otsu-aggregated self-attention at that grid. An image counts as missing (mixed) when the judge finds any subject
    missing (mixed with the other); each outcome is compared with the all-present images. ``quick``: at most 16 images,
    the centre step of each third plus the headline's two steps, 200 bootstrap resamples. ``seed_offset``: added to
    every seed (the prompts stay the same draw), so that a registered run does not reuse an earlier run's images.
    """
    pipe = load(pipe)
    n_images = whole_number(n_images, "n_images", "the number of two-object images")
    seeds_per_prompt = whole_number(seeds_per_prompt, "seeds_per_prompt", "the number of seeds of each prompt")
    seed_offset = whole_number(seed_offset, "seed_offset", "added to every seed of the study", minimum=0)
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "overlap")
    n_images = min(n_images, QUICK_OVERLAP_IMAGES) if quick else n_images
    prompts, seeds = overlap_design(n_images, seeds_per_prompt, seed_offset)
    keep = sorted({*(s for v in step_bins(steps, per_bin=1).values() for s in v), *headline_steps(range(steps))}
                  ) if quick else None
    grid = nearest_grid(pipe)
    rows, examples = [], []
    chunks = list(sample_chunks(prompts, seeds))
    for chunk_prompts, chunk_seeds in tqdm(chunks, desc="overlap study", disable=not progress):
        tree = record(pipe, chunk_prompts, seeds=chunk_seeds, steps=steps, layers=[grid], keep_steps=keep,
                      batch_size=CHUNK, progress=False)
        chunk_rows, chunk_examples = overlap_chunk(tree, grid, subject, judge)
        rows += chunk_rows
        examples = _keep_examples(examples, chunk_examples)
    metrics = as_written(pd.DataFrame(rows))  # the headline from the numbers the table keeps
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
    high₂, …) from the same resamples. ``scores`` (k, n): k scorings of the same images (a logistic regression's
    out-of-fold scores under k fold seeds), whose mean AUC is the estimate, resampled as one.

    NaN when ``y`` holds one class only; resamples with one class are skipped.
    """
    levels = [confidence] if np.isscalar(confidence) else list(confidence)
    y, scores = np.asarray(y, bool), np.atleast_2d(np.asarray(scores, np.float64))
    if y.all() or not y.any():
        return (float("nan"),) * (1 + 2 * len(levels))
    auc = float(_auc_rows(y, scores).mean())
    _, cluster = np.unique(np.asarray(np.arange(len(y)) if clusters is None else clusters).astype(str),
                           return_inverse=True)
    members = [np.flatnonzero(cluster == c) for c in range(cluster.max() + 1)]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        index = np.concatenate([members[c] for c in rng.integers(0, len(members), len(members))])
        yb = y[index]
        if yb.any() and not yb.all():
            boot.append(float(_auc_rows(yb, scores[:, index]).mean()))
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


def fold_seed_scores(X: np.ndarray, y: np.ndarray, groups=None, seeds: Sequence[int] = range(FOLD_SEEDS),
                     folds: int = FOLDS) -> np.ndarray | None:
    """:func:`cross_validated_scores` under each fold seed, (seeds, n): one seed's split is an arbitrary pick that
    moves the AUC, so it is read over many. None if a class is too rare."""
    scores = [cross_validated_scores(X, y, groups, folds, seed=int(seed)) for seed in seeds]
    return None if not scores or scores[0] is None else np.stack(scores)


def distinct_images(metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with each image once per step: a copy (same prompt and seed) is the same image, not more evidence.
    A table without seeds is kept as it is."""
    keys = [key for key in IMAGE if key in metrics]
    return metrics.drop_duplicates(keys) if "seed" in keys else metrics


def all_present(metrics: pd.DataFrame, outcomes: Sequence[str] = OVERLAP_OUTCOMES) -> pd.Series:
    """The images with none of the failures (no subject missing, none mixed): every outcome's comparison group."""
    failed = [name for name in dict.fromkeys([*OVERLAP_OUTCOMES, *outcomes]) if name in metrics]
    return ~metrics[failed].astype(bool).any(axis=1)


def _seed_spread(y: np.ndarray, scores: np.ndarray | None) -> dict[str, float]:
    """The joint score's AUC over fold seeds: how many, their SD (n − 1) and range."""
    if scores is None or not y.any() or y.all():
        return {"fold_seeds": len(scores) if scores is not None else np.nan, "auc_sd": np.nan, "auc_min": np.nan,
                "auc_max": np.nan}
    aucs = _auc_rows(y, scores)
    return {"fold_seeds": len(aucs), "auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else np.nan,
            "auc_min": float(aucs.min()), "auc_max": float(aucs.max())}


def _association_rows(frame: pd.DataFrame, outcome: str, at: tuple[int, float], names: Sequence[str], n_boot: int,
                      levels: tuple[float, float], seed: int, fold_seeds: int) -> list[dict]:
    """One outcome at one step ``at`` (step, timestep): ``frame`` holds its cases and the all-present images."""
    y = frame[outcome].to_numpy(bool)
    prompts = frame.prompt.to_numpy()
    base = {"outcome": outcome, "step": int(at[0]), "timestep": float(at[1]),
            "n": len(y), "n_prompts": len(set(prompts)), "n_cases": int(y.sum()), "control": CONTROL,
            "n_controls": int((~y).sum())}
    joint = fold_seed_scores(frame[list(names)].to_numpy(np.float64), y, prompts, seed + np.arange(fold_seeds))
    scored = [(name, frame[name].to_numpy(np.float64)) for name in names] + [(ALL_METRICS, joint)]
    rows = []
    for name, scores in scored:
        known = scores is not None and not np.isnan(scores).all()
        auc, low, high, low_adj, high_adj, low_family, high_family = (
            auc_interval(y, scores, prompts, n_boot, levels, seed=seed) if known else (np.nan,) * 7)
        spread = _seed_spread(y, scores) if name == ALL_METRICS else {}
        rows.append({"metric": name, **base, "auc": auc, "ci_low": low, "ci_high": high, "ci_low_adj": low_adj,
                     "ci_high_adj": high_adj, "ci_low_family": low_family, "ci_high_family": high_family, **spread})
    return rows


def failure_association(metrics: pd.DataFrame, outcomes: Sequence[str] = OVERLAP_OUTCOMES,
                        names: Sequence[str] = METRICS, n_boot: int = BOOTSTRAPS, seed: int = 0,
                        fold_seeds: int = FOLD_SEEDS) -> pd.DataFrame:
    """Per outcome and step: ROC AUC of each metric for the outcome (a boolean column of ``metrics``: "any subject
    missing", "subjects mixed") against the all-present images (:func:`all_present`; an image with the other
    failure is in neither group), and of all metrics together, with intervals that resample prompts.

    AUC > 0.5: larger values go with the failure (expected for soft IoU, self-cross overlap, A&E loss); < 0.5:
    smaller values do (expected for centre distance, KL, intensity). The joint row (``metric == ALL_METRICS``) is
    the cross-validated AUC (folds grouped by prompt) of a logistic regression on every metric, the mean over
    ``fold_seeds`` fold seeds (``auc_sd``, ``auc_min``, ``auc_max``: its spread over them; its interval resamples
    the mean). ``ci_low`` / ``ci_high``: 95%; ``ci_low_adj`` / ``ci_high_adj``: Bonferroni over the steps (95%
    family-wise for a step chosen after looking at all of them); ``ci_low_family`` / ``ci_high_family``: Bonferroni
    over the statistics of one outcome at one step (the registered family; Holm has no interval form, and Bonferroni
    is the bound its power calculation used). ``n``: images compared, ``n_cases`` of them with
    the outcome, ``n_controls`` all present; where either is 0 the AUC is NaN. Copies of an image count once.
    """
    metrics = distinct_images(metrics)
    metrics = metrics.assign(_control=all_present(metrics, outcomes))
    steps = metrics.groupby(["step", "timestep"], sort=True)
    levels = (CONFIDENCE, 1 - (1 - CONFIDENCE) / max(1, steps.ngroups), 1 - (1 - CONFIDENCE) / (len(names) + 1))
    rows = []
    for outcome, (at, frame) in itertools.product(outcomes, steps):
        compared = frame[frame[outcome].astype(bool) | frame._control]
        rows += _association_rows(compared, outcome, at, names, n_boot, levels, seed, fold_seeds)
    return pd.DataFrame(rows, columns=ASSOCIATION_COLUMNS)


def headline_steps(steps) -> tuple[int, int]:
    """(early, last) of the recorded ``steps``: the step nearest step 10 of 50 scaled to the run (its last step + 1
    steps), where cause is read, and the last step, where the maps read the outcome out."""
    steps = sorted({int(s) for s in steps})
    target = round(EARLY_STEP / REFERENCE_STEPS * (steps[-1] + 1))
    return min(steps, key=lambda s: (abs(s - target), s)), steps[-1]


def headline_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows of the headline's two steps (:func:`headline_steps`): all the headline needs, so recomputing it
    from a per-image table skips the other steps."""
    return metrics[metrics.step.isin(headline_steps(metrics.step))]


def overlap_headline(association: pd.DataFrame) -> pd.DataFrame:
    """Per outcome and metric (each outcome against the all-present images): the AUC at the early step first
    (``primary``, read as cause), then at the last step, reported beside it as an outcome read-out, not a cause
    (the maps then show what was drawn). One row when the run has one step."""
    if association.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    early, last = headline_steps(association.step)
    reads = [(early, CAUSE_READ, True)] + ([(last, OUTCOME_READ, False)] if last != early else [])
    parts = [association[association.step == step].assign(read=read, primary=primary)
             for step, read, primary in reads]
    headline = pd.concat(parts, ignore_index=True)
    headline["apart_from_chance"] = (headline.ci_low_family > 0.5) | (headline.ci_high_family < 0.5)
    return headline[HEADLINE_COLUMNS]


def family_text(headline: pd.DataFrame | None = None) -> str:
    """The overlap study's family in one paragraph for its section: which statistics' AUCs stand apart from chance
    at the primary step, each outcome on its own, with the family-wise interval."""
    count = len(METRICS) + 1
    text = (f"**Family.** Per outcome, the {count} AUCs at the primary step (the {count - 1} statistics and all of "
            f"them together); an AUC stands apart from chance when its family-wise interval (Bonferroni, "
            f"{1 - (1 - CONFIDENCE) / count:.2%} per AUC: the interval form of the registered Holm family, whose "
            "power calculation used this bound) excludes 0.5. No p-value is printed.")
    if headline is None or "apart_from_chance" not in headline:
        return text
    primary = headline[headline.primary.astype(str).str.lower() == "true"]
    for outcome, rows in primary.groupby("outcome", sort=False):
        apart = rows[rows.apart_from_chance.astype(str).str.lower() == "true"]
        listed = ", ".join(f"{r.metric} {r.auc:.2f} [{r.ci_low_family:.2f}, {r.ci_high_family:.2f}]"
                           for r in apart.itertuples())
        text += f" {outcome.capitalize()} against all present: {len(apart)} of {len(rows)} apart ({listed})."
    return text


def _joint_text(rows: pd.DataFrame) -> str:
    joint = rows[rows.metric == ALL_METRICS]
    if joint.empty or np.isnan(joint.auc.iloc[0]):
        return ""
    j = joint.iloc[0]
    return (f"; all statistics together (logistic, mean over {int(j.fold_seeds)} fold seeds) AUC {j.auc:.2f}, SD "
            f"{j.auc_sd:.3f}, range {j.auc_min:.3f}–{j.auc_max:.3f}")


def _separates(rows: pd.DataFrame, outcome: str) -> str:
    """The single statistic furthest from 0.5 whose interval excludes 0.5, for one outcome at one step."""
    single = rows[rows.metric != ALL_METRICS].dropna(subset=["auc"])
    clear = single[(single.ci_low > 0.5) | (single.ci_high < 0.5)]
    counts = f"{int(rows.n_cases.max())} vs {int(rows.n_controls.max())} images"
    if clear.empty:
        return f"no single statistic separates {outcome} images from all-present ones ({counts})"
    best = clear.loc[(clear.auc - 0.5).abs().idxmax()]
    return (f"{best.metric} separates {outcome} images from all-present ones best (AUC {best.auc:.2f} "
            f"[{best.ci_low:.2f}, {best.ci_high:.2f}], {counts})")


def overlap_answer(headline: pd.DataFrame) -> str:
    """Per outcome, the statistic that best separates it from the all-present images at the early step (cause),
    and all statistics together; then the last step, named as the outcome read-out it is."""
    if headline.empty:
        return "No outcome was measured."
    primary = headline.primary.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))  # as read from CSV
    cause, beside = headline[primary], headline[~primary]
    early, steps = int(cause.step.iloc[0]), int(headline.step.max()) + 1
    parts = [_separates(rows, outcome) + _joint_text(rows) for outcome, rows in cause.groupby("outcome", sort=False)]
    text = f"Read at step {early} of {steps}, where cause is read: " + "; ".join(parts) + "."
    if beside.empty:
        return text
    late = "; ".join(_separates(rows, outcome) for outcome, rows in beside.groupby("outcome", sort=False))
    return (f"{text} At the last step (an outcome read-out, not cause) {late}: the built-in model is trained to "
            "keep a named-but-absent object's words off every object, so a missing subject's map is flat at the end "
            "by construction.")


register(Study(
    name="overlap", title="Overlap between the subjects' maps vs entity missing and mixing", order=20,
    run=overlap_study, headline=lambda study: overlap_headline(study.association),
    tables=lambda study: {"overlap_metrics": study.metrics, "overlap_association": study.association},
    source="overlap_metrics",
    recompute=lambda table, n_boot: overlap_headline(failure_association(headline_rows(table), n_boot=n_boot)),
    answer=overlap_answer, figures=("overlap_auc", "overlap_examples"), compressed=("overlap_metrics",)))
add_section_text("overlap", family_text)
