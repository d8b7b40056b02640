"""Judges: which of a prompt's subjects an image shows.

- :class:`ExactJudge` — the built-in shapes world's exact judge (``probe.shapes.judge``): per subject present,
  missing, wrong colour, wrong shape or mixed, with no model at all.
- :class:`ClipJudge` — for real checkpoints, Attend-and-Excite's minimum-object similarity: for each subject the CLIP
  cosine similarity between the image and "a photo of a {subject}", and its minimum over the subjects (the most
  neglected subject decides).
- :class:`DetectorJudge` — an open-vocabulary detector (OWL-ViT / OWLv2): per subject the best box's score, present
  when it reaches a threshold.

Models load by hub id or local folder (a local folder works offline), or are passed in as objects with their
processor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from probe.prompts import subjects_of

if TYPE_CHECKING:  # the shapes world loads only when its judge is used
    from probe.shapes import judge as shapes_judge

CLIP_MODEL = "openai/clip-vit-base-patch16"  # the CLIP that Attend-and-Excite reports similarities with
DETECTOR_MODEL = "google/owlv2-base-patch16-ensemble"
CLIP_TEMPLATE = "a photo of a {}"
DETECTOR_TEMPLATE = "a photo of a {}"
DETECTION_THRESHOLD = 0.1  # OWL-ViT's usual score threshold for a detection
CLIP_PRESENT = 0.22  # CLIP ViT-B/16 image–text cosine above which a subject counts as shown (set per model)
PIXEL_MAX = 255


def _images(images) -> list:
    """A list of PIL images from one image or many: PIL, H×W×3 or N×H×W×3 arrays/tensors (uint8, or floats in 0–1)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _images(item)]
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 4:
        return [im for item in array for im in _images(item)]
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected H×W×3 images (or a batch of them), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.round(array * PIXEL_MAX), 0, PIXEL_MAX)
    return [Image.fromarray(array[..., :3].astype(np.uint8))]


def _subjects(prompt_or_subjects: str | Sequence[str]) -> list[str]:
    return subjects_of(prompt_or_subjects) if isinstance(prompt_or_subjects, str) else list(prompt_or_subjects)


def _load(model, processor, auto_model):
    """(model, processor) from objects, a local folder or a hub id, with errors that say what to do offline."""
    if not isinstance(model, (str, Path)):
        if processor is None:
            raise ValueError("pass the model's processor too when you pass a model object")
        return model, processor
    from transformers import AutoProcessor

    path = Path(model).expanduser()
    local = path.is_absolute() or str(model).startswith((".", "~")) or path.exists() or str(model).count("/") != 1
    if local and not path.is_dir():
        raise FileNotFoundError(f"judge model folder {str(model)!r} does not exist; give a local folder or a hub id")
    source = str(path if local else model)
    try:
        return auto_model.from_pretrained(source), processor or AutoProcessor.from_pretrained(source)
    except OSError as err:
        raise OSError(f"could not load judge model {model!r} ({err}). Without a network connection, download it "
                      "elsewhere (model and processor) and pass its local folder.") from err


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the exact judge -------------------------------------------------------------------------------------------------


class ExactJudge:
    """The shapes world's exact judge: ``judge(image, "a red circle and a blue square")`` → one status per subject."""

    @property
    def statuses(self) -> tuple[str, ...]:
        """The statuses a verdict can take (the shapes judge's, loaded when first used)."""
        from probe.shapes.judge import STATUSES

        return STATUSES

    def __call__(self, image, prompt: str | list[tuple[str, str]]) -> list[shapes_judge.SubjectStatus]:
        from probe.shapes.judge import judge

        return judge(image, prompt)

    def summary(self, image, prompt: str | list[tuple[str, str]]) -> dict[str, int | bool]:
        """Counts per status and ``all_present`` / ``any_missing`` / ``any_mixed``."""
        from probe.shapes.judge import summary

        return summary(self(image, prompt))


# -- CLIP -------------------------------------------------------------------------------------------------------------


class ClipJudge:
    """CLIP minimum-object similarity, as Attend-and-Excite measures entity missing on real checkpoints."""

    def __init__(self, model=CLIP_MODEL, processor=None, *, device=None, template: str = CLIP_TEMPLATE):
        from transformers import AutoModel

        self.model, self.processor = _load(model, processor, AutoModel)
        self.device = _device(device)
        self.model.to(self.device).eval()
        self.template = template

    @torch.no_grad()
    def similarities(self, images, subjects: str | Sequence[str]) -> np.ndarray:
        """(images, subjects) cosine similarity in [−1, 1] between each image and "a photo of a {subject}"."""
        words = _subjects(subjects)
        texts = [self.template.format(w) for w in words]
        inputs = self.processor(text=texts, images=_images(images), return_tensors="pt", padding=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image @ text.T).cpu().numpy()

    def __call__(self, images, subjects: str | Sequence[str]) -> np.ndarray:
        """Per image, the minimum over subjects of the similarity (a prompt gives its "a X and a Y" nouns)."""
        return self.similarities(images, subjects).min(axis=1)

    def verdicts(self, image, subjects: str | Sequence[str], threshold: float = CLIP_PRESENT) -> list[Verdict]:
        """One image's subjects as present / missing by their similarity against ``threshold`` (a study's judge)."""
        scores = self.similarities(image, subjects)[0]
        return [Verdict(word, "present" if score >= threshold else "missing", float(score), (0.0, 0.0, 1.0, 1.0))
                for word, score in zip(_subjects(subjects), scores)]


# -- open-vocabulary detector -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One subject in one image: ``status`` present/missing, the best box's ``score`` (0–1) and ``box``
    (x0, y0, x1, y1) as fractions of the detector's (square-padded, for OWLv2) input."""

    subject: str
    status: str
    score: float
    box: tuple[float, float, float, float]


class DetectorJudge:
    """Open-vocabulary detection of each subject (OWL-ViT, OWLv2): present when its best score ≥ ``threshold``."""

    def __init__(self, model=DETECTOR_MODEL, processor=None, *, device=None, threshold: float = DETECTION_THRESHOLD,
                 template: str = DETECTOR_TEMPLATE):
        from transformers import AutoModelForZeroShotObjectDetection

        self.model, self.processor = _load(model, processor, AutoModelForZeroShotObjectDetection)
        self.device = _device(device)
        self.model.to(self.device).eval()
        self.threshold, self.template = threshold, template

    @torch.no_grad()
    def detect(self, images, subjects: str | Sequence[str]) -> list[list[Verdict]]:
        """Per image, per subject: the best-scoring box for "a photo of a {subject}"."""
        words = _subjects(subjects)
        pil = _images(images)
        texts = [[self.template.format(w) for w in words]] * len(pil)
        inputs = self.processor(text=texts, images=pil, return_tensors="pt")
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        scores = out.logits.float().sigmoid()  # (images, boxes, subjects)
        best, where = scores.max(dim=1)
        boxes = out.pred_boxes.float()  # (images, boxes, 4) centre x, centre y, width, height in 0–1
        verdicts = []
        for i in range(len(pil)):
            row = []
            for s, word in enumerate(words):
                cx, cy, w, h = boxes[i, where[i, s]].tolist()
                score = float(best[i, s])
                status = "present" if score >= self.threshold else "missing"
                row.append(Verdict(word, status, score, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
            verdicts.append(row)
        return verdicts

    def __call__(self, image, subjects: str | Sequence[str]) -> list[Verdict]:
        """The verdicts for one image."""
        pil = _images(image)
        if len(pil) != 1:
            raise ValueError(f"expected one image, got {len(pil)}; use detect() for several")
        return self.detect(pil, subjects)[0]


# -- a judge from the command line -----------------------------------------------------------------------------------


class NamedJudge:
    """``judge(image, prompt)`` → one verdict per subject, with a name that stays the same between runs (a study
    keys its resumable rows on it)."""

    def __init__(self, spec: str, fn):
        self.spec, self.fn = spec, fn

    def __call__(self, image, prompt: str) -> list:
        return self.fn(image, prompt)

    def __repr__(self) -> str:
        return f"judge({self.spec})"


JUDGE_SPEC = "exact, clip[:MODEL][@THRESHOLD] or detector[:MODEL][@THRESHOLD]"
THRESHOLD_RANGES = {"clip": (-1.0, 1.0), "detector": (0.0, 1.0)}  # a cosine similarity; a detection score


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed ``--judge`` value: ``kind`` (exact, clip, detector), ``model`` ("" for the default) and
    ``threshold`` (None for the default)."""

    kind: str
    model: str
    threshold: float | None


def parse_judge_spec(spec: str) -> JudgeSpec:
    """``exact``, ``clip[:MODEL][@THRESHOLD]`` or ``detector[:MODEL][@THRESHOLD]`` (``owl`` for detector), checked
    before any model loads: a threshold that is not a number, or one outside the judge's scale, is refused, and so is
    a threshold for the exact judge, which has none (its verdicts come from the shapes world's exact rules)."""
    kind, _, rest = spec.partition(":")
    model, at, threshold = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if "@" in kind:
        kind, at, threshold = kind.partition("@")
    kind = "detector" if kind == "owl" else kind
    if kind == "exact":
        if rest or at:
            raise ValueError(f"judge {spec!r}: the exact judge takes no model and no threshold (it applies the shapes "
                             "world's exact rules); give --judge exact, or clip@T / detector@T for a threshold")
        return JudgeSpec("exact", "", None)
    if kind not in THRESHOLD_RANGES:
        raise ValueError(f"unknown judge {spec!r}; give {JUDGE_SPEC}")
    if ":" in spec.partition("@")[0] and not model:
        raise ValueError(f"judge {spec!r} names no model after ':'; give {kind}:MODEL (a local folder or hub id) or "
                         f"leave ':' out for the default")
    cut = None
    if at:
        low, high = THRESHOLD_RANGES[kind]
        try:
            cut = float(threshold)
        except ValueError:
            cut = math.nan
        if not low <= cut <= high:
            raise ValueError(f"judge {spec!r}: the threshold after '@' must be a number from {low:g} to {high:g} "
                             f"({'a CLIP cosine similarity' if kind == 'clip' else 'a detection score'}), got "
                             f"{threshold!r}; e.g. {kind}@{CLIP_PRESENT if kind == 'clip' else DETECTION_THRESHOLD}")
    return JudgeSpec(kind, model, cut)


def judge_from_spec(spec: str, device=None):
    """A study's judge from ``exact`` (the shapes world), ``clip[:MODEL][@THRESHOLD]`` or ``detector[:MODEL][@T]``
    (MODEL: a hub id or a local folder; defaults :data:`CLIP_MODEL`, :data:`DETECTOR_MODEL`); the spec is checked
    (:func:`parse_judge_spec`) before a model loads."""
    parsed = parse_judge_spec(spec)
    if parsed.kind == "exact":
        from probe.shapes.judge import judge

        return judge
    if parsed.kind == "clip":
        clip = ClipJudge(parsed.model or CLIP_MODEL, device=device)
        cut = CLIP_PRESENT if parsed.threshold is None else parsed.threshold
        return NamedJudge(spec, lambda image, prompt: clip.verdicts(image, prompt, cut))
    detector = DetectorJudge(parsed.model or DETECTOR_MODEL, device=device,
                             threshold=DETECTION_THRESHOLD if parsed.threshold is None else parsed.threshold)
    return NamedJudge(spec, detector)
