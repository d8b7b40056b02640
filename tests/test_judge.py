"""Checks of the shapes-world judge: accuracy on held-out renderings, robustness, subject statuses."""

import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from probe.shapes import judge_calibration
from probe.shapes.judge import MIN_CONFIDENCE, detect, evaluate_scene, judge, parse_prompt, summary
from probe.shapes.world import BACKGROUND, COLOURS, IMAGE_SIZE, Shape, coverage, render, sample_attributes, scene_for
from probe.studies.common import judged

HELD_OUT_SEED = 12345  # no dataset or other test draws scenes from this seed
N_HELD_OUT = 2000
N_NEAR_TOUCHING = 500  # of N_HELD_OUT, built by hand with boxes 1–2 px apart
N_ROBUST = 300
NOISE_SIGMA = 10.0  # pixel noise, in 0–255 units (10/255)
TINT = (225, 235, 250)

RED_CIRCLE = Shape("circle", "red", 18, 32, 11)
BLUE_SQUARE = Shape("square", "blue", 46, 32, 11)
PROMPT = "a red circle and a blue square"


def boxes_apart(a: Shape, b: Shape, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return bx0 >= ax1 + gap or ax0 >= bx1 + gap or by0 >= ay1 + gap or ay0 >= by1 + gap


def near_touching_scene(rng: np.random.Generator) -> list[Shape]:
    """Two or three objects, each neighbour of the first 1–2 px away (box to box) to its side or below it."""
    attributes = sample_attributes(rng, int(rng.integers(2, 4)), similar=bool(rng.random() < 0.5))
    while True:
        sizes = rng.uniform(9.0, 12.0, len(attributes))
        verticals = rng.random(len(attributes)) < 0.5
        first = Shape(*attributes[0][::-1], *rng.uniform(12, 52, 2), sizes[0], bool(verticals[0]))
        objects = [first]
        for k, axis in zip(range(1, len(attributes)), ("x", "y")):
            template = Shape(*attributes[k][::-1], 0.0, 0.0, sizes[k], bool(verticals[k]))
            half = template.half_extent()[0 if axis == "x" else 1]
            first_half = first.half_extent()[0 if axis == "x" else 1]
            offset = (first_half + rng.uniform(1.0, 2.0) + half) * rng.choice([-1, 1])
            jitter = rng.uniform(-3, 3)
            cx, cy = (first.cx + offset, first.cy + jitter) if axis == "x" else (first.cx + jitter, first.cy + offset)
            objects.append(Shape(template.shape, template.colour, cx, cy, template.size, template.vertical))
        inside = all(min(o.box()) >= 1 and max(o.box()) <= IMAGE_SIZE - 1 for o in objects)
        apart = all(boxes_apart(a, b, 1.0) for i, a in enumerate(objects) for b in objects[i + 1 :])
        if inside and apart:
            return objects


def held_out_scenes(n: int, n_near: int) -> list[list[Shape]]:
    """``n`` scenes: 1, 2 and 3 objects from the seeded stream (a quarter similar), then near-touching ones."""
    scenes = [scene_for(HELD_OUT_SEED, i, 1 + i % 3, similar=i % 4 == 0) for i in range(n - n_near)]
    rng = np.random.default_rng(HELD_OUT_SEED)
    return scenes + [near_touching_scene(rng) for _ in range(n_near)]


def score(scenes, perturb=lambda image: image, background=BACKGROUND, size=IMAGE_SIZE) -> tuple[np.ndarray, int]:
    """(per-object correctness, number of spurious detections) over rendered scenes."""
    correct, spurious = [], 0
    for objects in scenes:
        image, labels = render(objects, size=size, background=background)
        image = perturb(image)
        detections = detect(image)
        correct += evaluate_scene(image, objects, detections, labels)
        spurious += max(0, len(detections) - len(objects))
    return np.array(correct), spurious


def accuracy(scenes, perturb=lambda image: image, background=BACKGROUND, size=IMAGE_SIZE) -> tuple[float, float]:
    """(per-object accuracy, spurious detections per object) over rendered scenes."""
    correct, spurious = score(scenes, perturb, background, size)
    return correct.mean(), spurious / correct.size


def add_noise(image: np.ndarray, seed: int = 0) -> np.ndarray:
    noisy = image + np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, image.shape)
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def box_blur(image: np.ndarray) -> np.ndarray:
    blurred = ndimage.uniform_filter(image.astype(np.float32), size=(3, 3, 1), mode="nearest")
    return np.clip(blurred.round(), 0, 255).astype(np.uint8)


def paint(objects: list[tuple[Shape, tuple[float, float, float]]], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render shapes in arbitrary colours (e.g. blends), as world.render does for palette colours."""
    image = np.full((size, size, 3), BACKGROUND, np.float32)
    for obj, rgb in objects:
        alpha = coverage(obj, size)[..., None]
        image = image * (1 - alpha) + np.asarray(rgb, np.float32) * alpha
    return np.clip(image.round(), 0, 255).astype(np.uint8)


def statuses(image: np.ndarray, prompt: str = PROMPT) -> list[str]:
    return [s.status for s in judge(image, prompt)]


# Accuracy.


def test_near_touching_scenes_are_near_touching():
    rng = np.random.default_rng(0)
    for _ in range(50):
        objects = near_touching_scene(rng)
        assert not any(boxes_apart(objects[0], o, 2.0 + 1e-9) for o in objects[1:])


def test_accuracy_on_held_out_renderings():
    start = time.perf_counter()
    scenes = held_out_scenes(N_HELD_OUT, N_NEAR_TOUCHING)
    correct, n_spurious = score(scenes)
    n_near_objects = sum(len(objects) for objects in scenes[-N_NEAR_TOUCHING:])
    acc, near_acc, spurious = correct.mean(), correct[-n_near_objects:].mean(), n_spurious / correct.size
    print(
        f"held-out per-object accuracy {acc:.4f} over {correct.size} objects (near-touching {near_acc:.4f}), "
        f"spurious {spurious:.4f}, {len(scenes)} images in {time.perf_counter() - start:.1f} s"
    )
    assert acc >= 0.99
    assert near_acc >= 0.99
    assert spurious <= 0.01


@pytest.mark.parametrize("kind", ["noise", "blur", "tint", "all"])
def test_accuracy_is_robust(kind):
    background = TINT if kind in ("tint", "all") else BACKGROUND

    def perturb(image):
        image = box_blur(image) if kind in ("blur", "all") else image
        return add_noise(image) if kind in ("noise", "all") else image

    acc, spurious = accuracy(held_out_scenes(N_ROBUST, N_ROBUST // 4), perturb, background)
    print(f"{kind}: per-object accuracy {acc:.4f}, spurious {spurious:.4f}")
    assert acc >= 0.97
    assert spurious <= 0.03


@pytest.mark.parametrize("size", [32, 128])
def test_other_image_sizes(size):
    scenes = [scene_for(HELD_OUT_SEED + 1, i, 1 + i % 3) for i in range(30)]
    acc, spurious = accuracy(scenes, size=size)
    print(f"{size} px: per-object accuracy {acc:.4f}")
    assert acc >= 0.97
    assert spurious == 0


# Detection.


def test_blank_background_has_no_objects():
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)
    assert detect(blank) == []
    assert detect(add_noise(blank)) == []
    tinted = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), TINT, np.uint8)
    assert detect(add_noise(tinted)) == []


def test_small_blobs_are_ignored():
    image, _ = render([RED_CIRCLE])
    image[55:59, 55:59] = COLOURS["blue"]  # 16 px: a stray blob
    found = detect(image)
    assert [d.phrase for d in found] == ["red circle"]


def test_detection_fields():
    image, labels = render([RED_CIRCLE, BLUE_SQUARE])
    found = detect(Image.fromarray(image))  # PIL input
    assert [d.phrase for d in found] == ["red circle", "blue square"]
    for k, d in enumerate(found, start=1):
        assert d.mask.shape == labels.shape and d.mask.dtype == bool
        assert (d.mask & (labels == k)).sum() / (d.mask | (labels == k)).sum() > 0.95
        assert d.area == d.mask.sum()
        assert 0.8 < d.confidence <= 1.0
        assert d.colour_purity == 1.0
        assert np.allclose(d.rgb, COLOURS[d.colour], atol=2)
        assert max(d.shape_scores, key=d.shape_scores.get) == d.shape
    x0, y0, x1, y1 = found[1].box
    assert (x0, y0, x1, y1) == (37, 23, 55, 41)  # square 46 ± 9.35 px, 32 ± 9.35 px


# Statuses.


def test_parse_prompt():
    assert parse_prompt("A red circle, and a blue square.") == [("red", "circle"), ("blue", "square")]
    with pytest.raises(ValueError, match="banana") as error:
        parse_prompt("a red banana and a blue square")
    assert "purple" in str(error.value) and "triangle" in str(error.value)
    with pytest.raises(ValueError, match="circle"):
        judge(render([RED_CIRCLE])[0], "a circle red")


def test_present():
    image, _ = render([RED_CIRCLE, BLUE_SQUARE])
    result = judge(image, [("red", "circle"), ("blue", "square")])
    assert [s.status for s in result] == ["present", "present"]
    assert [s.detection.phrase for s in result] == ["red circle", "blue square"]
    info = summary(result)
    assert info["all_present"] and not info["any_missing"] and info["n_present"] == 2


def test_missing():
    result = judge(render([RED_CIRCLE])[0], PROMPT)
    assert [s.status for s in result] == ["present", "missing"]
    assert result[1].detection is None
    info = summary(result)
    assert info["any_missing"] and info["n_missing"] == 1 and not info["all_present"]


def test_one_object_cannot_satisfy_two_subjects():
    assert statuses(render([RED_CIRCLE])[0], "a red circle and a red circle") == ["present", "missing"]


def test_wrong_colour():
    green_circle = Shape("circle", "green", 18, 32, 11)
    assert statuses(render([green_circle, BLUE_SQUARE])[0]) == ["wrong_colour", "present"]


def test_wrong_shape():
    red_triangle = Shape("triangle", "red", 18, 32, 11)
    assert statuses(render([red_triangle, BLUE_SQUARE])[0]) == ["wrong_shape", "present"]


def test_swapped_attributes_are_mixed():
    blue_circle = Shape("circle", "blue", 18, 32, 11)
    red_square = Shape("square", "red", 46, 32, 11)
    assert statuses(render([blue_circle, red_square])[0]) == ["mixed", "mixed"]
    assert statuses(render([blue_circle])[0]) == ["mixed", "mixed"]  # one object binding both subjects
    assert statuses(render([blue_circle, BLUE_SQUARE])[0]) == ["mixed", "present"]


def test_blended_colour_is_mixed():
    blend = (np.asarray(COLOURS["red"]) + np.asarray(COLOURS["blue"])) / 2
    result = judge(paint([(RED_CIRCLE, blend)]), PROMPT)
    assert [s.status for s in result] == ["mixed", "mixed"]
    assert result[0].detection is result[1].detection
    assert result[0].detection.shape == "circle"
    # A pure palette colour between two subjects' colours is not a blend.
    orange_circle = Shape("circle", "orange", 18, 32, 11)
    assert statuses(render([orange_circle])[0], "a red circle and a yellow square") == ["wrong_colour", "missing"]


# Minimum confidence.

YELLOW_CIRCLE = Shape("circle", "yellow", 32, 32, 11)


def rimmed(inner: Shape, rim: str, width: float) -> np.ndarray:
    """``inner`` with a ring of colour ``rim``, ``width`` px wide, bled around it (drawn under it, one size up)."""
    ring = Shape(inner.shape, rim, inner.cx, inner.cy, inner.size + width, inner.vertical)
    return render([ring, inner])[0]


@pytest.mark.parametrize("width", [1.5, 2.0, 3.0])
def test_faint_rim_is_not_an_object(width):
    image = rimmed(YELLOW_CIRCLE, "orange", width)
    prompt = "a yellow circle and an orange circle"
    rim = [d for d in detect(image) if d.colour == "orange"]
    assert len(rim) == 1 and rim[0].confidence < MIN_CONFIDENCE  # the rim is found, at low confidence
    assert statuses(image, prompt) == ["present", "missing"]
    assert [s.status for s in judge(image, prompt, min_confidence=0)] == ["present", "present"]  # the old verdict
    assert evaluate_scene(image, [YELLOW_CIRCLE], labels=render([YELLOW_CIRCLE])[1]) == [True]


def test_clean_two_object_scenes_stay_present():
    assert statuses(render([RED_CIRCLE, BLUE_SQUARE])[0]) == ["present", "present"]
    for i in range(40):  # rendered scenes of the seeded stream, noise and all
        objects = scene_for(HELD_OUT_SEED + 2, i, 2)
        image = add_noise(render(objects)[0], seed=i)
        assert all(s.status == "present" for s in judge(image, [(o.colour, o.shape) for o in objects])), i


def test_judged_confidences_column():
    image = render([RED_CIRCLE, BLUE_SQUARE])[0]
    row = judged(image, "a red circle and a green triangle and a blue square")
    found = {d.phrase: d.confidence for d in detect(image)}
    expected = [f"{found['red circle']:.3f}", "", f"{found['blue square']:.3f}"]
    assert row["confidences"] == ";".join(expected)
    assert row["statuses"] == "present,missing,present" and row["precision"] == 1.0
    rim = judged(rimmed(YELLOW_CIRCLE, "orange", 2.0), "a yellow circle and an orange circle")
    statuses_ = judge(rimmed(YELLOW_CIRCLE, "orange", 2.0), "a yellow circle and an orange circle")
    assert rim["confidences"] == f"{statuses_[0].detection.confidence:.3f};" and rim["n_missing"] == 1


def test_min_confidence_is_the_calibrated_one():
    """The committed table is what the calibration computes, and MIN_CONFIDENCE is its chosen row."""
    committed = pd.read_csv(judge_calibration.TABLE)
    assert judge_calibration.chosen_threshold(committed) == MIN_CONFIDENCE
    assert committed["chosen"].sum() == 1
    best = committed["accuracy"].max()
    assert committed.loc[committed["accuracy"] == best, "threshold"].min() == MIN_CONFIDENCE  # lowest on a tie
    assert committed.loc[committed["threshold"] == 0, "accuracy"].item() < best  # the floor helps
    fresh = judge_calibration.calibrate_min_confidence(int(committed["n_scenes"].iloc[0]))
    pd.testing.assert_frame_equal(fresh.round({"accuracy": 6, "scenes_right": 6}), committed, check_dtype=False)


def test_calibration_scenes_hold_their_hard_cases():
    scenes = [judge_calibration.calibration_scene(judge_calibration.SEED, i) for i in range(60)]
    kinds = {k for s in scenes for k in s.kinds}
    assert {"rim", "faint", "small", "blur", "noise", "tint"} <= kinds
    assert any(not t for s in scenes for t in s.truth) and all(len(s.truth) == len(s.subjects) for s in scenes)
    again = judge_calibration.calibration_scene(judge_calibration.SEED, 7)
    assert np.array_equal(again.image, scenes[7].image) and again.subjects == scenes[7].subjects
