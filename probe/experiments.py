"""The studies behind the figures and tables. Experiments compute; :mod:`probe.plots` draws.

- :func:`probe_study`: linear probes (:mod:`probe.probes`) read colour, shape and position off cross- vs
  self-attention maps of single-object images, by layer and step (Free-Prompt-Editing's probing argument).
- :func:`overlap_study`: how the two subjects' maps overlap in two-object images, step by step, and how well each
  overlap statistic predicts that the judge finds a subject missing (Marioriyad et al.'s entity-missing argument).
- :func:`edit_study`: self- vs cross-attention injection editing (:func:`probe.edit.study`), aggregated.
- :func:`guidance_study`: the causal test: does guidance that lowers overlap lower entity missing, beyond
  Attend-and-Excite? :func:`self_cross_study`: does Self-Cross guidance lower subject mixing on similar subjects?
- :func:`run_all`: every study, every figure and table, from fixed seeds.

Every study uses fixed seeds, records in chunks of :data:`CHUNK` samples and reduces each chunk at once to what it
keeps (probe features, per-image metrics), so memory does not grow with the number of images. ``quick=True`` shrinks
every size for tests and notebooks. The shapes-world judge is the default; any callable ``judge(image, prompt)``
returning per-subject objects with ``.status`` (and ``.detection.mask`` for positions) can replace it.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from tqdm.auto import tqdm

from probe import plots
from probe.edit import DEFAULT_FRACTION, STEPS_FRACTIONS
from probe.edit import study as edit_sweep
from probe.guide import OBJECTIVES, InitNO, Schedule, generate
from probe.maps import aggregate_self_attention, gaussian_smooth, token_map, token_softmax
from probe.models import BUILTIN, attention_layers, load
from probe.overlap import (
    ae_response,
    aggregation_loss,
    com_distance,
    compactness,
    intensity,
    kl_divergence,
    pair_indices,
    self_cross_overlap,
    soft_iou,
    spread,
)
from probe.probes import (
    LinearProbe,
    attn_tensor,
    concat_features,
    phrase_indices,
    probe_features,
    step_bins,
    subject_features,
)
from probe.prompts import prompt_set, prompt_tokens, subject_indices
from probe.record import record
from probe.shapes.evaluate import GUIDANCE, HELD_OUT_SEED, STEPS
from probe.shapes.judge import detect, parse_prompt
from probe.shapes.judge import judge as exact_judge
from probe.shapes.world import COLOURS, SHAPES
from probe.tap import Call, Consumer

Subject = Literal["noun", "colour", "phrase"]
Judge = Callable[[np.ndarray, str], list]

CHUNK = 16  # samples recorded and reduced at a time
PROBE_SEED = HELD_OUT_SEED + 20_000  # seeds of the probe study's images (shared by all prompts)
OVERLAP_SEED = HELD_OUT_SEED + 30_000  # seeds and prompt draw of the overlap study
SELF_MAX_GRID = 16  # self-attention is recorded only at grids up to this (memory grows as grid⁴)
TARGET_GRID = 16  # the overlap study measures at the cross-attention grid closest to this
STEPS_PER_BIN = 2  # probe study: steps kept at the centre of each of early / middle / late
POSITION_BINS = 3  # object centre binned into a 3×3 grid of the image
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "centre", "right")
OVERLAP_SEEDS_PER_PROMPT = 4
BOOTSTRAPS = 1000
CONFIDENCE = 0.95
FOLDS = 5
EXAMPLES_PER_CLASS = 3  # images kept per outcome class (present, missing, mixed) for the examples figure
QUICK_PROBE_IMAGES = 24  # every colour × shape, one seed
QUICK_OVERLAP_IMAGES = 16  # four prompts, four seeds: one chunk
QUICK_BOOTSTRAPS = 200
PROBE_TARGETS = ("colour", "shape", "position", "judge_colour", "judge_shape")
METRICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross", "intensity_min", "spread_max",
           "ae_loss", "aggregation_max")
ALL_METRICS = "all (logistic)"
OVERLAP_OUTCOMES = ("missing", "mixed")  # an image's failures whose association with overlap is measured
DPI = 130
TABLE_FLOAT_FORMAT = "%.6g"  # six significant digits: exact enough for every statistic, and the per-image-per-step
# tables of a full-size study stay a few MB instead of twice that with 17-digit floats


# -- shared helpers ------------------------------------------------------------------------------------------------


def subject_word(colour: str, shape: str, subject: Subject = "noun") -> str:
    """The words whose map stands for a subject: its noun (default), its colour word, or both."""
    return {"noun": shape, "colour": colour, "phrase": f"{colour} {shape}"}[subject]


def _chunks(prompts: Sequence[str], seeds: Sequence[int], size: int = CHUNK):
    """(prompts, seeds) pieces whose product (what ``record`` generates) has at most ``size`` samples."""
    if len(seeds) >= size:
        for prompt in prompts:
            for start in range(0, len(seeds), size):
                yield [prompt], list(seeds[start : start + size])
    else:
        per = max(1, size // len(seeds))
        for start in range(0, len(prompts), per):
            yield list(prompts[start : start + per]), list(seeds)


def _save(figures: dict, out: str | Path | None) -> dict[str, Path]:
    if out is None:
        return {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=DPI)
    return paths


def _store(out: str | Path | None, table: str) -> Path | None:
    """Where a long study keeps its per-image rows as it goes (:class:`ImageRows`): its own table in ``out``."""
    return None if out is None else Path(out) / f"{table}.csv"


def _samples(tree) -> tuple[list[str], list[int], np.ndarray]:
    images = tree["images"]
    return [str(p) for p in images["prompt"].values], [int(s) for s in images["seed"].values], images["image"].values


# -- probe study ---------------------------------------------------------------------------------------------------


@dataclass
class ProbeStudy:
    """``labels``: one row per image; ``accuracy``: the probe table (:func:`probe.probes.probe_features`)."""

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


def object_labels(image: np.ndarray, prompt: str, judge: Judge = exact_judge) -> dict:
    """Labels of a single-object image: colour and shape asked for, and, where the judge found the subject
    (any status but missing), the colour, shape and position bin of what it found."""
    colour, shape = parse_prompt(prompt)[0]
    status = judge(image, prompt)[0]
    found = status.detection if status.status != "missing" else None
    return {"colour": colour, "shape": shape, "status": status.status,
            "judge_colour": found.colour if found is not None else None,
            "judge_shape": found.shape if found is not None else None,
            "position": position_bin(found.mask) if found is not None else None}


def probe_study(pipe, n_images: int = 500, steps: int = STEPS, quick: bool = False, out: str | Path | None = None,
                subject: Subject = "noun", judge: Judge = exact_judge, progress: bool = True) -> ProbeStudy:
    """Probe colour, shape and position from cross vs self maps of single-object images, by layer and step.

    Prompts are "a {colour} {shape}" for every colour × shape, each with the same ``ceil(n_images / 24)`` seeds
    (so positions, drawn by the seed, are independent of colour and shape). Colour and shape labels are what the
    prompt asked for; ``judge_colour``, ``judge_shape`` and ``position`` are what the judge found (only images where
    it found the subject). Steps: two at the centre of each of early / middle / late (one when ``quick``).
    ``quick`` also caps the images at 24 and probes only the layer means.
    """
    pipe = load(pipe)
    n_images = min(n_images, QUICK_PROBE_IMAGES) if quick else n_images
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    seeds = [PROBE_SEED + i for i in range(max(1, math.ceil(n_images / len(prompts))))]
    bins = step_bins(steps, per_bin=1 if quick else STEPS_PER_BIN)
    keep = sorted({s for steps_ in bins.values() for s in steps_})
    layers = probe_layers(pipe)
    parts, rows = [], []
    chunks = list(_chunks(prompts, seeds))
    for chunk_prompts, chunk_seeds in tqdm(chunks, desc="probe study", disable=not progress):
        tree = record(pipe, chunk_prompts, seeds=chunk_seeds, steps=steps, layers=layers, keep_steps=keep,
                      batch_size=CHUNK, progress=False)
        chunk_prompts_, chunk_seeds_, images = _samples(tree)
        words = [subject_word(*parse_prompt(p)[0], subject) for p in chunk_prompts_]
        parts.append(subject_features(tree, words, bins, per_layer=not quick))
        rows += [{"prompt": p, "seed": s, **object_labels(im, p, judge)}
                 for p, s, im in zip(chunk_prompts_, chunk_seeds_, images)]
    labels = pd.DataFrame(rows)
    accuracy = probe_features(concat_features(parts), labels[list(PROBE_TARGETS)], LinearProbe())
    figures = {"probe_accuracy": plots.probe_accuracy(accuracy)}
    return ProbeStudy(labels, accuracy, figures, _save(figures, out))


def probe_headline(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per target and feature: the best block (resolution, layer, step bin) with its accuracy and chance.

    The best of many blocks is an optimistic estimate (selection over blocks); read it next to its interval.
    """
    if accuracy.empty:
        return accuracy
    best = accuracy.loc[accuracy.groupby(["target", "kind", "feature"]).accuracy.idxmax()]
    columns = ["target", "kind", "feature", "accuracy", "ci_low", "ci_high", "chance", "resolution", "layer",
               "step_bin", "n"]
    return best[columns].sort_values(["target", "kind", "feature"]).reset_index(drop=True)


# -- overlap study -------------------------------------------------------------------------------------------------


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


def nearest_grid(pipe, target: int = TARGET_GRID) -> int:
    """The cross-attention grid (height) closest to ``target``; the larger one on a tie."""
    grids = {layer.grid[0] for layer in attention_layers(pipe) if layer.kind == "cross"}
    return min(grids, key=lambda g: (abs(g - target), -g))


def pair_metrics(maps: torch.Tensor, self_maps: torch.Tensor, ae_maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic of two subjects' maps (..., 2, H, W) → (...,): overlap of the pair and each subject's own.

    ``maps``: cross-attention; ``self_maps``: Otsu-aggregated self-attention; ``ae_maps``: token-softmaxed and
    smoothed cross-attention (Attend-and-Excite's view). Suffix ``_a`` / ``_b``: first / second subject of the
    prompt; ``_min`` / ``_max``: the weaker subject, which is the one that goes missing.
    """
    a, b = maps[..., 0, :, :], maps[..., 1, :, :]
    own = {"intensity": intensity(maps), "spread": spread(maps), "ae": ae_response(ae_maps),
           "aggregation": aggregation_loss(maps)}
    return {
        "soft_iou": soft_iou(a, b),
        "com_distance": com_distance(a, b),
        "kl_sym": kl_divergence(a, b, "sym"),
        "compactness": compactness(a, b),
        "self_cross": self_cross_overlap(maps, self_maps),
        "intensity_min": own["intensity"].amin(-1),
        "spread_max": own["spread"].amax(-1),
        "ae_loss": own["ae"].amax(-1),
        "aggregation_max": own["aggregation"].amax(-1),
        **{f"{name}_{s}": values[..., i] for name, values in own.items() for i, s in enumerate("ab")},
    }


def _subject_maps(cross: torch.Tensor, tokens: list[str], words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's subject maps (step, 2, H, W) and their A&E view, from layer-mean cross (step, H, W, T)."""
    indices = [phrase_indices(tokens, w) for w in words]
    maps = torch.stack([token_map(cross, ix) for ix in indices], -3)
    end = sum(1 for t in tokens if t) - 1  # the end token; padding after it is not recorded
    soft = token_softmax(cross, last=end)
    return maps, gaussian_smooth(torch.stack([token_map(soft, ix) for ix in indices], -3))


def overlap_chunk(tree, grid: int, subject: Subject = "noun", judge: Judge = exact_judge
                  ) -> tuple[list[dict], list[Example]]:
    """Reduce one recorded chunk to per-(image, step) metric rows, plus every image as a candidate example."""
    cross, ds = attn_tensor(tree["cross"][f"res{grid}"])
    selfattn, _ = attn_tensor(tree["self"][f"res{grid}"])
    cross, selfattn = cross.mean(2), selfattn.mean(2)  # layer means: (S, step, y, x, T), (S, step, y, x, ky, kx)
    prompts, seeds, images = _samples(tree)
    texts = ds["token_text"].values
    words = [[subject_word(c, s, subject) for c, s in parse_prompt(p)] for p in prompts]
    pairs = [_subject_maps(cross[i], [str(t) for t in texts[i]], words[i]) for i in range(len(prompts))]
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
    n_images = min(n_images, QUICK_OVERLAP_IMAGES) if quick else n_images
    prompts = overlap_prompts(max(1, math.ceil(n_images / seeds_per_prompt)))
    seeds = [OVERLAP_SEED + i for i in range(seeds_per_prompt)]
    keep = sorted({s for v in step_bins(steps, per_bin=1).values() for s in v}) if quick else None
    grid = nearest_grid(pipe)
    rows, examples = [], []
    chunks = list(_chunks(prompts, seeds))
    for chunk_prompts, chunk_seeds in tqdm(chunks, desc="overlap study", disable=not progress):
        tree = record(pipe, chunk_prompts, seeds=chunk_seeds, steps=steps, layers=[grid], keep_steps=keep,
                      batch_size=CHUNK, progress=False)
        chunk_rows, chunk_examples = overlap_chunk(tree, grid, subject, judge)
        rows += chunk_rows
        examples = _keep_examples(examples, chunk_examples)
    metrics = pd.DataFrame(rows)
    association = failure_association(metrics, n_boot=QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
    figures = {"overlap_auc": plots.overlap_auc(association), "overlap_examples": plots.overlap_examples(examples)}
    return OverlapStudy(metrics, association, examples, figures, _save(figures, out))


def _auc_rows(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (..., n) for labels ``y`` (..., n) by the Mann–Whitney rank sum (ties ½)."""
    ranks = rankdata(scores, axis=-1)
    positives = y.sum(-1)
    negatives = y.shape[-1] - positives
    return ((ranks * y).sum(-1) - positives * (positives + 1) / 2) / (positives * negatives)


def auc_interval(y: np.ndarray, scores: np.ndarray, n_boot: int = BOOTSTRAPS, confidence: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float, float]:
    """ROC AUC of ``scores`` for the binary ``y`` and its percentile bootstrap interval (images resampled).

    NaN when ``y`` holds one class only; resamples with one class are skipped.
    """
    y, scores = np.asarray(y, bool), np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return float("nan"), float("nan"), float("nan")
    auc = float(_auc_rows(y, scores))
    index = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    yb, sb = y[index], scores[index]
    both = yb.any(-1) & ~yb.all(-1)
    boot = _auc_rows(yb[both], sb[both])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (np.nan, np.nan)
    return auc, float(low), float(high)


def cross_validated_scores(X: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray | None:
    """Out-of-fold P(outcome) of a standardised logistic regression on all metrics; None if a class is too rare."""
    y = np.asarray(y, bool)
    folds = min(folds, int(y.sum()), int((~y).sum()))
    if folds < 2:
        return None
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(LinearProbe()._pipeline(), X, y, cv=split, method="predict_proba")[:, 1]


def failure_association(metrics: pd.DataFrame, outcomes: Sequence[str] = OVERLAP_OUTCOMES,
                        names: Sequence[str] = METRICS, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Per outcome and step: ROC AUC (bootstrap CI) of each metric for the outcome (a boolean column of
    ``metrics``: "any subject missing", "subjects mixed"), and of all metrics together.

    AUC > 0.5: larger values go with the failure (expected for soft IoU, self-cross overlap, A&E loss); < 0.5:
    smaller values do (expected for centre distance, KL, intensity). The joint row (``metric == ALL_METRICS``) is
    the cross-validated AUC of a logistic regression on every metric, its interval bootstrapped over the pooled
    out-of-fold predictions. ``n_cases``: images with the outcome; where it is 0 or ``n`` the AUC is NaN.
    """
    rows = []
    steps = metrics.groupby(["step", "timestep"], sort=True)
    for outcome, ((step, timestep), frame) in itertools.product(outcomes, steps):
        y = frame[outcome].to_numpy(bool)
        base = {"outcome": outcome, "step": int(step), "timestep": float(timestep), "n": len(y),
                "n_cases": int(y.sum())}
        for name in names:
            auc, low, high = auc_interval(y, frame[name].to_numpy(), n_boot, seed=seed)
            rows.append({"metric": name, **base, "auc": auc, "ci_low": low, "ci_high": high})
        scores = cross_validated_scores(frame[list(names)].to_numpy(np.float64), y, seed=seed)
        auc, low, high = (np.nan,) * 3 if scores is None else auc_interval(y, scores, n_boot, seed=seed)
        rows.append({"metric": ALL_METRICS, **base, "auc": auc, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["outcome", "metric", "step", "timestep", "n", "n_cases", "auc", "ci_low",
                                       "ci_high"])


def overlap_headline(association: pd.DataFrame) -> pd.DataFrame:
    """Per outcome and metric: AUC at the last step (with CI) and the step where the AUC lies furthest from 0.5
    (none when the outcome never happened, so no AUC exists)."""
    rows = []
    for (outcome, metric), frame in association.groupby(["outcome", "metric"], sort=False):
        last = frame.loc[frame.step.idxmax()]
        known = frame.dropna(subset=["auc"])
        best = known.loc[(known.auc - 0.5).abs().idxmax()] if len(known) else None
        rows.append({"outcome": outcome, "metric": metric, "auc_last": last.auc, "ci_low_last": last.ci_low,
                     "ci_high_last": last.ci_high, "strongest_step": pd.NA if best is None else int(best.step),
                     "auc_strongest": math.nan if best is None else best.auc,
                     "n": int(last.n), "n_cases": int(last.n_cases)})
    return pd.DataFrame(rows)


# -- guidance study ------------------------------------------------------------------------------------------------

GUIDANCE_SEED = HELD_OUT_SEED + 40_000  # seeds of the guidance study's images (shared by every method)
SELF_CROSS_SEED = HELD_OUT_SEED + 50_000  # seeds of the self-cross study's images
GUIDANCE_SETS = ("shapes-2", "shapes-3")  # the built-in world's two- and three-object prompts
SIMILAR_SET = "shapes-similar"  # confusable subjects (red/orange, blue/purple, circle/ellipse)
NO_GUIDANCE = "none"  # plain generation through the same code path (tap, callback, noise), nothing guided
BASELINE = "ae"  # Attend-and-Excite: what the overlap-lowering methods must beat
GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i")
OVERLAP_METHODS = ("iou", "com", "kl", "cc", "self_cross", "ai_t2i")  # objectives that push subjects' maps apart
SELF_CROSS_METHODS = (NO_GUIDANCE, "ae", "self_cross")
POOLED = "overlap methods (pooled)"
GUIDANCE_SEEDS_PER_PROMPT = 5  # 600 images = 2 sets × 60 prompts × 5 seeds
SELF_CROSS_IMAGES = 320  # 64 similar-subject prompts × 5 seeds
EARLY_STEP, REFERENCE_STEPS = 10, 50  # overlap is read at step 10 of 50 (scaled to other step counts) and at the end
SUMMARY_METRICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross", "intensity_mean")
QUICK_STEPS = 20  # denoising steps of every quick study (fewer when the caller asks for fewer)
QUICK_GUIDANCE_IMAGES = 4  # quick: four prompts (two per set), one seed
QUICK_GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou")
QUICK_SELF_CROSS_IMAGES = 4
QUICK_INITNO = InitNO(rounds=2, steps=5, final_steps=5)  # quick: a short initial-noise optimisation
QUICK_SCHEDULE = Schedule(max_refinement=5)  # quick: A&E's schedule with at most 5 refinement iterations


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


NO_GUIDANCE_SCHEDULE = Schedule(alter_fraction=0.0, thresholds={})  # the guide never moves the latent


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


def judged(image: np.ndarray, prompt: str, judge: Judge = exact_judge) -> dict:
    """The judge's verdict on one image, and two quality proxies.

    ``quality``: mean judge confidence (template fit × shape margin × colour purity, 0–1) of the objects the judge
    tied to the prompt's subjects; NaN where it tied none. ``precision``: the share of the objects found in the
    image that stand for some subject (1 − the share of stray objects); only with the exact judge, else NaN.
    """
    detections = detect(image) if judge is exact_judge else None
    statuses = judge(image, prompt) if detections is None else exact_judge(image, prompt, detections=detections)
    names = [s.status for s in statuses]
    found = [s.detection for s in statuses if s.status != "missing" and getattr(s, "detection", None) is not None]
    used = {id(d) for d in found}
    return {
        "statuses": ",".join(names), "n_subjects": len(names), "missing": "missing" in names,
        "n_missing": names.count("missing"), "mixed": "mixed" in names, "n_mixed": names.count("mixed"),
        "all_present": all(n == "present" for n in names),
        "quality": float(np.mean([d.confidence for d in found])) if found else math.nan,
        "precision": len(used) / len(detections) if detections else math.nan,
    }


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


def weights_id(pipe) -> str:
    """A short hash of every weight of the pipeline's modules (sums taken on their device): two pipelines with the
    same id make the same images, whatever folder or step count they were loaded from."""
    import hashlib

    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]).cpu()
            for _, module in sorted(pipe.components.items()) if isinstance(module, torch.nn.Module)
            for p in module.parameters()]
    return hashlib.sha1(torch.cat(sums).numpy().tobytes()).hexdigest()[:12]


def settings_id(**settings) -> str:
    """A short hash of the settings that decide an image's row (model weights, steps, schedule, judge, …)."""
    import hashlib

    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()[:12]


class ImageRows:
    """The per-image rows of a long study, kept in a CSV as they are made, so that a stopped run resumes.

    Rows whose ``settings_id`` matches are reused by key (prompt, seed, method, initno); new rows are written out
    every :data:`FLUSH_SECONDS` and at the end, the current run's rows first, in job order, then any other rows
    made with the same settings (from a larger run), which are kept. Rows of other settings are dropped.
    ``path=None`` keeps nothing on disk."""

    FLUSH_SECONDS = 30.0

    def __init__(self, path: str | Path | None, settings: str, order: Sequence[tuple] = ()):
        self.path, self.settings = (Path(path) if path is not None else None), settings
        self.rows: dict[tuple, dict] = {}
        if self.path is not None and self.path.is_file():
            table = pd.read_csv(self.path, dtype={"settings_id": str})
            if "settings_id" in table:
                for row in table[table.settings_id == settings].to_dict("records"):
                    self.rows[self.key(row)] = row
        self.order, self.unsaved, self.saved_at = list(order), False, time.monotonic()

    @staticmethod
    def key(row: dict) -> tuple:
        return str(row["prompt"]), int(row["seed"]), str(row["method"]), bool(row["initno"])

    def get(self, key: tuple) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = {**row, "settings_id": self.settings}
        self.unsaved = True
        if time.monotonic() - self.saved_at > self.FLUSH_SECONDS:
            self.save()

    def save(self) -> None:
        if self.path is None or not self.unsaved:
            return
        ordered = [k for k in self.order if k in self.rows]
        first = set(ordered)  # once, not per row: a full-size table has thousands of rows
        ordered += [k for k in self.rows if k not in first]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        pd.DataFrame([self.rows[k] for k in ordered]).to_csv(partial, index=False, float_format=TABLE_FLOAT_FORMAT)
        partial.replace(self.path)  # never a half-written table, even when stopped mid-write
        self.unsaved, self.saved_at = False, time.monotonic()


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
    layers = [layer for layer in attention_layers(pipe) if layer.grid[0] == grid]
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


def mean_interval(values, n_boot: int = BOOTSTRAPS, confidence: float = CONFIDENCE, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Mean of ``values`` (a rate for booleans, a paired difference for differences) and its percentile bootstrap
    interval; NaN for no values. Rounded to 12 decimals, so an exact zero difference does not print as -1.7e-18
    or -0."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    index = np.random.default_rng(seed).integers(0, values.size, (n_boot, values.size))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values[index].mean(-1), [tail, 100 - tail])
    return tuple(round(float(v), 12) + 0.0 for v in (values.mean(), low, high))  # + 0.0: no "-0"


def versus_baseline(images: pd.DataFrame, outcome: str = "missing", baseline: str = BASELINE,
                    pooled: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Does each method change ``outcome`` beyond the baseline (A&E)? Paired on (prompt, seed), per ``initno``.

    ``difference``: the method's rate minus the baseline's on the same prompts and seeds, with a percentile
    bootstrap interval over (prompt, seed); ``overlap_difference``: the same for soft IoU at step 10 (did the method
    lower overlap at all?). The pooled row (when two or more of ``pooled`` ran) averages those methods per
    (prompt, seed) first: "do overlap-lowering objectives, as a family, beat A&E?". ``verdict`` reads the interval.
    """
    key = ["prompt", "seed"]
    columns = ["method", "initno", "n_paired", "difference", "ci_low", "ci_high", "overlap_difference", "verdict"]
    rows = []
    for initno, frame in images.groupby("initno", sort=False):
        frame = frame.assign(**{outcome: frame[outcome].astype(float)})
        base = frame[frame.method == baseline].groupby(key)[[outcome, "soft_iou_t10"]].mean()
        if base.empty:
            continue
        present = list(dict.fromkeys(frame.method))
        family = [m for m in pooled if m in present]
        groups = [(m, [m]) for m in present if m != baseline] + ([(POOLED, family)] if len(family) > 1 else [])
        for name, members in groups:
            part = frame[frame.method.isin(members)].groupby(key)[[outcome, "soft_iou_t10"]].mean()
            joined = part.join(base, rsuffix="_base", how="inner")
            diff, low, high = mean_interval(joined[outcome] - joined[f"{outcome}_base"], n_boot, seed=seed)
            if math.isnan(diff):
                verdict = "not measured"
            elif high < 0:
                verdict = f"less {outcome} than {baseline}"
            elif low > 0:
                verdict = f"more {outcome} than {baseline}"
            else:
                verdict = f"no clear difference from {baseline}"
            rows.append({"method": name, "initno": bool(initno), "n_paired": len(joined), "difference": diff,
                         "ci_low": low, "ci_high": high,
                         "overlap_difference": float((joined.soft_iou_t10 - joined.soft_iou_t10_base).mean()),
                         "verdict": verdict})
    return pd.DataFrame(rows, columns=columns)


def outcome_summary(images: pd.DataFrame, outcomes: Sequence[str] = ("missing", "mixed"),
                    pooled: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """One row per (method, initno), plus the pooled overlap-lowering methods per initno when two or more ran.

    Per outcome its rate with a bootstrap interval (``{outcome}_rate``, ``{outcome}_ci_low``, ``{outcome}_ci_high``);
    the mean number of missing subjects; the mean of each :data:`SUMMARY_METRICS` at step 10 and at the end; the
    quality proxies; seconds per image.
    """
    groups = list(images.groupby(["method", "initno"], sort=False))
    for initno, frame in images.groupby("initno", sort=False):
        family = frame[frame.method.isin(pooled)]
        if family.method.nunique() > 1:
            groups.append(((POOLED, initno), family))
    rows = []
    for (method, initno), frame in groups:
        row = {"method": method, "initno": bool(initno), "n": len(frame)}
        for outcome in outcomes:
            rate, low, high = mean_interval(frame[outcome].astype(float), n_boot, seed=seed)
            row.update({f"{outcome}_rate": rate, f"{outcome}_ci_low": low, f"{outcome}_ci_high": high})
        row["n_missing_mean"] = float(frame.n_missing.mean())
        row.update({f"{m}_{at}": float(frame[f"{m}_{at}"].mean()) for m in SUMMARY_METRICS for at in ("t10", "end")})
        row.update({"quality": float(frame.quality.mean()), "precision": float(frame.precision.mean()),
                    "seconds_per_image": float(frame.seconds.mean())})
        rows.append(row)
    return pd.DataFrame(rows)


def _with_versus(summary: pd.DataFrame, versus: pd.DataFrame, prefix: str) -> pd.DataFrame:
    renamed = versus.drop(columns="n_paired").rename(columns={
        "difference": f"{prefix}diff_vs_{BASELINE}", "ci_low": f"{prefix}diff_ci_low",
        "ci_high": f"{prefix}diff_ci_high", "overlap_difference": f"iou_t10_diff_vs_{BASELINE}",
        "verdict": f"{prefix}verdict"})
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


def guidance_study(pipe, n_images: int = 600, steps: int = STEPS, quick: bool = False, out: str | Path | None = None,
                   methods: Sequence[str] = GUIDANCE_METHODS, initno: Sequence[bool] = (False, True),
                   progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                   sets: Sequence[str] = GUIDANCE_SETS, subject: Subject = "noun", judge: Judge = exact_judge,
                   guidance_scale: float = GUIDANCE, schedule: Schedule | None = None,
                   initno_settings: InitNO | None = None) -> GuidanceStudy:
    """The causal test: does guidance that lowers attention overlap lower entity missing, beyond Attend-and-Excite?

    The same ``n_images`` (prompt, seed) pairs per method: the first prompts of the two- and three-object sets, each
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
        n_images, seeds_per_prompt = min(n_images, QUICK_GUIDANCE_IMAGES), 1
        steps = min(steps, QUICK_STEPS)
        methods = QUICK_GUIDANCE_METHODS if tuple(methods) == GUIDANCE_METHODS else methods
        initno_settings, schedule = initno_settings or QUICK_INITNO, schedule or QUICK_SCHEDULE
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    seeds = [GUIDANCE_SEED + i for i in range(seeds_per_prompt)]
    images = guided_images(pipe, prompts, seeds, _configurations(methods, initno), steps=steps,
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
               "diff_ci_low", "diff_ci_high", "verdict", "mixed_rate", f"mixed_diff_vs_{BASELINE}", "mixed_diff_ci_low",
               "mixed_diff_ci_high", "mixed_verdict", "soft_iou_t10", "soft_iou_end", f"iou_t10_diff_vs_{BASELINE}",
               "intensity_mean_t10", "quality", "seconds_per_image"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    return summary[columns].sort_values(["missing_rate", "method"], kind="stable").reset_index(drop=True)


# -- self-cross study ----------------------------------------------------------------------------------------------


@dataclass
class SelfCrossStudy:
    """``images``: one row per image; ``summary``: mixing and missing rates per method with intervals."""

    images: pd.DataFrame
    summary: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def self_cross_study(pipe, n_images: int = SELF_CROSS_IMAGES, steps: int = STEPS, quick: bool = False,
                     out: str | Path | None = None, methods: Sequence[str] = SELF_CROSS_METHODS,
                     progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                     subject: Subject = "noun", judge: Judge = exact_judge,
                     guidance_scale: float = GUIDANCE, schedule: Schedule | None = None) -> SelfCrossStudy:
    """Subject mixing on similar subjects (Self-Cross guidance's claim): "a red circle and an orange ellipse".

    Prompts of ``shapes-similar`` × seeds, each method without INITNO, through :func:`guided_images`. Per method:
    the rate of images with any subject judged "mixed" (a blend or swapped attributes) and with any subject missing,
    each with a bootstrap interval, and the paired difference of the mixing rate from A&E. ``quick``: at most 4
    images (4 prompts, one seed), at most 20 steps, at most 5 refinement iterations, 200 bootstrap resamples.
    With ``out``, resumable like :func:`guidance_study` (rows in ``out/self_cross_images.csv``).
    """
    pipe = load(pipe)
    if quick:
        n_images, seeds_per_prompt, steps = min(n_images, QUICK_SELF_CROSS_IMAGES), 1, min(steps, QUICK_STEPS)
        schedule = schedule or QUICK_SCHEDULE
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts([SIMILAR_SET], n_images, seeds_per_prompt)
    seeds = [SELF_CROSS_SEED + i for i in range(seeds_per_prompt)]
    images = guided_images(pipe, prompts, seeds, _configurations(methods, (False,)), steps=steps,
                           guidance_scale=guidance_scale, subject=subject, judge=judge, schedule=schedule,
                           progress=progress, desc="self-cross study", store=_store(out, "self_cross_images"))
    summary = outcome_summary(images, ("mixed", "missing"), pooled=(), n_boot=n_boot)
    summary = _with_versus(summary, versus_baseline(images, "mixed", pooled=(), n_boot=n_boot), "mixed_")
    figures = {"self_cross_mixing": plots.outcome_rates(summary, ("mixed", "missing"), baseline=BASELINE)}
    return SelfCrossStudy(images, summary, figures, _save(figures, out))


def self_cross_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per method, least mixing first: mixing and missing rates (CIs), mixing minus A&E's (paired CI), overlap."""
    columns = ["method", "n", "mixed_rate", "mixed_ci_low", "mixed_ci_high", "missing_rate", "missing_ci_low",
               "missing_ci_high", f"mixed_diff_vs_{BASELINE}", "mixed_diff_ci_low", "mixed_diff_ci_high",
               "mixed_verdict", "soft_iou_t10", "self_cross_t10", "quality", "seconds_per_image"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    return summary[columns].sort_values(["mixed_rate", "method"], kind="stable").reset_index(drop=True)


# -- editing study -------------------------------------------------------------------------------------------------

EDIT_SEEDS = 20
QUICK_EDIT_SEEDS = 1
QUICK_EDIT_FRACTIONS = (DEFAULT_FRACTION,)
EDIT_KEYS = ["edit", "origin", "inject", "layer_set", "fraction"]
HEADLINE_LAYER_SETS = ("<=32²", "all")  # FPE's layer set first


@dataclass
class EditStudy:
    """``results``: :func:`probe.edit.study`'s rows; ``summary``: one row per edit × origin × inject × layer set ×
    fraction."""

    results: pd.DataFrame
    summary: pd.DataFrame
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def edit_summary(results: pd.DataFrame, n_boot: int = BOOTSTRAPS, seed: int = 0) -> pd.DataFrame:
    """Aggregate :func:`probe.edit.study`: success rate (bootstrap CI), structure IoU and displacement (means over
    edits where the objects were found), leak rate and the share of sources that show their own prompt.

    ``iou_vs_none`` (with ``iou_vs_none_ci_low`` / ``_high``): the structure IoU minus that of no injection on the
    same edit, origin and seed, averaged with a bootstrap interval over seeds. This paired difference is FPE's
    claim in one number: does injecting keep the source's structure better than not injecting?"""
    pair = ["edit", "origin", "seed"]
    plain = results[results.inject == "none"].set_index(pair).iou
    rows = []
    for key, frame in results.groupby(EDIT_KEYS, sort=False, dropna=False):
        rate, low, high = mean_interval(frame.success.astype(float), n_boot, seed=seed)
        leaked = frame.leaked.astype("Float64").astype(float)
        gain = (frame.set_index(pair).iou - plain).dropna() if key[2] != "none" else pd.Series(dtype=float)
        gain_mean, gain_low, gain_high = mean_interval(gain.to_numpy(), n_boot, seed=seed)
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
    """Free-Prompt-Editing's claim on the shapes world (:func:`probe.edit.study`), aggregated and drawn.

    Colour and shape edits of generated and of rendered (DDIM-inverted) sources; self- vs cross-attention injection
    vs none, per injected fraction of the steps and layer set. ``quick``: one seed, fraction 0.8 only, at most 20
    steps, 200 bootstrap resamples.
    """
    pipe = load(pipe)
    if quick:
        n_seeds, steps, steps_fractions = min(n_seeds, QUICK_EDIT_SEEDS), min(steps, QUICK_STEPS), QUICK_EDIT_FRACTIONS
    results = edit_sweep(pipe, n_seeds=n_seeds, steps_fractions=steps_fractions, num_inference_steps=steps,
                         progress=progress)
    summary = edit_summary(results, QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
    figures = {"edit_success": plots.edit_success(summary)}
    return EditStudy(results, summary, figures, _save(figures, out))


def edit_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per edit, origin and injection: the row at FPE's setting (fraction closest to 0.8, layers with ≤ 32² queries
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


# -- everything ----------------------------------------------------------------------------------------------------

STUDIES = ("probe", "overlap", "editing", "guidance", "self_cross")
STUDY_TITLES = {
    "probe": "Linear probes: what cross- and self-attention encode",
    "overlap": "Overlap between the subjects' maps vs entity missing and mixing",
    "editing": "Tuning-free editing: self- vs cross-attention injection",
    "guidance": "Guidance: does lowering overlap lower entity missing?",
    "self_cross": "Self-Cross guidance on similar subjects: mixing",
}
STUDY_FIGURES = {
    "probe": ("probe_accuracy",),
    "overlap": ("overlap_auc", "overlap_examples"),
    "editing": ("edit_success",),
    "guidance": ("guidance_missing", "guidance_overlap_vs_missing"),
    "self_cross": ("self_cross_mixing",),
}


def model_label(pipe) -> str:
    """Which model a study ran on: its folder (relative to the project when inside it) and, for a model this
    project trained, its UNet step count, so that figures made at different times say what they stand on."""
    source = str(getattr(pipe, "name_or_path", "") or "")
    if not source:
        return "a pipeline built in memory"
    path = BUILTIN.get(source, Path(source))
    try:
        shown = str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        shown = source
    record = path / "training.json"
    if record.is_file():
        return f"{shown} ({json.loads(record.read_text())['unet_steps']:,} UNet steps)"
    return shown


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table; floats to three significant digits."""
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def study_command(study: str, out: str | Path, quick: bool, settings: dict) -> str:
    """The ``probe study`` command line that reruns one study with the same settings."""
    parts = ["probe study", study, "--out", str(out)] + (["--quick"] if quick else [])
    for key, value in settings.items():
        parts += ["--set", f'"{key}={value!r}"' if isinstance(value, (tuple, list, str)) else f"{key}={value}"]
    return " ".join(parts)


def write_index(out: str | Path) -> Path:
    """``out/README.md``: each study present in ``timing.csv``, what it ran on, its rerun command, figures and
    headline table, all read back from the files the studies wrote (so it never disagrees with them)."""
    out = Path(out)
    timing = pd.read_csv(out / "timing.csv")
    parts = ["# Figures and tables of the studies", "",
             "Written by `probe figures` / `probe study` from the tables beside this file. `probe figures` reruns "
             "every study at full size (hours on a CPU), `probe figures --quick` at reduced sizes; each section "
             "gives the command that reruns that study as it was run here."]
    for row in timing.itertuples(index=False):
        settings = json.loads(row.settings) if isinstance(row.settings, str) and row.settings else {}
        model = getattr(row, "model", None)
        model = model if isinstance(model, str) else "not recorded"
        parts += ["", f"## {STUDY_TITLES[row.study]}", "",
                  f"Model: {model}. Sizes: the {'quick' if row.quick else 'full'} defaults"
                  + (", with " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) if settings else "")
                  + f". {row.seconds / 60:.1f} min on this machine.", "",
                  f"```\n{study_command(row.study, out, bool(row.quick), settings)}\n```", ""]
        parts += [f"![{name}]({name}.png)" for name in STUDY_FIGURES[row.study] if (out / f"{name}.png").exists()]
        headline = out / f"headline_{row.study}.csv"
        if headline.exists():
            parts += ["", _markdown(pd.read_csv(headline))]
    path = out / "README.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _write_tables(tables: dict[str, pd.DataFrame], out: Path) -> None:
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False, float_format=TABLE_FLOAT_FORMAT)


def run_all(pipe, quick: bool = False, out: str | Path = "figures", sizes: dict[str, dict] | None = None,
            progress: bool = True, only: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Every study from its fixed seeds; every figure (PNG) and table (CSV) into ``out``; the headline tables.

    Studies: linear probes, overlap vs missing, editing, guidance, self-cross mixing; ``README.md`` indexes them
    (:func:`write_index`). ``quick`` runs each at its quick size with :data:`QUICK_STEPS` steps. ``sizes``: per
    study (a name of :data:`STUDIES`), keyword arguments that override its defaults, e.g.
    ``{"guidance": {"n_images": 2, "steps": 3}}``. ``only``: run just these studies (earlier rows of ``timing.csv``
    for the other studies are kept). Returns the headline table of each study and ``timing`` (seconds per study,
    counting the images an earlier run made where a study resumed; its ``quick`` flag and ``sizes`` overrides),
    which are written as ``headline_<study>.csv`` and ``timing.csv``.
    """
    pipe = load(pipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(sizes or {})
    unknown = (set(sizes) | set(only or ())) - set(STUDIES)
    if unknown:
        raise ValueError(f"unknown studies {sorted(unknown)}; known: {list(STUDIES)}")

    def kwargs(name: str) -> dict:
        return {"quick": quick, "out": out, "progress": progress, **({"steps": QUICK_STEPS} if quick else {}),
                **sizes.get(name, {})}

    headlines, timing = {}, []
    for name in [s for s in STUDIES if only is None or s in only]:
        start = time.perf_counter()
        if name == "probe":
            study = probe_study(pipe, **kwargs(name))
            tables = {"probe_labels": study.labels, "probe_accuracy": study.accuracy}
            headlines[name] = probe_headline(study.accuracy)
        elif name == "overlap":
            study = overlap_study(pipe, **kwargs(name))
            tables = {"overlap_metrics": study.metrics, "overlap_association": study.association}
            headlines[name] = overlap_headline(study.association)
        elif name == "editing":
            study = edit_study(pipe, **kwargs(name))
            tables = {"edit_results": study.results, "edit_summary": study.summary}
            headlines[name] = edit_headline(study.summary)
        elif name == "guidance":
            study = guidance_study(pipe, **kwargs(name))
            tables = {"guidance_summary": study.summary, "guidance_versus_ae": study.versus_ae}  # images: stored
            headlines[name] = guidance_headline(study.summary)
        else:
            study = self_cross_study(pipe, **kwargs(name))
            tables = {"self_cross_summary": study.summary}  # images: stored as they were made
            headlines[name] = self_cross_headline(study.summary)
        _write_tables({**tables, f"headline_{name}": headlines[name]}, out)
        plt.close("all")
        reused = getattr(study, "images", pd.DataFrame()).attrs.get("reused_seconds", 0.0)  # earlier runs' images
        timing.append({"study": name, "seconds": time.perf_counter() - start + reused, "quick": quick,
                       "settings": json.dumps(sizes.get(name, {}), default=str), "model": model_label(pipe)})
    headlines["timing"] = pd.DataFrame(timing)
    earlier = out / "timing.csv"
    if only is not None and earlier.exists():  # keep the other studies' rows of an earlier run
        kept = pd.read_csv(earlier)
        kept = kept[~kept.study.isin(headlines["timing"].study)]
        order = {name: i for i, name in enumerate(STUDIES)}
        merged = pd.concat([kept, headlines["timing"]], ignore_index=True)
        headlines["timing"] = merged.sort_values("study", key=lambda c: c.map(order)).reset_index(drop=True)
    _write_tables({"timing": headlines["timing"]}, out)
    write_index(out)
    return headlines
