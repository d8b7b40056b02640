"""An exact judge for the shapes world: which objects an image holds, and each prompt subject's status.

It reads images alone (numpy and scipy, no model), so it can score images that a diffusion model
drew. The world is simple enough to judge exactly: a light background, six fixed colours, four
fixed shapes that never overlap. The judge is built to survive what a small generator does to
that world: soft edges, pixel noise, a tinted background, small stray blobs, other image sizes.

Method, per image:

1. The background is the median of the border ring (objects never touch the border).
2. Every pixel is fitted as ``background + alpha * (colour - background)`` for each palette
   colour; the colour with the smallest residual wins. A pixel is foreground when it is at least
   half-way from the background to its colour (the truth label map's own 50 % rule), so
   anti-aliased or blurred edges fall where the truth puts them.
3. Foreground pixels form connected components. A component holding two colours in force (two
   near-touching objects joined by a blurred gap) is split by colour, with the colour residuals
   averaged over a 3×3 window so that pixel noise cannot speckle it.
4. Each object's shape is the template (circle, square, triangle, ellipse) fitted to its bounding
   box that overlaps its mask best (IoU); the margin over the runner-up says how clear it is.

Judging drops detections below :data:`MIN_CONFIDENCE` before matching them to subjects: a faint rim of one colour
bled around an object of another is found as a low-confidence object, and it must not make a subject present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from probe.shapes.world import COLOURS, ELLIPSE_ASPECT, IMAGE_SIZE, SHAPES, Shape, render

ImageLike = Union[np.ndarray, "PIL.Image.Image"]  # noqa: F821 (PIL is optional)

# Detection.
BORDER_FRACTION = 2 / IMAGE_SIZE  # width of the border ring that estimates the background (2 px at 64 px)
FOREGROUND_ALPHA = 0.5  # object pixel: at least half-way from background to its colour, as in render()'s labels
MIN_AREA_FRACTION = 20 / IMAGE_SIZE**2  # smaller components are stray blobs (20 px at 64 px)
SMOOTH_WINDOW = 3  # pixels over which colour residuals are averaged before splitting a component by colour
SPLIT_FRACTION = 0.15  # a second colour must hold this share of a component to count as another object
TEMPLATE_SUPERSAMPLE = 4  # samples per pixel side when drawing shape templates
CLEAR_SHAPE_MARGIN = 0.1  # IoU lead over the runner-up template at which a shape call is fully confident

# Judging.
BLEND_RANGE = (0.25, 0.75)  # share of one colour in a two-colour blend that counts as "mixed"
BLEND_TOLERANCE = 30.0  # RGB distance from the blend line still counted as a blend
# A detection below this confidence is not an object: chosen by probe.shapes.judge_calibration on rendered scenes
# with known truth (figures/judge_min_confidence.csv; `python -m probe.shapes.judge_calibration` recomputes it).
MIN_CONFIDENCE = 0.525
STATUSES = ("present", "wrong_colour", "wrong_shape", "mixed", "missing")
_FILLER_WORDS = frozenset({"a", "an", "the", "and", "one", "with"})

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)


@dataclass(frozen=True, eq=False)
class Detection:
    """One object found in an image.

    ``box`` is (x0, y0, x1, y1) in pixels, end-exclusive. ``confidence`` (0–1) multiplies the
    template fit, how clearly the best shape beats the runner-up, and ``colour_purity`` (the share
    of the object's pixels whose own nearest colour is the object's colour). ``rgb`` is the mean
    colour of the object's interior, which lets the judge see blends of two palette colours.
    """

    shape: str
    colour: str
    mask: np.ndarray
    confidence: float
    box: tuple[int, int, int, int]
    area: int
    colour_purity: float
    rgb: tuple[float, float, float]
    shape_scores: dict[str, float] = field(default_factory=dict)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True, eq=False)
class SubjectStatus:
    """The fate of one prompt subject; ``detection`` is the object behind the status, if any."""

    colour: str
    shape: str
    status: str
    detection: Detection | None = None


def _as_rgb(image: ImageLike) -> np.ndarray:
    """H×W×3 float32 in 0–255; PIL images are converted, float arrays are taken as 0–1."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 image, got shape {array.shape}")
    rgb = array[..., :3].astype(np.float32)
    return rgb * 255 if np.issubdtype(array.dtype, np.floating) else rgb


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the border ring: robust to noise, tints and a stray object edge."""
    height, width = rgb.shape[:2]
    ring = max(1, round(BORDER_FRACTION * min(height, width)))
    border = np.concatenate(
        [
            rgb[:ring].reshape(-1, 3),
            rgb[-ring:].reshape(-1, 3),
            rgb[ring:-ring, :ring].reshape(-1, 3),
            rgb[ring:-ring, -ring:].reshape(-1, 3),
        ]
    )
    return np.median(border, axis=0)


def _colour_fit(rgb: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: alpha of the best ``bg + alpha (colour - bg)`` and its residual."""
    directions = _PALETTE - background  # C×3
    offset = rgb - background  # H×W×3
    projection = offset @ directions.T  # H×W×C
    alpha = np.maximum(projection / (directions**2).sum(axis=1), 0.0)
    squared = (offset**2).sum(axis=-1, keepdims=True) - 2 * alpha * projection + alpha**2 * (directions**2).sum(axis=1)
    return alpha, np.sqrt(np.maximum(squared, 0.0))


def _template_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each shape's template fitted to the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    width, height = float(x1 - x0), float(y1 - y0)
    pad = int(np.ceil(max(width, height) / 2))  # room for templates that overhang the box
    crop = np.pad(mask[y0:y1, x0:x1], pad).astype(np.float32)
    offsets = (np.arange(TEMPLATE_SUPERSAMPLE) + 0.5) / TEMPLATE_SUPERSAMPLE
    ys = ((np.arange(y0 - pad, y1 + pad)[:, None] + offsets).reshape(-1))[:, None]
    xs = ((np.arange(x0 - pad, x1 + pad)[:, None] + offsets).reshape(-1))[None, :]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    mean_half = (width + height) / 4
    major, minor = max(width, height) / 2, min(width, height) / 2
    templates = {
        "circle": Shape("circle", "", cx, cy, mean_half),
        "square": Shape("square", "", cx, cy, mean_half / 0.85),  # world.Shape draws squares at 0.85 size
        "triangle": Shape("triangle", "", cx, cy, mean_half),
        "ellipse": Shape("ellipse", "", cx, cy, (major + minor / ELLIPSE_ASPECT) / 2, vertical=height > width),
    }
    scores = {}
    for name, template in templates.items():
        hit = template.inside(xs, ys).astype(np.float32)
        n_y, n_x = crop.shape
        cover = hit.reshape(n_y, TEMPLATE_SUPERSAMPLE, n_x, TEMPLATE_SUPERSAMPLE).mean(axis=(1, 3))
        scores[name] = float(np.minimum(cover, crop).sum() / np.maximum(cover, crop).sum())
    return scores


def _describe(mask: np.ndarray, colour: int, nearest: np.ndarray, rgb: np.ndarray) -> Detection:
    """Shape, confidence and colour statistics of one object's mask."""
    scores = _template_scores(mask)
    ranked = sorted(scores.values(), reverse=True)
    purity = float((nearest[mask] == colour).mean())
    confidence = ranked[0] * min(1.0, (ranked[0] - ranked[1]) / CLEAR_SHAPE_MARGIN) * purity
    interior = ndimage.binary_erosion(mask)
    rows, cols = np.nonzero(mask)
    return Detection(
        shape=max(scores, key=scores.get),
        colour=_PALETTE_NAMES[colour],
        mask=mask,
        confidence=float(confidence),
        box=(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1),
        area=int(mask.sum()),
        colour_purity=purity,
        rgb=tuple(float(v) for v in rgb[interior if interior.any() else mask].mean(axis=0)),
        shape_scores=scores,
    )


def detect(image: ImageLike) -> list[Detection]:
    """Every object in the image, in reading order (top to bottom, then left to right)."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    min_area = max(1.0, MIN_AREA_FRACTION * height * width)
    alpha, residual = _colour_fit(rgb, background_colour(rgb))
    nearest = residual.argmin(axis=-1)
    foreground = np.take_along_axis(alpha, nearest[..., None], axis=-1)[..., 0] >= FOREGROUND_ALPHA
    smooth = ndimage.uniform_filter(residual, size=(SMOOTH_WINDOW, SMOOTH_WINDOW, 1), mode="nearest")
    components, _ = ndimage.label(foreground)
    detections = []
    for index, window in enumerate(ndimage.find_objects(components), start=1):
        component = components[window] == index
        area = component.sum()
        if area < min_area:
            continue
        votes = np.bincount(smooth[window][component].argmin(axis=-1), minlength=len(_PALETTE))
        colours = np.flatnonzero(votes >= max(min_area, SPLIT_FRACTION * area))
        if colours.size == 0:
            colours = np.array([votes.argmax()])
        choice = smooth[window][..., colours].argmin(axis=-1)
        for k, colour in enumerate(colours):
            pieces, n_pieces = ndimage.label(component & (choice == k))
            sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
            for piece in np.flatnonzero(sizes[1:] >= min_area) + 1:
                mask = np.zeros((height, width), bool)
                mask[window] = ndimage.binary_fill_holes(pieces == piece)
                detections.append(_describe(mask, int(colour), nearest, rgb))
    return sorted(detections, key=lambda d: (d.box[1], d.box[0]))


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """``"a red circle and a blue square"`` → ``[("red", "circle"), ("blue", "square")]``."""
    words = [w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in _FILLER_WORDS]
    known = f"known colours: {', '.join(COLOURS)}; known shapes: {', '.join(SHAPES)}"
    for word in words:
        if word not in COLOURS and word not in SHAPES:
            raise ValueError(f"unknown word {word!r} in prompt {prompt!r}; {known}")
    if len(words) % 2 or any(c not in COLOURS or s not in SHAPES for c, s in zip(words[::2], words[1::2])):
        raise ValueError(f"prompt {prompt!r} is not a list of '<colour> <shape>' subjects; {known}")
    return list(zip(words[::2], words[1::2]))


def _subjects(subjects: str | list[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(subjects, str):
        return parse_prompt(subjects)
    for colour, shape in subjects:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown subject {colour} {shape}; colours {list(COLOURS)}, shapes {list(SHAPES)}")
    return [(c, s) for c, s in subjects]


def _blend_share(rgb: tuple[float, float, float], first: str, second: str) -> float | None:
    """Share of ``first`` if ``rgb`` is a blend of the two colours, closer to it than to any palette colour."""
    a, b, p = (np.asarray(COLOURS[first], float), np.asarray(COLOURS[second], float), np.asarray(rgb, float))
    t = float(np.clip(np.dot(p - b, a - b) / np.dot(a - b, a - b), 0.0, 1.0))  # share of first
    off_line = float(np.linalg.norm(p - (b + t * (a - b))))
    off_palette = float(np.linalg.norm(_PALETTE - p, axis=1).min())
    is_blend = BLEND_RANGE[0] <= t <= BLEND_RANGE[1] and off_line <= BLEND_TOLERANCE and off_line < off_palette
    return t if is_blend else None


def _match(n_subjects: int, detections: list[Detection], fits) -> list[tuple[int, int]]:
    """One-to-one (subject, detection) pairs with ``fits(i, d)``, preferring confident detections."""
    if n_subjects == 0 or not detections:
        return []
    gain = np.array([[(1.0 + d.confidence) * fits(i, d) for d in detections] for i in range(n_subjects)])
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if gain[i, j] > 0]


def confident(detections: list[Detection], min_confidence: float = MIN_CONFIDENCE) -> list[Detection]:
    """The detections that count as objects. One below ``min_confidence`` is dropped outright, not only kept from
    "present": a faint rim or smear is no object, so it must not make a subject mixed, wrong_colour or wrong_shape
    either (the calibration scores this rule; a rim kept for those statuses would read as "mixed")."""
    return [d for d in detections if d.confidence >= min_confidence]


def judge(
    image: ImageLike,
    subjects: str | list[tuple[str, str]],
    detections: list[Detection] | None = None,
    min_confidence: float = MIN_CONFIDENCE,
) -> list[SubjectStatus]:
    """Status of each subject (a prompt or (colour, shape) pairs), in the subjects' order.

    Detections below ``min_confidence`` are no objects (see :func:`confident`); 0 keeps them all.

    Precedence: present > mixed > wrong_colour > wrong_shape > missing. "present" matches are
    one-to-one, so one object cannot satisfy two subjects. A "mixed" object binds attributes of
    two subjects (a blue circle for "a red circle and a blue square", or a red–blue blend), so it
    may explain both of them. "wrong_colour" and "wrong_shape" objects are again one-to-one.
    """
    pairs = _subjects(subjects)
    found = confident(detect(image) if detections is None else detections, min_confidence)
    status: dict[int, SubjectStatus] = {}
    free = list(range(len(found)))

    def settle(name: str, fits, shared: bool = False) -> None:
        open_subjects = [i for i in range(len(pairs)) if i not in status]
        candidates = [found[j] for j in free]
        if shared:
            matches = []
            for i in open_subjects:
                hits = [k for k, d in enumerate(candidates) if fits(i, d)]
                if hits:
                    matches.append((i, max(hits, key=lambda k: candidates[k].confidence)))
        else:
            local = _match(len(open_subjects), candidates, lambda k, d: fits(open_subjects[k], d))
            matches = [(open_subjects[k], j) for k, j in local]
        for i, k in matches:
            status[i] = SubjectStatus(*pairs[i], name, candidates[k])
        for j in sorted({free[k] for _, k in matches}, reverse=True):
            free.remove(j)

    def others(i: int) -> list[tuple[str, str]]:
        return [p for k, p in enumerate(pairs) if k != i]

    def is_mixed(i: int, d: Detection) -> bool:
        colour, shape = pairs[i]
        swapped = any(
            (d.shape == shape and d.colour == c and c != colour) or (d.colour == colour and d.shape == s and s != shape)
            for c, s in others(i)
        )
        return swapped or any(c != colour and _blend_share(d.rgb, colour, c) is not None for c, _ in others(i))

    settle("present", lambda i, d: (d.colour, d.shape) == pairs[i])
    settle("mixed", is_mixed, shared=True)
    settle(
        "wrong_colour",
        lambda i, d: d.shape == pairs[i][1] and d.colour != pairs[i][0] and d.colour not in {c for c, _ in others(i)},
    )
    settle(
        "wrong_shape",
        lambda i, d: d.colour == pairs[i][0] and d.shape != pairs[i][1] and d.shape not in {s for _, s in others(i)},
    )
    return [status.get(i, SubjectStatus(*pairs[i], "missing")) for i in range(len(pairs))]


def summary(statuses: list[SubjectStatus]) -> dict[str, int | bool]:
    """Counts per status (``n_present``, ``n_missing``, ...) and the usual yes/no questions."""
    counts = {f"n_{name}": sum(s.status == name for s in statuses) for name in STATUSES}
    return {
        "n_subjects": len(statuses),
        **counts,
        "all_present": counts["n_present"] == len(statuses),
        "any_missing": counts["n_missing"] > 0,
        "any_mixed": counts["n_mixed"] > 0,
    }


def evaluate_scene(
    image: ImageLike,
    objects: list[Shape],
    detections: list[Detection] | None = None,
    labels: np.ndarray | None = None,
    min_confidence: float = MIN_CONFIDENCE,
) -> list[bool]:
    """Per truth object: found with its colour and shape, and a mask IoU ≥ 0.5 with its truth mask, by a
    detection that :func:`judge` would count (confidence ≥ ``min_confidence``).

    The truth masks are ``labels`` (render()'s label map) or else come from rendering ``objects``
    at the image's size, so ``image`` may be a noisy, blurred or tinted copy of the rendering.
    """
    found = confident(detect(image) if detections is None else detections, min_confidence)
    if labels is None:
        labels = render(objects, size=_as_rgb(image).shape[0])[1]
    correct = []
    for k, obj in enumerate(objects, start=1):
        truth = labels == k
        ious = [(d.mask & truth).sum() / max(1, (d.mask | truth).sum()) for d in found]
        best = int(np.argmax(ious)) if ious else -1
        correct.append(
            best >= 0 and ious[best] >= 0.5 and (found[best].colour, found[best].shape) == (obj.colour, obj.shape)
        )
    return correct


# -- which models the judge fits ------------------------------------------------------------------------------------

def model_world(pipe) -> str:
    """``"shapes"`` for a model of the shapes world (the built-in one, a folder that ``probe train-shapes
    --export`` wrote, with its ``training.json``, or an in-memory one with the world's tokenizer), ``"test"`` for
    the tiny random test models, ``"other"`` for anything else (a user's checkpoint)."""
    from pathlib import Path

    from probe.models import BUILTIN, TINY
    from probe.shapes.model import MAX_TOKENS, tokenizer

    name = str(getattr(pipe, "config", {}).get("_name_or_path") or "")
    if name in TINY:  # every family's tiny random pipelines
        return "test"
    if name == "shapes" or (name and Path(name).expanduser().resolve() == BUILTIN["shapes"].resolve()):
        return "shapes"
    if name and (Path(name).expanduser() / "training.json").is_file():
        return "shapes"
    tok = getattr(pipe, "tokenizer", None)
    if tok is not None and tok.model_max_length == MAX_TOKENS and len(tok) == len(tokenizer()):
        return "shapes"
    return "other"


def require_shapes_world(pipe, study_judge, study: str) -> None:
    """Refuse the exact judge on a model that does not draw the shapes world: it reads flat coloured shapes on a
    light background, so on anything else its verdicts (missing, mixed …) would be meaningless yet look like
    results. The tiny random test models get a warning instead (they exercise the code, not the judge). Any other
    judge passes."""
    import warnings

    if study_judge is not judge and type(study_judge).__name__ != "ExactJudge":
        return
    world = model_world(pipe)
    name = str(getattr(pipe, "config", {}).get("_name_or_path") or type(pipe).__name__)
    fix = "give a judge for real images: --judge clip:DIR or --judge detector:DIR (a local CLIP / OWL-ViT folder)"
    if world == "other":
        raise ValueError(f"the {study} study's judge is the shapes world's exact judge, but the model {name!r} is "
                         f"not a shapes-world model, so its verdicts would mean nothing; {fix}, or "
                         "judge=probe.judges.judge_from_spec('clip:DIR') in Python")
    if world == "test":
        warnings.warn(f"the {study} study judges {name!r}, a random test model, with the shapes world's exact "
                      f"judge: its verdicts only exercise the code, they measure nothing; {fix}", UserWarning,
                      stacklevel=3)
