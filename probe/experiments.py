"""The studies behind the figures and tables. Experiments compute; :mod:`probe.plots` draws.

- :func:`probe_study`: linear probes (:mod:`probe.probes`) read colour, shape and position off cross- vs
  self-attention maps of single-object images, by layer and step (Free-Prompt-Editing's probing argument).
- :func:`overlap_study`: how the two subjects' maps overlap in two-object images, step by step, and how well each
  overlap statistic predicts that the judge finds a subject missing (Marioriyad et al.'s entity-missing argument).

Every study uses fixed seeds, records in chunks of :data:`CHUNK` samples and reduces each chunk at once to what it
keeps (probe features, per-image metrics), so memory does not grow with the number of images. ``quick=True`` shrinks
every size for tests and notebooks. The shapes-world judge is the default; any callable ``judge(image, prompt)``
returning per-subject objects with ``.status`` (and ``.detection.mask`` for positions) can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from tqdm.auto import tqdm

from probe import plots
from probe.maps import aggregate_self_attention, gaussian_smooth, token_map, token_softmax
from probe.models import attention_layers, load
from probe.overlap import (
    ae_response,
    aggregation_loss,
    com_distance,
    compactness,
    intensity,
    kl_divergence,
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
from probe.record import record
from probe.shapes.evaluate import HELD_OUT_SEED, STEPS
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import parse_prompt
from probe.shapes.world import COLOURS, SHAPES

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
EXAMPLES_PER_CLASS = 3  # present and missing images kept for the examples figure
QUICK_PROBE_IMAGES = 24  # every colour × shape, one seed
QUICK_OVERLAP_IMAGES = 16  # four prompts, four seeds: one chunk
QUICK_BOOTSTRAPS = 200
PROBE_TARGETS = ("colour", "shape", "position", "judge_colour", "judge_shape")
METRICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross", "intensity_min", "spread_max",
           "ae_loss", "aggregation_max")
ALL_METRICS = "all (logistic)"
DPI = 130


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
    def all_present(self) -> bool:
        return all(s == "present" for s in self.statuses)


@dataclass
class OverlapStudy:
    """``metrics``: one row per (image, step); ``association``: one row per (metric, step)."""

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
        missing = "missing" in statuses
        examples.append(Example(prompt, seed, tuple(words[i]), statuses, image, maps[i, -1].numpy()))
        for j, (step, timestep) in enumerate(zip(steps, timesteps)):
            rows.append({"prompt": prompt, "seed": seed, "step": int(step), "timestep": float(timestep),
                         "status_a": statuses[0], "status_b": statuses[1], "missing": missing,
                         **{name: float(v[i, j]) for name, v in values.items()}})
    return rows, examples


def _keep_examples(kept: list[Example], new: list[Example], per_class: int = EXAMPLES_PER_CLASS) -> list[Example]:
    """The first ``per_class`` images with every subject present and the first with a subject missing."""
    for example in new:
        for is_class in (lambda e: e.all_present, lambda e: e.missing):
            if is_class(example) and sum(map(is_class, kept)) < per_class:
                kept.append(example)
    return kept


def overlap_study(pipe, n_images: int = 400, steps: int = STEPS, quick: bool = False, out: str | Path | None = None,
                  subject: Subject = "noun", judge: Judge = exact_judge,
                  seeds_per_prompt: int = OVERLAP_SEEDS_PER_PROMPT, progress: bool = True) -> OverlapStudy:
    """Overlap statistics of two-object images at every step, and their association with entity missing.

    ``n_images / seeds_per_prompt`` prompts (two colours, two shapes, all different), each with the same seeds.
    Maps are layer means at the cross-attention grid closest to 16×16; the self-cross overlap uses the
    Otsu-aggregated self-attention at that grid. An image counts as missing when the judge finds any subject
    missing. ``quick``: at most 16 images, three steps (early / middle / late), 200 bootstrap resamples.
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
    association = missing_association(metrics, n_boot=QUICK_BOOTSTRAPS if quick else BOOTSTRAPS)
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
    """Out-of-fold P(missing) of a standardised logistic regression on all metrics; None if a class is too rare."""
    y = np.asarray(y, bool)
    folds = min(folds, int(y.sum()), int((~y).sum()))
    if folds < 2:
        return None
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(LinearProbe()._pipeline(), X, y, cv=split, method="predict_proba")[:, 1]


def missing_association(metrics: pd.DataFrame, names: Sequence[str] = METRICS, n_boot: int = BOOTSTRAPS,
                        seed: int = 0) -> pd.DataFrame:
    """Per step: ROC AUC (bootstrap CI) of each metric for "any subject missing", and of all metrics together.

    AUC > 0.5: larger values go with missing (expected for soft IoU, self-cross overlap, A&E loss); < 0.5: smaller
    values do (expected for centre distance, KL, intensity). The joint row (``metric == ALL_METRICS``) is the
    cross-validated AUC of a logistic regression on every metric, its interval bootstrapped over the pooled
    out-of-fold predictions. Steps where only one outcome occurs give NaN.
    """
    rows = []
    for (step, timestep), frame in metrics.groupby(["step", "timestep"], sort=True):
        y = frame["missing"].to_numpy(bool)
        base = {"step": int(step), "timestep": float(timestep), "n": len(y), "n_missing": int(y.sum())}
        for name in names:
            auc, low, high = auc_interval(y, frame[name].to_numpy(), n_boot, seed=seed)
            rows.append({"metric": name, **base, "auc": auc, "ci_low": low, "ci_high": high})
        scores = cross_validated_scores(frame[list(names)].to_numpy(np.float64), y, seed=seed)
        auc, low, high = (np.nan,) * 3 if scores is None else auc_interval(y, scores, n_boot, seed=seed)
        rows.append({"metric": ALL_METRICS, **base, "auc": auc, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["metric", "step", "timestep", "n", "n_missing", "auc", "ci_low", "ci_high"])


def overlap_headline(association: pd.DataFrame) -> pd.DataFrame:
    """Per metric: AUC at the last step (with CI) and the step where the AUC lies furthest from 0.5."""
    rows = []
    for metric, frame in association.groupby("metric", sort=False):
        last = frame.loc[frame.step.idxmax()]
        known = frame.dropna(subset=["auc"])
        best = known.loc[(known.auc - 0.5).abs().idxmax()] if len(known) else last
        rows.append({"metric": metric, "auc_last": last.auc, "ci_low_last": last.ci_low,
                     "ci_high_last": last.ci_high, "strongest_step": int(best.step), "auc_strongest": best.auc,
                     "n": int(last.n), "n_missing": int(last.n_missing)})
    return pd.DataFrame(rows)
