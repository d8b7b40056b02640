"""Choose the judge's minimum confidence (:data:`probe.shapes.judge.MIN_CONFIDENCE`) on rendered scenes.

A generator's image can hold a faint colour that is not an object: an orange rim bled around a yellow circle is
found as a low-confidence "orange circle" (its colour covers little of the filled mask). Without a floor on
confidence such a rim makes the orange circle "present". The floor is chosen here, not by hand: scenes of the
world are drawn with the world's own anti-aliased coverage, with known truth, including the hard cases a
generator makes (rims of another colour around an object, faint low-contrast objects, blurred edges, small
objects, pixel noise, tinted backgrounds, other image sizes), and every threshold on a grid is scored by the
balanced accuracy of "present" per prompt subject; the best threshold wins, the lowest on a tie.

Recompute the table with ``python -m probe.shapes.judge_calibration`` (writes ``figures/judge_min_confidence.csv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from probe.shapes.judge import detect, judge
from probe.shapes.world import BACKGROUND, COLOURS, IMAGE_SIZE, SHAPES, Shape, coverage, scene_for

N_SCENES = 2000
SEED = 424242  # no dataset or test draws scenes from this seed
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.0, 0.8001, 0.025), 3))
TABLE = Path(__file__).resolve().parents[2] / "figures" / "judge_min_confidence.csv"

# Hard cases: the share of scenes that get each, and their ranges.
RIM_SHARE, RIM_WIDTH, RIM_OPACITY = 0.35, (0.75, 3.0), (0.6, 1.0)  # width in size units (≈ px at 64 px)
FAINT_SHARE, FAINT_OPACITY = 0.25, (0.6, 0.95)
SMALL_SHARE, SMALL_SIZE = 0.2, (5.0, 8.0)
BLUR_SHARE, BLUR_SIGMA = 0.3, (0.5, 1.2)
NOISE_SHARE, NOISE_SIGMA = 0.5, (2.0, 12.0)
TINT_SHARE, TINT_RANGE = 0.25, (215.0, 252.0)
SIZE_SHARE, OTHER_SIZES = 0.25, (32, 128)  # scenes drawn at another image size (the judge reads any size)
DISTRACTOR_SHARE = 0.5  # scenes whose prompt also names an object the image lacks


@dataclass(frozen=True, eq=False)
class CalibrationScene:
    """One rendered image, its prompt subjects and whether each is truly in it (a rim never is)."""

    image: np.ndarray
    subjects: list[tuple[str, str]]
    truth: list[bool]
    kinds: tuple[str, ...]


def paint(layers: list[tuple[Shape, float]], background=BACKGROUND, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw shapes in order with an opacity each, as ``world.render`` does (opacity 1 is its very image)."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    for obj, opacity in layers:
        alpha = coverage(obj, size)[..., None] * opacity
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return np.clip(image.round(), 0, 255).astype(np.uint8)


def _resized(obj: Shape, size: float, colour: str | None = None) -> Shape:
    return Shape(obj.shape, colour or obj.colour, obj.cx, obj.cy, size, obj.vertical)


def _layers(rng: np.random.Generator, objects: list[Shape]) -> tuple[list[tuple[Shape, float]], list, list[str]]:
    """Paint layers of a scene with its hard cases, the rim subjects (absent by truth) and the cases' names."""
    kinds, rims, layers = [], [], []
    if rng.random() < SMALL_SHARE:
        kinds.append("small")
        objects = [_resized(o, float(rng.uniform(*SMALL_SIZE))) for o in objects]
    faint = rng.random() < FAINT_SHARE
    kinds += ["faint"] * faint
    rimmed = int(rng.integers(len(objects))) if rng.random() < RIM_SHARE else -1
    for k, obj in enumerate(objects):
        opacity = float(rng.uniform(*FAINT_OPACITY)) if faint else 1.0
        if k == rimmed:  # the object shrinks by the rim's width and a ring of another colour stays around it
            colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
            layers.append((_resized(obj, obj.size, colour), float(rng.uniform(*RIM_OPACITY))))
            obj = _resized(obj, obj.size - float(rng.uniform(*RIM_WIDTH)))
            rims.append((colour, obj.shape))
            kinds.append("rim")
        layers.append((obj, opacity))
    return layers, rims, kinds


def calibration_scene(seed: int, index: int) -> CalibrationScene:
    """Scene ``index`` of a seeded stream: 1–3 objects (a quarter of them similar pairs) with random hard cases.

    Object sizes and rim widths are in pixels at 64 px and scale with the image; blur and noise are in the
    drawn image's own pixels."""
    objects = scene_for(seed, index, 1 + index % 3, similar=index % 4 == 0)
    rng = np.random.default_rng([seed, index, 1])
    layers, rims, kinds = _layers(rng, objects)
    background = BACKGROUND
    if rng.random() < TINT_SHARE:
        kinds.append("tint")
        background = tuple(float(v) for v in rng.uniform(*TINT_RANGE, 3))
    size = IMAGE_SIZE
    if rng.random() < SIZE_SHARE:
        size = int(rng.choice(OTHER_SIZES))
        kinds.append(f"{size}px")
    image = paint(layers, background, size).astype(np.float32)
    if rng.random() < BLUR_SHARE:
        kinds.append("blur")
        image = ndimage.gaussian_filter(image, sigma=(*[float(rng.uniform(*BLUR_SIGMA))] * 2, 0))
    if rng.random() < NOISE_SHARE:
        kinds.append("noise")
        image = image + rng.normal(0.0, float(rng.uniform(*NOISE_SIGMA)), image.shape)
    real = {(o.colour, o.shape) for o in objects}
    subjects = [(o.colour, o.shape) for o in objects] + [r for r in rims if r not in real]
    if rng.random() < DISTRACTOR_SHARE:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in real and (c, s) not in subjects]
        subjects.append(absent[int(rng.integers(len(absent)))])
    subjects = [subjects[i] for i in rng.permutation(len(subjects))]
    image = np.clip(image.round(), 0, 255).astype(np.uint8)
    return CalibrationScene(image, subjects, [s in real for s in subjects], tuple(kinds))


def _scores(truth: np.ndarray, said: np.ndarray) -> dict[str, float | int]:
    """Balanced accuracy of "present" (mean of the rates on truly present and truly absent subjects) and errors."""
    false_present, false_missing = int((said & ~truth).sum()), int((~said & truth).sum())
    hit = 1 - false_missing / max(1, int(truth.sum()))
    reject = 1 - false_present / max(1, int((~truth).sum()))
    return {"accuracy": (hit + reject) / 2, "false_present": false_present, "false_missing": false_missing}


def calibrate_min_confidence(
    n_scenes: int = N_SCENES, seed: int = SEED, thresholds: tuple[float, ...] = THRESHOLDS
) -> pd.DataFrame:
    """Per threshold: balanced accuracy of "present" against the truth, false present / missing subjects, the
    share of scenes judged exactly right, and ``chosen`` on the best row (the lowest threshold on a tie)."""
    scenes = [calibration_scene(seed, i) for i in range(n_scenes)]
    found = [detect(s.image) for s in scenes]
    truth = np.array([t for s in scenes for t in s.truth])
    rows = []
    for threshold in thresholds:
        said = [[v.status == "present" for v in judge(s.image, s.subjects, d, min_confidence=threshold)]
                for s, d in zip(scenes, found)]
        right = np.mean([list(p) == s.truth for p, s in zip(said, scenes)])
        flat = np.array([p for per_scene in said for p in per_scene])
        rows.append({"threshold": threshold, **_scores(truth, flat), "scenes_right": float(right),
                     "n_scenes": n_scenes, "n_subjects": int(truth.size)})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    table.loc[table["accuracy"].idxmax(), "chosen"] = True  # idxmax: the first (lowest) of equal maxima
    return table


def chosen_threshold(table: pd.DataFrame) -> float:
    """The threshold of the table's chosen row."""
    return float(table.loc[table["chosen"].astype(bool), "threshold"].iloc[0])


def write_table(path: str | Path = TABLE, n_scenes: int = N_SCENES, seed: int = SEED) -> pd.DataFrame:
    """Recompute the calibration and write it (atomically) to ``path``."""
    from probe.writes import write_csv

    table = calibrate_min_confidence(n_scenes, seed)
    write_csv(table.round({"accuracy": 6, "scenes_right": 6}), path)
    return table


if __name__ == "__main__":
    result = write_table()
    print(result.to_string(index=False))
    print(f"chosen minimum confidence: {chosen_threshold(result)}")
