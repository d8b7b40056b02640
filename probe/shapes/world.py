"""The shapes world: coloured geometric shapes on a light background, with exact truth.

Every scene is a list of :class:`Shape` objects. :func:`render` draws them anti-aliased
(4×4 supersampling) and returns the image together with a label map (0 = background,
k = the k-th object), so each object's mask is known exactly. Scenes are drawn from a
seeded generator, so ``shapes_dataset(n, seed)`` is the same on every machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 145, 25),
    "yellow": (230, 210, 30),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ellipse")
# Pairs a model confuses easily: the Self-Cross study's "similar subjects".
SIMILAR_COLOURS: tuple[tuple[str, str], ...] = (("red", "orange"), ("blue", "purple"))
SIMILAR_SHAPES: tuple[tuple[str, str], ...] = (("circle", "ellipse"),)

IMAGE_SIZE = 64
SIZE_RANGE = (9.0, 13.0)  # half-extent of an object, in pixels at 64 px
ELLIPSE_ASPECT = 0.55  # minor / major half-axis
MIN_GAP = 1.0  # pixels between objects' bounding boxes
BACKGROUND = (245, 245, 240)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object of a scene; sizes are in pixels of a ``IMAGE_SIZE`` image."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    vertical: bool = False  # ellipses only: major axis along y

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"

    def half_extent(self) -> tuple[float, float]:
        """Half width and half height of the bounding box."""
        if self.shape == "ellipse":
            minor = self.size * ELLIPSE_ASPECT
            return (minor, self.size) if self.vertical else (self.size, minor)
        if self.shape == "square":
            return self.size * 0.85, self.size * 0.85
        return self.size, self.size

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        hw, hh = self.half_extent()
        return self.cx - hw, self.cy - hh, self.cx + hw, self.cy + hh

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean occupancy at points (x, y) in pixel coordinates."""
        dx, dy = x - self.cx, y - self.cy
        hw, hh = self.half_extent()
        if self.shape in ("circle", "ellipse"):
            return (dx / hw) ** 2 + (dy / hh) ** 2 <= 1.0
        if self.shape == "square":
            return (np.abs(dx) <= hw) & (np.abs(dy) <= hh)
        if self.shape == "triangle":  # apex up, base at the bottom of the box
            t = (dy + hh) / (2 * hh)  # 0 at the apex, 1 at the base
            return (t >= 0) & (t <= 1) & (np.abs(dx) <= hw * t)
        raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")


def caption(objects: list[Shape]) -> str:
    """``"a red circle and a blue square"`` in the order of ``objects``."""
    return " and ".join(f"a {o.phrase}" for o in objects)


def coverage(obj: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by ``obj`` (float32, H×W)."""
    scale = size / IMAGE_SIZE
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    grid = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1) / scale
    y, x = np.meshgrid(grid, grid, indexing="ij")
    hit = obj.inside(x, y).astype(np.float32)
    return hit.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(
    objects: list[Shape], size: int = IMAGE_SIZE, background: tuple[int, int, int] = BACKGROUND
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene. Returns (image uint8 H×W×3, labels uint8 H×W with 0 = background)."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    labels = np.zeros((size, size), np.uint8)
    for k, obj in enumerate(objects, start=1):
        alpha = coverage(obj, size)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
        labels[alpha[..., 0] >= 0.5] = k
    return np.clip(image.round(), 0, 255).astype(np.uint8), labels


def _fits(box: tuple[float, float, float, float], placed: list[Shape]) -> bool:
    x0, y0, x1, y1 = box
    if x0 < 1 or y0 < 1 or x1 > IMAGE_SIZE - 1 or y1 > IMAGE_SIZE - 1:
        return False
    for other in placed:
        a0, b0, a1, b1 = other.box()
        if x0 < a1 + MIN_GAP and a0 < x1 + MIN_GAP and y0 < b1 + MIN_GAP and b0 < y1 + MIN_GAP:
            return False
    return True


def sample_scene(
    rng: np.random.Generator,
    attributes: list[tuple[str, str]],
    max_tries: int = 100,
) -> list[Shape]:
    """Place objects with the given (colour, shape) pairs at random, without overlap.

    A layout that jams is started over, so crowded scenes stay uniformly random.
    """
    for colour, shape in attributes:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {colour} {shape}; colours {list(COLOURS)}, shapes {SHAPES}")
    for _ in range(max_tries):
        placed: list[Shape] = []
        for colour, shape in attributes:
            for _ in range(max_tries):
                obj = Shape(
                    shape,
                    colour,
                    cx=float(rng.uniform(8, IMAGE_SIZE - 8)),
                    cy=float(rng.uniform(8, IMAGE_SIZE - 8)),
                    size=float(rng.uniform(*SIZE_RANGE)),
                    vertical=bool(rng.random() < 0.5),
                )
                if _fits(obj.box(), placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == len(attributes):
            return placed
    raise RuntimeError(f"could not place {len(attributes)} objects without overlap")


def sample_attributes(rng: np.random.Generator, n: int, similar: bool = False,
                      distinct_shapes: bool = False) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs, no colour repeated; ``similar`` draws a confusable pair;
    ``distinct_shapes`` repeats no noun either (a repeated noun is one token for two objects)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    if similar:
        if rng.random() < 0.5:
            pair = SIMILAR_COLOURS[rng.integers(len(SIMILAR_COLOURS))]
            shape = shapes[rng.integers(len(shapes))]
            first = [(pair[0], shape), (pair[1], shapes[rng.integers(len(shapes))])]
        else:
            pair = SIMILAR_SHAPES[rng.integers(len(SIMILAR_SHAPES))]
            c = rng.choice(len(colours), 2, replace=False)
            first = [(colours[c[0]], pair[0]), (colours[c[1]], pair[1])]
        rng.shuffle(first)
        return first[:n]
    picked = rng.choice(len(colours), n, replace=False)
    if distinct_shapes:
        if n > len(shapes):
            raise ValueError(f"{n} objects cannot have distinct shapes: the world has {len(shapes)}")
        return [(colours[i], shapes[j]) for i, j in zip(picked, rng.choice(len(shapes), n, replace=False))]
    return [(colours[i], shapes[rng.integers(len(shapes))]) for i in picked]


def scene_for(seed: int, index: int, n_objects: int, similar: bool = False,
              distinct_shapes: bool = False) -> list[Shape]:
    """The scene number ``index`` of a seeded stream: the unit of every dataset here."""
    rng = np.random.default_rng([seed, index])
    return sample_scene(rng, sample_attributes(rng, n_objects, similar, distinct_shapes))


def shapes_dataset(
    n: int,
    seed: int = 0,
    n_objects: tuple[int, ...] = (1, 2, 3),
    weights: tuple[float, ...] | None = None,
    size: int = IMAGE_SIZE,
):
    """A deterministic ``datasets.Dataset`` of rendered scenes with captions and per-object truth.

    Columns: ``image`` (PIL), ``labels`` (PIL "L", pixel = object index + 1), ``caption``,
    ``objects`` (list of dicts: shape, colour, cx, cy, size, vertical, box).
    """
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = rng.choice(n_objects, size=n, p=weights)

    def rows():
        for i, k in enumerate(counts):
            scene = scene_for(seed, i, int(k))
            image, labels = render(scene, size)
            yield {
                "image": Image.fromarray(image),
                "labels": Image.fromarray(labels),
                "caption": caption(scene),
                "objects": [{**asdict(o), "box": list(o.box())} for o in scene],
            }

    return datasets.Dataset.from_list(list(rows()))
