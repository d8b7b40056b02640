"""Linear probes over recorded attention maps: what does each layer, at each step, know about the image?

Free-Prompt-Editing's probing argument: if a linear classifier reads an attribute (category, colour) off a subject's
*cross*-attention map but reads position or shape better off *self*-attention, cross-attention carries "what" and
self-attention carries "where". Features per sample are

- ``cross / map``: the subject's cross-attention map (mean over the subject's word pieces, :func:`maps.token_map`);
- ``self / aggregated``: the subject's self-attention region, :func:`maps.aggregate_self_attention` with the
  layer-mean cross map of the subject at the same grid and step (Otsu-selected, cross-weighted);
- ``self / mean``: the plain mean self-attention map (mean over query pixels → a (ky, kx) map),

each flattened, for every (kind, feature, resolution, layer or the layer mean, step bin). Steps inside a bin are
averaged. The sweep scores each block with stratified k-fold cross-validation of a standardised logistic regression.

The best of many blocks' scores is an optimistic estimate (a maximum over a search), and it favours whichever kind
had more blocks searched. :func:`nested_probe_features` instead gives every (kind, feature) arm the same candidate
set-ups (:func:`search_space`: the blocks every arm has, times the same regularisation grid) and selects inside
nested cross-validation: inner folds of each outer training part choose the set-up, the outer folds score it.

Accuracy is the out-of-fold accuracy pooled over all samples (every sample is predicted once, by a model that did not
see it); that is the fold-size-weighted mean of the fold accuracies. Its interval is a Wilson score interval on those
pooled out-of-fold predictions: honest for small n and never outside [0, 1], unlike a t interval over five folds.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from probe.analysis.maps import aggregate_self_attention, token_map
from probe.analysis.subjects import sample_tokens, word_tokens
from probe.record import full_self

FOLDS = 5
C = 0.1  # inverse L2 strength: standardised maps have hundreds of correlated pixels, studies a few hundred samples
MAX_ITER = 2000
CONFIDENCE = 0.95
MIN_PER_CLASS = 2  # a class needs a sample on each side of a split; rarer classes are left out
MEAN_LAYER = "mean"
STEP_BIN_NAMES = ("early", "middle", "late")
COLUMNS = ["kind", "feature", "resolution", "layer", "step_bin", "target", "accuracy", "ci_low", "ci_high",
           "chance", "n", "n_classes", "folds"]
INNER_FOLDS = 4  # nested cross-validation: folds of each outer training part that choose the set-up
BLOCK, NESTED = "block", "nested"  # a row scores one set-up / the set-up chosen inside nested cross-validation
SEARCH_COLUMNS = ["search", "n_candidates", "best_of_n", "chosen_folds", "C"]
NESTED_COLUMNS = [*COLUMNS, *SEARCH_COLUMNS]  # a nested row's set-up columns name the set-up most outer folds chose


class FeatureKey(NamedTuple):
    """Which block of features: e.g. ("self", "aggregated", 16, "up_blocks.1.attentions.0…", "late")."""

    kind: str
    feature: str
    resolution: int
    layer: str
    step_bin: str


Features = dict[FeatureKey, np.ndarray]  # each (n_samples, n_features)


@dataclass(frozen=True)
class ProbeScore:
    """Cross-validated accuracy of one probe, with its Wilson interval and the majority-class rate."""

    accuracy: float
    ci_low: float
    ci_high: float
    chance: float
    n: int
    n_classes: int
    folds: int


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n``."""
    if n == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = correct / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return float(min(max(0.0, centre - half), p)), float(max(min(1.0, centre + half), p))  # p inside, despite rounding


@dataclass(frozen=True)
class NestedScore:
    """Nested cross-validation of a search over set-ups: ``score`` pools the outer folds' predictions of the set-up
    that each fold's inner folds chose (never the maximum over the search); ``best_of_n`` is the best single
    set-up's outer accuracy, the optimistic "best of N" it replaces. ``chosen`` (an index into the blocks) and
    ``chosen_C``: the set-up most outer folds chose, by ``chosen_folds`` of them."""

    score: ProbeScore
    best_of_n: float
    n_candidates: int
    chosen: int
    chosen_C: float
    chosen_folds: int


def _fit_predict(pipeline: Pipeline, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    """Predictions of ``pipeline`` fitted on the training part; a part with one class predicts that class."""
    if len(np.unique(y_train)) < 2:
        return np.full(len(X_test), y_train[0], dtype=y_train.dtype)
    return pipeline.fit(X_train, y_train).predict(X_test)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """StandardScaler + multinomial logistic regression, with a cross-validated score.

    Configure in ``__init__`` (scikit-learn style, so ``clone`` and ``get_params`` work); ``fit`` / ``predict`` /
    ``score`` use all data, :meth:`cross_validate` gives the out-of-fold accuracy that the studies report.
    """

    def __init__(self, C: float = C, folds: int = FOLDS, confidence: float = CONFIDENCE, max_iter: int = MAX_ITER,
                 random_state: int = 0):
        self.C = C
        self.folds = folds
        self.confidence = confidence
        self.max_iter = max_iter
        self.random_state = random_state

    def _pipeline(self, C: float | None = None) -> Pipeline:
        return Pipeline([("scale", StandardScaler()),
                         ("logistic", LogisticRegression(C=self.C if C is None else C, max_iter=self.max_iter))])

    def _splitter(self, y: np.ndarray, groups: np.ndarray | None, wanted: int, strict: bool = True):
        """Stratified (group) k-fold with ``wanted`` folds, fewer where the rarest class has fewer samples (groups).
        ``strict``: fewer than two folds or classes is an error; otherwise two folds (inner folds of a small part)."""
        classes, counts = np.unique(y, return_counts=True)
        if groups is not None:
            counts = np.array([len(set(groups[y == c])) for c in classes])
        folds = int(min(wanted, counts.min()))
        if strict and (len(classes) < 2 or folds < 2):
            raise ValueError(f"need two classes with {MIN_PER_CLASS}+ samples (groups) each, got "
                             f"{dict(zip(classes, counts))}")
        folds = max(folds, 2)
        if groups is None:
            return StratifiedKFold(folds, shuffle=True, random_state=self.random_state), folds
        return StratifiedGroupKFold(folds, shuffle=True, random_state=self.random_state), folds

    def fit(self, X, y) -> LinearProbe:
        self.pipeline_ = self._pipeline().fit(np.asarray(X, np.float64), np.asarray(y))
        self.classes_ = self.pipeline_.classes_
        return self

    def predict(self, X) -> np.ndarray:
        return self.pipeline_.predict(np.asarray(X, np.float64))

    def cross_validate(self, X, y, groups=None) -> ProbeScore:
        """Stratified k-fold out-of-fold accuracy; folds shrink to the rarest class's count (at least 2).

        ``groups`` (e.g. each image's seed, which fixes much of its layout) keep a group's samples in one fold, so
        the probe is scored on layouts it never saw."""
        X, y = np.asarray(X, np.float64), np.asarray(y)
        classes, counts = np.unique(y, return_counts=True)
        chance = float(counts.max() / len(y))  # the majority class's share of the samples
        groups = None if groups is None else np.asarray(groups).astype(str)
        split, folds = self._splitter(y, groups, self.folds)
        predicted = cross_val_predict(self._pipeline(), X, y, cv=split, groups=groups)
        correct = int((predicted == y).sum())
        low, high = wilson_interval(correct, len(y), self.confidence)
        return ProbeScore(correct / len(y), low, high, chance, len(y), len(classes), folds)

    def _inner_accuracy(self, X: np.ndarray, y: np.ndarray, splits: list, C: float) -> float:
        """Pooled out-of-fold accuracy of one set-up over the inner folds ``splits`` of an outer training part."""
        predicted = np.empty(len(y), dtype=y.dtype)
        for train, test in splits:
            predicted[test] = _fit_predict(self._pipeline(C), X[train], y[train], X[test])
        return float((predicted == y).mean())

    def _inner_choice(self, blocks: list[np.ndarray], y: np.ndarray, train: np.ndarray, groups: np.ndarray | None,
                      setups: list[tuple[int, float]], inner_folds: int) -> int:
        """The set-up the inner folds of one outer training part choose (first on ties). A part too small to split
        again (a class with one sample or group in it) chooses the first set-up: a choice fixed in advance, so no
        search is scored on its own data."""
        inner_groups = None if groups is None else groups[train]
        try:
            inner, _ = self._splitter(y[train], inner_groups, inner_folds, strict=False)
            splits = list(inner.split(blocks[0][train], y[train], inner_groups))
        except ValueError:
            return 0
        scores = [self._inner_accuracy(blocks[b][train], y[train], splits, C) for b, C in setups]
        return int(np.argmax(scores))

    def nested_cross_validate(self, blocks: Sequence, y, groups=None, Cs: Sequence[float] | None = None,
                              inner_folds: int = INNER_FOLDS) -> NestedScore:
        """Choose a set-up (a feature block of ``blocks`` × a C of ``Cs``, default this probe's C) inside nested
        cross-validation, so the reported accuracy is not the maximum over the search.

        Outer folds: the same stratified (group) folds as :meth:`cross_validate`. In each, inner folds of the
        training part score every set-up; the best (first on ties) is refitted on the whole training part and
        predicts the held-out fold. ``groups`` keep a group's samples in one fold at both levels."""
        blocks = [np.asarray(X, np.float64) for X in blocks]
        y = np.asarray(y)
        groups = None if groups is None else np.asarray(groups).astype(str)
        setups = [(b, float(C)) for b in range(len(blocks)) for C in (Cs or (self.C,))]
        classes, counts = np.unique(y, return_counts=True)
        split, folds = self._splitter(y, groups, self.folds)
        outer = np.empty((len(setups), len(y)), dtype=y.dtype)  # every set-up's outer prediction (for best of N)
        nested, chosen = np.empty(len(y), dtype=y.dtype), []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            for train, test in split.split(blocks[0], y, groups):
                chosen.append(self._inner_choice(blocks, y, train, groups, setups, inner_folds))
                for i, (b, C) in enumerate(setups):
                    outer[i, test] = _fit_predict(self._pipeline(C), blocks[b][train], y[train], blocks[b][test])
                nested[test] = outer[chosen[-1], test]
        correct = int((nested == y).sum())
        low, high = wilson_interval(correct, len(y), self.confidence)
        score = ProbeScore(correct / len(y), low, high, float(counts.max() / len(y)), len(y), len(classes), folds)
        (modal, times), = Counter(chosen).most_common(1)
        return NestedScore(score, float((outer == y).mean(1).max()), len(setups), setups[modal][0],
                           setups[modal][1], times)


# -- features from a recording -------------------------------------------------------------------------------------


def step_bins(steps: int | Sequence[int], n_bins: int = len(STEP_BIN_NAMES), per_bin: int | None = None
              ) -> dict[str, list[int]]:
    """Split a schedule (``steps`` indices, or ``range(steps)``) into contiguous bins: early / middle / late.

    ``per_bin`` keeps only that many steps at each bin's centre: pass their union as ``keep_steps`` to
    ``probe.record`` so a long schedule records just what the probes use. Fewer steps than bins: one bin per step.
    """
    steps = list(range(steps)) if isinstance(steps, int) else sorted(int(s) for s in steps)
    parts = [list(p) for p in np.array_split(steps, min(n_bins, len(steps)))]
    if per_bin is not None:
        parts = [p[max(0, (len(p) - per_bin) // 2):][:per_bin] for p in parts]
    names = STEP_BIN_NAMES if len(parts) == len(STEP_BIN_NAMES) else [f"steps {p[0]}-{p[-1]}" for p in parts]
    return {name: [int(s) for s in p] for name, p in zip(names, parts)}


def phrase_indices(tokens: list[str], phrase: str) -> list[int]:
    """Token indices of every word of ``phrase`` ("red circle" → the pieces of "red" and "circle"): one subject map,
    by the one rule of :func:`probe.analysis.subjects.word_tokens` (every copy of each word; a word the prompt holds
    more often than the phrase names it is an error that says to name the occurrence, ``red#2``)."""
    return word_tokens(tokens, [phrase])[0]


def _block_name(layer: str) -> str:
    """A layer's transformer block (``….attn1`` and ``….attn2`` of one block share it, to compare self and cross)."""
    return layer.rsplit(".", 1)[0] if layer.rsplit(".", 1)[-1].startswith("attn") else layer


def attn_tensor(node) -> tuple[torch.Tensor, xr.Dataset]:
    """A group's ``attn`` as float32 (sample, step, layer, y, x, …), heads averaged, and its dataset."""
    ds = node.to_dataset() if hasattr(node, "to_dataset") else node
    attn = ds["attn"]
    if "head" in attn.dims:
        attn = attn.mean("head")
    return torch.from_numpy(np.asarray(attn.values, np.float32)), ds


def _add_blocks(out: Features, kind: str, feature: str, ds, maps: torch.Tensor, bins: dict[str, list[int]],
                per_layer: bool) -> None:
    """Average (sample, step, layer, h, w) maps over each bin's steps and store every layer and the layer mean."""
    resolution = int(ds.sizes["y"])
    position = {int(s): i for i, s in enumerate(ds["step"].values)}
    layers = [_block_name(str(name)) for name in ds["layer"].values]
    for name, steps in bins.items():
        missing = [s for s in steps if s not in position]
        if missing:
            raise ValueError(f"step bin {name!r} asks for steps {missing} that the recording does not hold")
        binned = maps[:, [position[s] for s in steps]].mean(1)  # (sample, layer, h, w)
        chosen = list(enumerate(layers)) if per_layer else []
        for i, layer in chosen:
            out[FeatureKey(kind, feature, resolution, layer, name)] = binned[:, i].flatten(1).numpy()
        out[FeatureKey(kind, feature, resolution, MEAN_LAYER, name)] = binned.mean(1).flatten(1).numpy()


def _groups(tree, kind: str) -> list[str]:
    if kind not in tree.children:
        return []
    return sorted(tree[kind].children, key=lambda name: -int(name.removeprefix("res").split("x")[0]))


def _per_sample(words: str | Sequence[str], n: int) -> list[str]:
    words = [words] * n if isinstance(words, str) else [str(w) for w in words]
    if len(words) != n:
        raise ValueError(f"give one subject word per sample ({n}), got {len(words)}")
    return words


def subject_features(tree, words: str | Sequence[str], bins: int | Mapping[str, Sequence[int]] = 3,
                     kinds: Sequence[str] = ("cross", "self"), per_layer: bool = True) -> Features:
    """The probe features of every sample of a recording, one block per (kind, feature, resolution, layer, bin).

    ``words``: the subject (a word or a phrase of the prompt), one for all samples or one per sample.
    ``bins``: a number of contiguous bins over the recorded steps, or {name: step indices}. Self features need
    the recording's self-attention; the aggregated one also its cross-attention at the same grid.
    """
    cross_groups, self_groups = _groups(tree, "cross"), _groups(tree, "self")
    if not cross_groups:
        raise ValueError("probe features need the subject's cross-attention: record with kinds including 'cross'")
    first = tree["cross"][cross_groups[0]]
    n_samples = int(first.sizes["sample"])
    words = _per_sample(words, n_samples)
    recorded = [int(s) for s in first["step"].values]
    bins = step_bins(recorded, bins) if isinstance(bins, int) else {k: [int(s) for s in v] for k, v in bins.items()}
    out: Features = {}
    subject_maps: dict[int, torch.Tensor] = {}  # resolution → layer-mean cross map (sample, step, h, w)
    for group in cross_groups:
        attn, ds = attn_tensor(tree["cross"][group])
        maps = torch.stack([token_map(attn[i], sample_tokens(ds.isel(sample=i), [words[i]])[0][0])
                            for i in range(n_samples)])  # (sample, step, layer, h, w): a map per layer
        subject_maps[int(ds.sizes["y"])] = maps.mean(2)
        if "cross" in kinds:
            _add_blocks(out, "cross", "map", ds, maps, bins, per_layer)
    if "self" not in kinds:
        return out
    for group in self_groups:
        full_self(tree["self"][group].ds, "the self-attention probes")
        attn, ds = attn_tensor(tree["self"][group])  # (sample, step, layer, y, x, ky, kx)
        _add_blocks(out, "self", "mean", ds, attn.mean((3, 4)), bins, per_layer)
        cross = subject_maps.get(int(ds.sizes["y"]))
        if cross is not None:
            aggregated = aggregate_self_attention(cross[:, :, None], attn)  # (sample, step, layer, y, x)
            _add_blocks(out, "self", "aggregated", ds, aggregated, bins, per_layer)
    return out


def concat_features(parts: Sequence[Features]) -> Features:
    """Join the features of consecutive chunks of samples (same blocks in each)."""
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# -- the sweep -----------------------------------------------------------------------------------------------------


def _labels_frame(labels, n: int) -> pd.DataFrame:
    frame = labels.reset_index(drop=True) if isinstance(labels, pd.DataFrame) else pd.DataFrame(dict(labels))
    if len(frame) != n:
        raise ValueError(f"labels have {len(frame)} rows, the features {n} samples")
    return frame


def _usable(y: pd.Series, min_per_class: int, groups: Sequence | None = None) -> np.ndarray:
    """Samples with a label whose class has at least ``min_per_class`` members, or members of that many ``groups``
    where folds keep groups whole (a class seen in one group cannot sit on both sides of a split)."""
    known = y.notna().to_numpy()
    members = pd.Series(np.arange(len(y)) if groups is None else np.asarray(groups).astype(str))[known]
    counts = members.groupby(y[known].astype(str).to_numpy()).nunique()
    return known & y.astype(str).isin(counts[counts >= min_per_class].index).to_numpy()


def _probed_targets(features: Features, labels: pd.DataFrame | Mapping[str, Sequence], min_per_class: int,
                    groups: Sequence | None):
    """Each target a probe can be scored on: (target, the samples kept, their labels as text, their groups); a
    target with fewer than two usable classes is skipped (what :func:`probe_features` and
    :func:`nested_probe_features` both probe)."""
    frame = _labels_frame(labels, len(next(iter(features.values()))))
    for target in frame.columns:
        keep = _usable(frame[target], min_per_class, groups)
        y = frame[target][keep].astype(str).to_numpy()
        if len(np.unique(y)) >= 2:
            yield target, keep, y, None if groups is None else np.asarray(groups)[keep]


def probe_features(features: Features, labels: pd.DataFrame | Mapping[str, Sequence], probe: LinearProbe | None = None,
                   min_per_class: int = MIN_PER_CLASS, groups: Sequence | None = None) -> pd.DataFrame:
    """Cross-validate one probe per (feature block, target); a tidy table with one row each.

    ``labels``: one column per target, one row per sample (missing values and classes rarer than
    ``min_per_class`` are left out for that target). A target with fewer than two usable classes gets no rows.
    ``groups``: one label per sample kept together in cross-validation (see :meth:`LinearProbe.cross_validate`);
    a class then needs ``min_per_class`` groups.
    """
    probe = probe or LinearProbe()
    rows = []
    for target, keep, y, kept_groups in _probed_targets(features, labels, min_per_class, groups):
        for key, X in features.items():
            score = probe.cross_validate(X[keep], y, kept_groups)
            rows.append({**key._asdict(), "target": target, **asdict(score)})
    return pd.DataFrame(rows, columns=COLUMNS)


def search_space(features: Features, arms: Sequence[tuple[str, str]] | None = None
                 ) -> dict[tuple[str, str], list[FeatureKey]]:
    """Each (kind, feature) arm's candidate blocks: only the (resolution, layer, step bin) that every arm has, so
    every arm searches the same number of set-ups and no kind wins a comparison by having more blocks searched
    (self-attention has two features per block, and on large models cross-attention has grids self lacks)."""
    arms = list(arms) if arms is not None else list(dict.fromkeys((k.kind, k.feature) for k in features))
    setups = {arm: {(k.resolution, k.layer, k.step_bin): k for k in features if (k.kind, k.feature) == arm}
              for arm in arms}
    common = set.intersection(*(set(found) for found in setups.values())) if setups else set()
    order = [where for where in setups[arms[0]] if where in common] if arms else []
    return {arm: [setups[arm][where] for where in order] for arm in arms}


def nested_probe_features(features: Features, labels: pd.DataFrame | Mapping[str, Sequence],
                          probe: LinearProbe | None = None, min_per_class: int = MIN_PER_CLASS,
                          groups: Sequence | None = None, Cs: Sequence[float] | None = None,
                          inner_folds: int = INNER_FOLDS, arms: Sequence[tuple[str, str]] | None = None
                          ) -> pd.DataFrame:
    """One row per (target, kind, feature): the accuracy of a set-up chosen inside nested cross-validation
    (:meth:`LinearProbe.nested_cross_validate`) over that arm's :func:`search_space` × ``Cs``, the same count for
    every arm. Columns :data:`NESTED_COLUMNS`; resolution, layer and step bin name the set-up most outer folds chose,
    ``best_of_n`` the old optimistic score (the best single set-up). Labels and groups as in :func:`probe_features`.
    """
    probe = probe or LinearProbe()
    space = {arm: keys for arm, keys in search_space(features, arms).items() if keys}
    rows = []
    for target, keep, y, kept_groups in _probed_targets(features, labels, min_per_class, groups):
        for keys in space.values():
            found = probe.nested_cross_validate([features[key][keep] for key in keys], y, kept_groups, Cs,
                                                inner_folds)
            rows.append({**keys[found.chosen]._asdict(), "target": target, **asdict(found.score), "search": NESTED,
                         "n_candidates": found.n_candidates, "best_of_n": found.best_of_n,
                         "chosen_folds": found.chosen_folds, "C": found.chosen_C})
    return pd.DataFrame(rows, columns=NESTED_COLUMNS)


def probe_recording(tree, labels: pd.DataFrame | Mapping[str, Sequence], words: str | Sequence[str],
                    bins: int | Mapping[str, Sequence[int]] = 3, kinds: Sequence[str] = ("cross", "self"),
                    per_layer: bool = True, probe: LinearProbe | None = None) -> pd.DataFrame:
    """Probe every target in ``labels`` from every feature block of a recording (see the module docstring).

    Columns: kind, feature, resolution (grid height), layer (the transformer block, or "mean"), step_bin, target,
    accuracy (pooled out-of-fold), ci_low / ci_high (Wilson), chance (majority-class rate), n, n_classes, folds.
    """
    return probe_features(subject_features(tree, words, bins, kinds, per_layer), labels, probe)
