"""The classroom lab on the built-in model (``notebooks/lab/``): its exercises, their checkers and small helpers.

Three parts, one notebook each: ``observe`` (record a two-object prompt and look at what each layer and step
attends to), ``measure`` (overlap statistics of the subjects' maps and entity missing, judged exactly) and
``intervene`` (guidance against a lost subject; editing a colour by attention injection, and which injection keeps
the layout).

A student writes an answer, a value or a small function, into a variable and calls :func:`check`::

    from probe.ui import lab
    answer = None  # your code
    lab.check("observe.peak_layer", answer, tree)

The checker recomputes the right answer from the student's own recording or images (nothing is stored, so it holds
for any prompt, seed, step count or size) and prints ✓, or a hint that points the way without giving the answer;
``None`` (or a function that still returns ``None``) is "not answered yet". :func:`grade` returns the same verdict
as a :class:`Result` instead of printing it. :data:`EXERCISES` holds every exercise with its question.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr

from probe.analysis import overlap
from probe.analysis.subjects import layer_mean, recorded_subject_maps, sample_tokens
from probe.prompts import attributes_of, subjects_of, word_occurrences
from probe.shapes.judge import judge as exact_judge

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PARTS = ("observe", "measure", "intervene")
GROUP = "cross/res16"  # the grid the exercises read: the built-in model's finest cross-attention
STATISTICS = tuple(n for n in overlap.PAIR_STATISTICS if n != "self_cross")  # overlap_table's (no self maps)
SETTLE_GROUP = "cross/res8"  # observe.settle_step reads the grid where colour words localise best on this model
SETTLE_CORRELATION = 0.9  # observe.settle_step: "correlated at least 0.9 with the last step's map"
SETTLE_SLACK = (-0.01, 0.0, 0.01)  # thresholds around it whose answers count too (float16 rounding at the border)
MAP_ATOL = 2e-3  # absolute tolerance on an attention map (values in 0–1, stored as float16)
VALUE_RTOL = 1e-3  # relative tolerance on a statistic or a share
PEAK_TIE = 1e-3  # layers whose peaks are this close to the highest count as highest
SEPARATION_TIE = 1e-9
LAYOUT_TIE = 0.02  # mask IoUs this close count as equally well kept

Status = Literal["correct", "wrong", "unanswered"]
MARKS = {"correct": "✓", "wrong": "✗", "unanswered": "…"}


@dataclass(frozen=True)
class Result:
    """A checker's verdict: ``status`` and the line shown to the student (a hint when wrong, never the answer)."""

    key: str
    status: Status
    message: str

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        return f"{MARKS[self.status]} {self.key}: {self.message}"


@dataclass(frozen=True)
class Exercise:
    """One exercise: its key (``part.name``), the question (markdown) and the grader, which returns
    ``(correct, message)`` and raises :class:`_Placeholder` while a student's function still returns None."""

    key: str
    question: str
    grader: Callable[..., tuple[bool, str]]

    @property
    def part(self) -> str:
        return self.key.split(".")[0]


EXERCISES: dict[str, Exercise] = {}


def _exercise(key: str, question: str) -> Callable:
    def register(grader: Callable[..., tuple[bool, str]]) -> Callable[..., tuple[bool, str]]:
        EXERCISES[key] = Exercise(key, question, grader)
        return grader

    return register


def exercises(part: str) -> list[Exercise]:
    """The exercises of one part, in the order the notebook asks them."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; the parts are {PARTS}")
    return [e for e in EXERCISES.values() if e.part == part]


class _Placeholder(Exception):
    """A student's function still returns None: not answered yet."""


class _Hint(Exception):
    """A hint raised from deep inside a grader (the student's answer is wrong; the message says where to look)."""


def grade(key: str, answer: Any, *context: Any) -> Result:
    """The verdict on ``answer`` to exercise ``key``. ``context`` is what the exercise recomputes the answer from:
    the recording, the guided runs and their prompt, or the edits, as each notebook's check cell passes them."""
    if key not in EXERCISES:
        raise KeyError(f"no exercise {key!r}; the exercises are {sorted(EXERCISES)}")
    exercise = EXERCISES[key]
    if answer is None:
        return Result(key, "unanswered", "not answered yet: write your answer where it says # your code, then run "
                                         "the cell again")
    try:
        ok, message = exercise.grader(answer, *context)
    except _Placeholder as why:
        return Result(key, "unanswered", f"not answered yet: {why}")
    return Result(key, "correct" if ok else "wrong", message if ok else f"hint: {message}")


def check(key: str, answer: Any, *context: Any) -> None:
    """Print ✓ or a hint for ``answer`` to exercise ``key`` (see :func:`grade`); never raises on a wrong answer."""
    print(grade(key, answer, *context))


# -- reading a recording ----------------------------------------------------------------------------------------


def _steps(tree: xr.DataTree, group: str = GROUP) -> list[int]:
    return [int(s) for s in tree[group].ds["step"].values]


def _step(tree: xr.DataTree, step: int, group: str = GROUP) -> int:
    """A step coordinate from a coordinate or, when negative, a position from the end (-1: the last step)."""
    steps = _steps(tree, group)
    if step < 0:
        return steps[step]
    if step not in steps:
        raise ValueError(f"step {step} is not recorded; the steps are {steps[0]} … {steps[-1]}")
    return step


def _tokens(tree: xr.DataTree, sample: int, group: str = GROUP) -> list[str]:
    return [str(t) for t in tree[group].ds["token_text"].isel(sample=sample).values]


def _prompt(tree: xr.DataTree, sample: int = 0, group: str = GROUP) -> str:
    return str(tree[group].ds["prompt"].values[sample])


def _layer_mean(tree: xr.DataTree, sample: int = 0, group: str = GROUP) -> np.ndarray:
    """(step, y, x, token) float32: one sample's cross-attention, mean over layers (and heads, where recorded)."""
    attn = layer_mean(tree[group]["attn"].isel(sample=sample))
    return np.asarray(attn.transpose("step", "y", "x", "token").values, np.float32)


def _word_tokens(tree: xr.DataTree, sample: int, group: str, words: list[str]) -> list[list[int]]:
    """Token indices of each word in one sample, by the rule every analysis of a recording shares
    (:func:`probe.analysis.subjects.sample_tokens`; a repeated word takes its next occurrence)."""
    return sample_tokens(tree[group].ds.isel(sample=sample), words)[0]


def subject_maps(tree: xr.DataTree, sample: int = 0, step: int = -1, group: str = GROUP) -> xr.DataArray:
    """The prompt's subjects' maps at one step: (subject, y, x), mean over layers and over each word's pieces.

    ``step`` is a step coordinate, or a position from the end when negative. These are the maps every statistic of
    the lab is computed on, so a student's own computation can be compared with them.
    """
    step = _step(tree, step, group)
    words = subjects_of(_prompt(tree, sample, group))
    maps = recorded_subject_maps(tree[group], sample, words, step=step).isel(step=0)
    return xr.DataArray(maps.values, dims=("subject", "y", "x"), coords={"subject": words}, name="attn")


def _pair_statistics(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic of STATISTICS on (..., S, H, W), mean over the subject pairs."""
    def mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        values = overlap.pairwise(fn, maps)
        return values.sum(-1) / max(values.shape[-1], 1)

    return {"soft_iou": mean(overlap.soft_iou), "com_distance": mean(overlap.com_distance),
            "kl_sym": mean(lambda a, b: overlap.kl_divergence(a, b, "sym")), "compactness": mean(overlap.compactness)}


def overlap_table(tree: xr.DataTree, group: str = GROUP) -> pd.DataFrame:
    """One row per sample and step: seed, prompt and the subjects' overlap statistics (probe.analysis.overlap; mean over
    subject pairs when a prompt has more than two): how much the subjects' maps share, step by step."""
    steps = _steps(tree, group)
    ds = tree[group].ds
    rows = []
    for sample in range(ds.sizes["sample"]):
        prompt = _prompt(tree, sample, group)
        maps = torch.from_numpy(recorded_subject_maps(tree[group], sample, subjects_of(prompt)).values)  # (step, S, …)
        stats = {name: values.numpy() for name, values in _pair_statistics(maps).items()}
        for k, step in enumerate(steps):
            rows.append({"sample": sample, "seed": int(ds["seed"].values[sample]), "prompt": prompt, "step": step,
                         **{name: float(values[k]) for name, values in stats.items()}})
    return pd.DataFrame(rows)


def _image(item: Any) -> Any:
    """The image of a generation result (GuideResult: its first image), or the item itself."""
    images = getattr(item, "images", None)
    return images[0] if isinstance(images, list) else item


def verdicts(images: xr.DataTree | Mapping[int, Any], prompt: str | None = None) -> pd.DataFrame:
    """The exact judge on every image, one row each: ``statuses`` (one per subject, in the prompt's order),
    ``n_missing``, ``n_mixed``, ``any_missing`` and ``all_present``. A recording's images are judged against their
    own prompts (rows carry ``sample``), ``{seed: image or generate(...) result}`` against ``prompt`` (index: seed).
    """
    if isinstance(images, xr.DataTree):
        try:
            ds = images[GROUP].ds
        except KeyError:
            raise ValueError(f"this recording has no {GROUP} group to read its prompts from") from None
        pixels = images["images"]["image"].values
        items = [(i, int(s), str(p), pixels[i]) for i, (s, p) in enumerate(zip(ds["seed"].values, ds["prompt"].values))]
    else:
        if prompt is None:
            raise ValueError("give the prompt the images were generated from")
        items = [(None, int(seed), prompt, _image(image)) for seed, image in images.items()]
    rows = []
    for sample, seed, text, image in items:
        statuses = [s.status for s in exact_judge(image, text)]
        row = {} if sample is None else {"sample": sample}
        row.update({"seed": seed, "prompt": text, "statuses": ", ".join(statuses),
                    "n_missing": statuses.count("missing"), "n_mixed": statuses.count("mixed"),
                    "any_missing": "missing" in statuses, "all_present": all(s == "present" for s in statuses)})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table if isinstance(images, xr.DataTree) else table.set_index("seed")


def image_grid(tree: xr.DataTree, judged: pd.DataFrame | None = None, columns: int = 10,
               size: float = 1.3) -> Figure:
    """A recording's images in a grid, each titled with its seed (and the judge's statuses, given ``verdicts``),
    so a handful of seeds can be looked at together."""
    import matplotlib.pyplot as plt

    ds = tree[GROUP].ds
    pixels = tree["images"]["image"].values
    n = len(pixels)
    rows = math.ceil(n / columns)
    width = min(n, columns)
    fig, axes = plt.subplots(rows, width, squeeze=False, figsize=(size * width, (size + 0.45) * rows))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(pixels[k])
        title = f"seed {int(ds['seed'].values[k])}"
        if judged is not None:
            title += "\n" + str(judged.statuses.iloc[k]).replace("present", "ok").replace(", ", " ")
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    return fig


def plot_statistics(stats: pd.DataFrame, judged: pd.DataFrame) -> Figure:
    """Each statistic of :func:`overlap_table` over the steps, one line per image (solid: two objects, dotted:
    three): red where the judge found a subject not present, blue where all were. Do the groups part, and when?"""
    import matplotlib.pyplot as plt

    table = stats.merge(judged[["sample", "all_present"]], on="sample")
    table["objects"] = [len(subjects_of(p)) for p in table.prompt]
    styles = {2: "-", 3: ":"}
    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(3 * len(STATISTICS), 2.6))
    for ax, name in zip(axes, STATISTICS):
        for (_, ok, objects), rows in table.groupby(["sample", "all_present", "objects"]):
            ax.plot(rows.step, rows[name], color="tab:blue" if ok else "tab:red", alpha=0.5, lw=1,
                    ls=styles.get(objects, "--"))
        ax.set(title=name, xlabel="step")
        if name in ("kl_sym", "compactness"):
            ax.set_yscale("log")
    axes[0].plot([], [], color="tab:blue", label="all present")
    axes[0].plot([], [], color="tab:red", label="a subject not present")
    for objects in sorted(set(table.objects)):
        axes[0].plot([], [], color="grey", ls=styles.get(objects, "--"), label=f"{objects} objects")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


# -- small utilities for the graders --------------------------------------------------------------------------


def _number(answer: Any) -> float | None:
    """A float from a number (also a 0-d array or tensor); None for anything else."""
    if isinstance(answer, bool):
        return None
    try:
        value = float(np.asarray(answer.detach() if isinstance(answer, torch.Tensor) else answer))
    except (TypeError, ValueError):
        return None
    return value


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, np.float32)


def _call(fn: Callable, *args: Any) -> Any:
    """Call a student's function; an exception in it becomes a hint with its message, not a traceback."""
    try:
        out = fn(*args)
    except Exception as err:  # a student's bug: report it, don't raise
        raise _Hint(f"your function raised {type(err).__name__}: {err}") from err
    return out


def _graded(grader: Callable[..., tuple[bool, str]]) -> Callable[..., tuple[bool, str]]:
    def wrapped(*args: Any, **kwargs: Any) -> tuple[bool, str]:
        try:
            return grader(*args, **kwargs)
        except _Hint as hint:
            return False, str(hint)

    wrapped.__doc__ = grader.__doc__
    return wrapped


def _require_function(answer: Any, signature: str) -> None:
    if not callable(answer):
        raise _Hint(f"the answer is a function: def {signature}: … (you gave a {type(answer).__name__})")


# -- part 1: observe ------------------------------------------------------------------------------------------


def _peaks(tree: xr.DataTree, word: str, sample: int = 0) -> dict[str, float]:
    """Each cross layer's highest value of ``word``'s map at the last step (any grid)."""
    peaks = {}
    for group in tree["cross"].children:
        path = f"cross/{group}"
        indices = _word_tokens(tree, sample, path, [word])[0]
        attn = tree[path]["attn"].isel(sample=sample).sel(step=_steps(tree, path)[-1])
        if "head" in attn.dims:
            attn = attn.mean("head")
        values = np.asarray(attn.values, np.float32)[..., indices].mean(-1)  # (layer, y, x)
        for name, layer_map in zip(attn["layer"].values, values):
            peaks[str(name)] = float(layer_map.max())
    return peaks


def _block(name: str) -> str:
    """A layer given as the explorer shows it ("res16 · up_blocks…", "res16/up_blocks….attn2") or in full, as its
    transformer block, so every spelling of one layer compares equal."""
    name = str(name).replace("·", "/").split("/")[-1].strip()
    return name.removesuffix(".attn2").removesuffix(".attn1")


def _correlations(tree: xr.DataTree, word: str, group: str = SETTLE_GROUP, sample: int = 0) -> np.ndarray:
    """Pearson correlation over pixels of ``word``'s layer-mean map at each step with its map at the last step."""
    indices = _word_tokens(tree, sample, group, [word])[0]
    maps = _layer_mean(tree, sample, group)[..., indices].mean(-1).reshape(len(_steps(tree, group)), -1)
    centred = maps - maps.mean(1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    return (centred @ centred[-1]) / np.maximum(norms * norms[-1], 1e-12)


def _settled(correlations: np.ndarray, at_least: float) -> int:
    """Position of the first step from which every correlation is at least ``at_least``."""
    later_min = np.minimum.accumulate(correlations[::-1])[::-1]
    return int(np.argmax(later_min >= at_least))


@_exercise("observe.word_map",
           "Write `word_map(tree, word, step)`: the 16×16 cross-attention map of `word` in sample 0 at step `step`, "
           "the mean over the layers of `tree['cross/res16']`. It is what the explorer shows for that word with "
           "*layers* set to *res16*.")
@_graded
def _grade_word_map(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    _require_function(answer, "word_map(tree, word, step)")
    tokens = _tokens(tree, 0)
    prompt = _prompt(tree, 0)
    words = [w for w in dict.fromkeys(prompt.lower().split()) if len(word_occurrences(tokens, w)) == 1
             and w not in ("a", "an", "and", "the", "with")]  # words the prompt holds once: one map each
    steps = _steps(tree)
    cross = _layer_mean(tree, 0)
    attn = np.asarray(tree[GROUP]["attn"].isel(sample=0).values, np.float32)
    if "head" in tree[GROUP]["attn"].dims:
        attn = attn.mean(tree[GROUP]["attn"].isel(sample=0).dims.index("head"))
    for word in words:
        indices = _word_tokens(tree, 0, GROUP, [word])[0]
        for step in sorted({steps[0], steps[len(steps) // 2], steps[-1]}):
            got = _call(answer, tree, word, step)
            if got is None:
                raise _Placeholder("word_map returns None")
            got = _array(got).squeeze()
            expected = cross[steps.index(step)][..., indices].mean(-1)
            if got.shape != expected.shape:
                raise _Hint(f"word_map(tree, {word!r}, {step}) has shape {got.shape}; one 16×16 map is expected: "
                            "select sample 0, the step and the word's token, then average over 'layer'")
            if np.allclose(got, expected, atol=MAP_ATOL):
                continue
            at = steps.index(step)
            one_layer = any(np.allclose(got, attn[at, k][..., indices].mean(-1), atol=MAP_ATOL)
                            for k in range(attn.shape[1]))
            other_token = any(np.allclose(got, cross[at][..., t], atol=MAP_ATOL)
                              for t in range(cross.shape[-1]) if t not in indices)
            if one_layer:
                raise _Hint(f"for {word!r} at step {step} you return one layer's map: average over all the layers")
            if other_token:
                raise _Hint(f"for {word!r} at step {step} the map belongs to another token: find the word's index "
                            "among the sample's token_text (the first token is the start token)")
            if np.allclose(got / max(got.max(), 1e-12), expected / max(expected.max(), 1e-12), atol=MAP_ATOL):
                raise _Hint("the map has the right shape but another scale: return the raw layer mean, not normalised")
            raise _Hint(f"word_map(tree, {word!r}, {step}) differs from the recording by up to "
                        f"{np.abs(got - expected).max():.3g}: select sample 0 and the step with .sel, the word's "
                        "token, and average over 'layer'")
    return True, "your maps match the recording for every word, at the first, a middle and the last step"


@_exercise("observe.peak_layer",
           "Which cross-attention layer gives the first subject (*circle* in the default prompt) its strongest "
           "attention, the highest value any one pixel gives it, at the last step of sample 0? Look at all three "
           "grids. Answer with the layer's name as `tree['cross/res16'].layer` lists it (or as the explorer's "
           "*layers* menu shows it).")
@_graded
def _grade_peak_layer(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    word = subjects_of(_prompt(tree, 0))[0]
    peaks = _peaks(tree, word)
    by_block = {_block(name): value for name, value in peaks.items()}
    if not isinstance(answer, str) or _block(answer) not in by_block:
        raise _Hint("answer with a layer's name, a string such as tree['cross/res8'].layer.values[0] prints; "
                    f"{answer!r} is not a cross-attention layer of this recording")
    best = max(peaks.values())
    value = by_block[_block(answer)]
    if value >= best - PEAK_TIE:
        return True, f"that layer's map of {word!r} peaks at {value:.3f}, higher than any other layer's"
    return False, (f"in that layer {word!r} peaks at {value:.3f} at the last step; another layer goes higher. "
                   "Compare each layer's maximum over pixels (not its mean), in every grid")


@_exercise("observe.settle_step",
           "When is a word's place decided? Take the last subject's colour word (*blue* in the default prompt) on the "
           "8×8 grid: its map in sample 0, the mean over the layers of `tree['cross/res8']`. From which step on is "
           f"that map correlated at least {SETTLE_CORRELATION} (Pearson, over the pixels: `np.corrcoef`) with its "
           "map at the last step, and stays so? Answer with a step number.")
@_graded
def _grade_settle_step(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    prompt = _prompt(tree, 0)
    word = attributes_of(prompt)[-1].split()[-1] if attributes_of(prompt)[-1] else subjects_of(prompt)[-1]
    steps = _steps(tree, SETTLE_GROUP)
    value = _number(answer)
    if value is None or value != int(value) or int(value) not in steps:
        raise _Hint(f"answer with a recorded step number, {steps[0]} … {steps[-1]} ({answer!r} is not one)")
    correlations = _correlations(tree, word)
    accepted = {steps[_settled(correlations, SETTLE_CORRELATION + d)] for d in SETTLE_SLACK}
    given = int(value)
    if given in accepted:
        return True, f"from step {given} on, {word!r}'s map is its final one to a correlation ≥ {SETTLE_CORRELATION}"
    if given < min(accepted):
        lowest = float(correlations[steps.index(given):].min())
        return False, (f"from step {given} on the correlation of {word!r}'s map with its final one still drops to "
                       f"{lowest:.2f}: look later")
    return False, (f"{word!r}'s map stays correlated ≥ {SETTLE_CORRELATION} with its final one from before step "
                   f"{given} already: look earlier")


# -- part 2: measure ------------------------------------------------------------------------------------------


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(overlap.soft_iou(torch.from_numpy(a), torch.from_numpy(b)))


@_exercise("measure.soft_iou",
           "Write `soft_iou(a, b)` for two maps (2-D numpy arrays): scale each map to 0…1 (subtract its minimum, "
           "divide by its range), then return Σ min(a, b) / Σ max(a, b) as a float. It is 1 for identical maps and 0 "
           "for maps that never attend to the same pixel.")
@_graded
def _grade_soft_iou(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    _require_function(answer, "soft_iou(a, b)")
    rng = np.random.default_rng(0)
    a, b = rng.random((16, 16), np.float32), rng.random((16, 16), np.float32)
    first = _call(answer, a, b)
    if first is None:
        raise _Placeholder("soft_iou returns None")
    if _number(first) is None:
        raise _Hint(f"return one number (a float); yours returned a {type(first).__name__}")
    same = _number(_call(answer, a, a.copy()))
    if same is None or not math.isclose(same, 1.0, rel_tol=VALUE_RTOL):
        raise _Hint(f"two identical maps should give 1; yours gives {same}")
    left, right = np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32)
    left[:, :8], right[:, 8:] = 1.0, 1.0
    apart = _number(_call(answer, left, right))
    if apart is None or abs(apart) > 1e-3:
        raise _Hint(f"two maps on disjoint pixels should give 0; yours gives {apart}")
    scaled = _number(_call(answer, 3 * a + 0.5, b))
    if scaled is None or not math.isclose(scaled, _number(first), rel_tol=VALUE_RTOL, abs_tol=1e-6):
        raise _Hint("scaling a map (3·a + 0.5) changed your value: scale each map to 0…1 before comparing, so that "
                    "neither a map's floor nor its peak matters")
    pairs = [(a, b)] + [(m[0], m[1]) for m in (subject_maps(tree, s).values for s in range(_n_samples(tree)))]
    worst = 0.0
    for x, y in pairs:
        got, expected = _number(_call(answer, x, y)), _soft_iou(x, y)
        if got is None:
            raise _Hint("return one number (a float) for every pair of maps")
        worst = max(worst, abs(got - expected))
    if worst <= VALUE_RTOL:
        return True, ("your soft IoU matches probe.analysis.overlap.soft_iou on random and on the recorded subjects' "
                      "maps")
    return False, (f"on the recorded maps yours is off by up to {worst:.3g}: after scaling each map to 0…1, sum the "
                   "pixelwise minimum and divide by the sum of the pixelwise maximum")


def _n_samples(tree: xr.DataTree) -> int:
    return int(tree[GROUP].ds.sizes["sample"])


@_exercise("measure.missing_rate",
           "In what share of the recorded images (0 to 1) does the exact judge find at least one subject *missing*? "
           "A *mixed* subject (drawn with the other's colour or shape, or a blend) is not missing.")
@_graded
def _grade_missing_rate(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    value = _number(answer)
    table = verdicts(tree)
    n = len(table)
    truth = float(table.any_missing.mean())
    failed = float((~table.all_present).mean())
    if value is None:
        raise _Hint(f"answer with a number between 0 and 1 ({answer!r} is not a number)")
    if math.isclose(value, truth, rel_tol=VALUE_RTOL, abs_tol=1e-9):
        return True, f"the judge finds a subject missing in {value:.0%} of these {n} images"
    if value > 1:
        raise _Hint(f"give a share between 0 and 1 (of the {n} images), not a count or a percentage")
    if math.isclose(value, failed, rel_tol=VALUE_RTOL, abs_tol=1e-9):
        raise _Hint("you counted every image where a subject is not 'present'; count only those where one is "
                    "'missing' (mixed and wrong-colour subjects were drawn)")
    raise _Hint(f"not what the judge finds: judge each of the {n} images against its own prompt "
                "(probe.judges.ExactJudge) and count the images where any subject's status is 'missing'")


def _separation(tree: xr.DataTree, step: int = -1) -> tuple[dict[str, float], bool]:
    """|AUC − 0.5| of each statistic at ``step`` for "some subject is not present" among the two-object images;
    False when one of the two groups is empty."""
    from sklearn.metrics import roc_auc_score

    table = overlap_table(tree)
    two = [k for k in range(_n_samples(tree)) if len(subjects_of(_prompt(tree, k))) == 2]
    at = table[table.step == _step(tree, step)].set_index("sample").loc[two]
    failed = ~verdicts(tree).set_index("sample").loc[two].all_present.to_numpy()
    if failed.all() or not failed.any():
        return {}, False
    out = {}
    for name in STATISTICS:
        x = at[name].to_numpy()
        keep = np.isfinite(x)
        if failed[keep].all() or not failed[keep].any():
            out[name] = 0.0
            continue
        out[name] = abs(float(roc_auc_score(failed[keep], x[keep])) - 0.5)
    return out, True


@_exercise("measure.best_statistic",
           "An image *fails* when some subject is not *present* (missing, mixed, wrong colour or shape). Among the "
           "images of the two-object prompt, which of the statistics "
           f"{', '.join(f'`{s}`' for s in STATISTICS)} at the last step separates the failed images from the others "
           "best, by the ROC AUC furthest from 0.5 (`sklearn.metrics.roc_auc_score`)? Answer with its column name.")
@_graded
def _grade_best_statistic(answer: Any, tree: xr.DataTree) -> tuple[bool, str]:
    if not isinstance(answer, str) or answer not in STATISTICS:
        raise _Hint(f"answer with one of the column names {list(STATISTICS)} ({answer!r} is not one)")
    separation, decidable = _separation(tree)
    if not decidable:
        raise _Hint("in this recording the judge finds every two-object image alike (all failed or none), so no "
                    "statistic can separate them: record more seeds (FULL = True) and answer again")
    best = max(separation.values())
    auc_gap = separation[answer]
    if auc_gap >= best - SEPARATION_TIE:
        return True, f"{answer} separates best here: its AUC is {0.5 + auc_gap:.2f} or {0.5 - auc_gap:.2f} from 0.5"
    return False, (f"{answer}'s AUC is {auc_gap:.2f} away from 0.5; another statistic separates better. Compute each "
                   "statistic's AUC at the last step (an AUC below 0.5 separates too, the other way round)")


# -- part 3: intervene ----------------------------------------------------------------------------------------


def _missing(image: Any, prompt: str) -> bool:
    return any(s.status == "missing" for s in exact_judge(_image(image), prompt))


@_exercise("intervene.fixed",
           "Which objectives brought the lost subject back, so that the judge no longer calls any subject *missing* "
           "(a *mixed* subject counts as drawn)? Answer with a set of names such as `{\"ae\", \"iou\"}`, or `set()` "
           "if none did.")
@_graded
def _grade_fixed(answer: Any, runs: Mapping[str, Any], prompt: str) -> tuple[bool, str]:
    if isinstance(answer, str):
        answer = {answer}
    if not isinstance(answer, (set, frozenset, list, tuple)) or not all(isinstance(a, str) for a in answer):
        raise _Hint("answer with a set of objective names, e.g. {'ae'}, or set() if none brought it back")
    guided = [name for name in runs if name != "none"]
    given = set(answer)
    if "none" in given:
        raise _Hint("'none' is the unguided run: the answer names guided runs only")
    unknown = given - set(guided)
    if unknown:
        raise _Hint(f"{sorted(unknown)} not among the runs; the guided runs are {guided}")
    if "none" in runs and not _missing(runs["none"], prompt):
        raise _Hint("without guidance ('none') no subject is missing at this seed: there is nothing to bring "
                    "back; find a seed where one goes missing (raise SEEDS or set FULL = True)")
    truth = {name for name in guided if not _missing(runs[name], prompt)}
    if given == truth:
        return True, ("the judge agrees" + ("; now look at the statuses: were the subjects drawn right "
                                            "('present') or mixed?" if truth else ""))
    still = sorted(given - truth)
    if still:
        return False, f"the judge still finds a subject missing with {still}: judge each run's image yourself"
    return False, "the judge finds no subject missing in a run you left out: judge every guided run's image"


def _reference_maps(seed: int = 0) -> tuple[Any, torch.Tensor]:
    """Guidance maps of three subjects on two images, with a gradient, for checking an objective."""
    from probe.steer.guide import GuidanceMaps, Schedule

    generator = torch.Generator().manual_seed(seed)
    subjects = torch.rand(2, 3, 16, 16, generator=generator).requires_grad_(True)
    cross = torch.rand(2, 16, 16, 9, generator=generator)
    return GuidanceMaps(subjects, cross, None, Schedule()), subjects


@_exercise("intervene.objective",
           "Write your own overlap objective `overlap_loss(maps)`: `maps.subjects` holds the subjects' maps, shape "
           "(images, subjects, 16, 16); return one loss per image, shape (images,), the mean soft IoU over every "
           "pair of subjects (`probe.analysis.overlap.soft_iou`). Use torch operations: guidance follows its gradient.")
@_graded
def _grade_objective(answer: Any) -> tuple[bool, str]:
    from probe.steer.guide import OBJECTIVES

    _require_function(answer, "overlap_loss(maps)")
    maps, subjects = _reference_maps()
    got = _call(answer, maps)
    if got is None:
        raise _Placeholder("overlap_loss returns None")
    if not isinstance(got, torch.Tensor):
        raise _Hint(f"return a torch tensor (yours is a {type(got).__name__}): guidance needs its gradient")
    expected = OBJECTIVES["iou"](maps)
    if got.shape != expected.shape:
        hint = " average over the pairs too" if got.ndim == 2 else ""
        raise _Hint(f"for 2 images of 3 subjects yours has shape {tuple(got.shape)}; one loss per image is shape "
                    f"{tuple(expected.shape)}.{hint}")
    if not got.requires_grad:
        raise _Hint("your loss has no gradient: build it from maps.subjects with torch operations (no .item(), "
                    "no numpy)")
    if not torch.allclose(got.detach(), expected.detach(), atol=1e-5):
        first_pair = overlap.soft_iou(subjects[:, 0], subjects[:, 1])
        if torch.allclose(got.detach(), first_pair.detach(), atol=1e-5):
            raise _Hint("that is the first two subjects only: three subjects make three pairs, average over all of "
                        "them (probe.analysis.overlap.pair_indices lists them)")
        off = float((got - expected).detach().abs().max())
        raise _Hint(f"on 3 subjects your loss is off by up to {off:.3g}: the mean of soft_iou over the pairs (0, 1), "
                    "(0, 2), (1, 2)")
    (grad,) = torch.autograd.grad(got.sum(), [subjects])
    if not torch.isfinite(grad).all():
        raise _Hint("your loss's gradient is not finite: guidance could not follow it")
    return True, "it equals objective='iou' and guidance can follow its gradient: pass it to generate(objective=…)"


def _layout(edit_result: Any) -> tuple[bool, float]:
    """(the edit shows the target, mask IoU of the object before and after) from the judge, via probe.steer.edit."""
    from probe.steer.edit import compare

    s = edit_result.settings
    row = compare(edit_result.source, edit_result.edited, s.source_prompt, s.target_prompt)
    iou = row["iou"]
    return bool(row["success"]), float(iou) if iou == iou else 0.0


@_exercise("intervene.kept_layout",
           "Of the three injections (`\"self\"`, `\"cross\"`, `\"none\"`), which one gave the target's colour *and* "
           "kept the object where and as it was, by the IoU of the object's mask in the source and the edited image? "
           "`probe.steer.edit.compare(source, edited, source_prompt, target_prompt)` scores one edit.")
@_graded
def _grade_kept_layout(answer: Any, edits: Mapping[str, Any]) -> tuple[bool, str]:
    if not isinstance(answer, str) or answer not in edits:
        raise _Hint(f"answer with one of {list(edits)} ({answer!r} is not one)")
    scores = {name: _layout(e) for name, e in edits.items()}
    successes = {name: iou for name, (ok, iou) in scores.items() if ok}
    ok, iou = scores[answer]
    if not successes:
        raise _Hint("no injection gave the target here (the judge does not find it in any edited image): try "
                    "another seed before answering")
    if not ok:
        return False, f"with {answer!r} the edited image does not show the target: judge it against the target prompt"
    if iou >= max(successes.values()) - LAYOUT_TIE:
        return True, f"{answer!r} gave the target and kept {iou:.0%} of the object's mask in place"
    return False, (f"{answer!r} gave the target but kept only {iou:.0%} of the object's mask; another injection "
                   "kept more")
