"""Judges: which of a prompt's subjects an image shows.

- :class:`ExactJudge` — the built-in shapes world's exact judge (``probe.shapes.judge``): per subject present,
  missing, wrong colour, wrong shape or mixed, with no model at all.
- :class:`GenevalJudge` — GenEval's protocol: a Mask2Former instance segmenter finds each subject's class above a
  score of 0.3, and CLIP reads the colour on the most confident instance's mask.
- :class:`VqaJudge` — VQAScore / TIFA: a vision-language model's P("yes") to "Is there a {object}?" and
  "Is there a {attribute} {object}?".
- :class:`ClipJudge` — for real checkpoints, Attend-and-Excite's minimum-object similarity: for each subject the CLIP
  cosine similarity between the image and "a photo of a {subject}", and its minimum over the subjects (the most
  neglected subject decides). Presence only.
- :class:`DetectorJudge` — an open-vocabulary detector (OWL-ViT / OWLv2): per subject the best box's score, present
  when it reaches a threshold. Presence only.

Every judge but the exact one says one of :data:`JUDGE_STATUSES` per subject, by an object-level rule:

- ``present``: the subject's object is there with the prompt's attribute (or it has no attribute the judge reads);
- ``mixed``: the subject's object is there, but with another attribute than the prompt gives it (a blue circle for
  "a red circle"): the attribute is bound to the wrong value, whether the prompt gives that value to another subject
  (the exact judge's ``mixed``) or not (its ``wrong_colour``);
- ``missing``: the subject's object is not found.

The CLIP and detector judges cannot see attributes ("a photo of a {noun}"), so they never say ``mixed``: a
subject is present or missing. In the exact judge's terms (:func:`probe.judge_agreement.common_status`):
present → present, mixed and wrong_colour → mixed, wrong_shape and missing → missing. One case reads differently:
the exact judge calls a subject whose shape is absent ``mixed`` when its colour sits on another subject's shape (a
red square alone for "a red circle and a blue square"); an object-level judge calls that subject missing.

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

from probe.prompts import attributes_of, subjects_of

if TYPE_CHECKING:  # the shapes world loads only when its judge is used
    from probe.shapes import judge as shapes_judge

CLIP_MODEL = "openai/clip-vit-base-patch16"  # the CLIP that Attend-and-Excite reports similarities with
DETECTOR_MODEL = "google/owlv2-base-patch16-ensemble"
CLIP_TEMPLATE = "a photo of a {}"
DETECTOR_TEMPLATE = "a photo of a {}"
DETECTION_THRESHOLD = 0.1  # OWL-ViT's usual score threshold for a detection
CLIP_PRESENT = 0.22  # CLIP ViT-B/16 image–text cosine above which a subject counts as shown (set per model)
PIXEL_MAX = 255
JUDGE_STATUSES = ("present", "mixed", "missing")  # what every judge but the exact one says per subject

# GenEval (Ghosh et al. 2023, evaluation/evaluate_images.py): its detector, score threshold, CLIP, colour names,
# colour prompts and the grey that replaces everything outside an instance's mask before CLIP reads its colour.
GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
GENEVAL_CLIP = "openai/clip-vit-large-patch14"
GENEVAL_THRESHOLD = 0.3  # an instance counts when its score is above this
GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_COLOUR_TEMPLATES = ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}",
                            "a photo of a {colour} object")
GENEVAL_BACKGROUND = (153, 153, 153)  # "#999"

VQA_MODEL = "Salesforce/blip-vqa-capfilt-large"
VQA_THRESHOLD = 0.5  # P("yes") at which an answer counts as yes


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


def _phrases(prompt_or_subjects: str | Sequence) -> list[tuple[str, str]]:
    """(attribute, noun) per subject: a prompt gives its adjectives and nouns ("a red circle" → ("red", "circle");
    a framing phrase up to "of" is no attribute: "a photo of a red cat" → ("red", "cat")), a list of nouns has no
    attributes, a list of (attribute, noun) pairs is taken as it is."""
    if isinstance(prompt_or_subjects, str):
        attributes = [words.split() for words in attributes_of(prompt_or_subjects)]
        attributes = [" ".join(w[len(w) - w[::-1].index("of"):] if "of" in w else w) for w in attributes]
        return list(zip(attributes, subjects_of(prompt_or_subjects)))
    return [(str(item[0]), str(item[1])) if isinstance(item, (tuple, list)) else ("", str(item))
            for item in prompt_or_subjects]


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
    """CLIP minimum-object similarity, as Attend-and-Excite measures entity missing on real checkpoints.

    Presence only: it compares the image with "a photo of a {noun}", so it cannot see an attribute, and its verdicts
    are present or missing, never mixed (CLIP is a bag of words: a red circle and a blue square scores alike with a
    blue circle and a red square)."""

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
        """One image's subjects as present / missing by their similarity against ``threshold`` (a study's judge);
        never mixed (presence only)."""
        scores = self.similarities(image, subjects)[0]
        return [Verdict(word, "present" if score >= threshold else "missing", float(score), (0.0, 0.0, 1.0, 1.0))
                for word, score in zip(_subjects(subjects), scores)]


# -- open-vocabulary detector -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One subject in one image: ``status`` (one of :data:`JUDGE_STATUSES`), the judge's ``score`` for the object
    (a similarity, a detection score or P(yes)) and ``box`` (x0, y0, x1, y1) as fractions of the image (of the
    detector's square-padded input, for OWLv2; the whole image where the judge has no box). ``attribute`` is what the
    judge read of the attribute (GenEval: the colour CLIP chose; VQA: the attribute when P(yes) reached the
    threshold) and ``attribute_score`` its score (VQA: P(yes) of the attribute question); empty / NaN otherwise."""

    subject: str
    status: str
    score: float
    box: tuple[float, float, float, float]
    attribute: str = ""
    attribute_score: float = math.nan


class DetectorJudge:
    """Open-vocabulary detection of each subject (OWL-ViT, OWLv2): present when its best score ≥ ``threshold``.

    Presence only: it queries "a photo of a {noun}", and open-vocabulary detectors are not reliable on attributes,
    so its verdicts are present or missing, never mixed."""

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


# -- GenEval's protocol -----------------------------------------------------------------------------------------------


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels, end-exclusive: the extent of a boolean mask ((0, 0, 0, 0) when it is empty)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0, 0, 0, 0
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@dataclass(frozen=True, eq=False)
class Instance:
    """One instance a segmenter found: its class ``label`` (lower case), ``score`` (0–1) and boolean ``mask`` (H×W,
    the image's size)."""

    label: str
    score: float
    mask: np.ndarray


def masked_crop(image, mask: np.ndarray, background: tuple[int, int, int] = GENEVAL_BACKGROUND):
    """An instance as GenEval shows it to CLIP: the image inside ``mask``, grey (#999) outside, cropped to the
    mask's box (GenEval's box is its Mask2Former's, itself the mask's extent)."""
    from PIL import Image

    pil = _images(image)
    if len(pil) != 1:
        raise ValueError(f"expected one image, got {len(pil)}")
    array = np.array(pil[0].convert("RGB"))
    mask = np.asarray(mask, bool)
    if mask.shape != array.shape[:2]:
        raise ValueError(f"the mask's shape {mask.shape} is not the image's {array.shape[:2]}")
    if not mask.any():
        raise ValueError("the instance's mask is empty: there is no object to read a colour on")
    array[~mask] = background
    x0, y0, x1, y1 = _mask_box(mask)
    return Image.fromarray(array[y0:y1, x0:x1])


def geneval_verdicts(image, instances: Sequence[Instance], subjects: str | Sequence, colour_scores,
                     threshold: float = GENEVAL_THRESHOLD, colours: Sequence[str] = GENEVAL_COLOURS) -> list[Verdict]:
    """GenEval's rule, per subject (``subjects``: a prompt, nouns, or (attribute, noun) pairs):

    - the subject's instances are those of its class whose score is above ``threshold`` (GenEval: > 0.3);
      none → ``missing``;
    - the most confident of them decides the colour (GenEval reads colour on the top-ranked instances only, so two
      subjects of one class both read the same instance):
      ``colour_scores(crop, noun)`` scores each of ``colours`` on :func:`masked_crop` of its mask, and the highest
      wins; the subject's colour is the word of its attribute that is one of ``colours``;
    - the colour read is the subject's → ``present``; another → ``mixed``; a subject whose attribute names no colour
      of ``colours`` is judged on presence alone (``present``).

    A verdict's ``score`` and ``box`` are the best instance's of the class (the best below the threshold for a
    missing subject; 0 and an empty box where the class was not found at all); ``attribute`` the colour read."""
    verdicts = []
    for attribute, noun in _phrases(subjects):
        own = sorted((d for d in instances if d.label == noun.lower()), key=lambda d: d.score, reverse=True)
        best = own[0] if own else None
        box = (0.0, 0.0, 0.0, 0.0)
        if best is not None:
            height, width = best.mask.shape
            x0, y0, x1, y1 = _mask_box(best.mask)
            box = (x0 / width, y0 / height, x1 / width, y1 / height)
        score = best.score if best is not None else 0.0
        if best is None or not best.score > threshold:
            verdicts.append(Verdict(noun, "missing", score, box))
            continue
        wanted = [w for w in attribute.split() if w in colours]
        if not wanted:
            verdicts.append(Verdict(noun, "present", score, box))
            continue
        scores = np.asarray(colour_scores(masked_crop(image, best.mask), noun), float)
        if scores.shape != (len(colours),):
            raise ValueError(f"colour_scores gave {scores.shape[0] if scores.ndim else 'no'} scores, expected one per "
                             f"colour ({len(colours)})")
        colour = colours[int(scores.argmax())]
        verdicts.append(Verdict(noun, "present" if colour in wanted else "mixed", score, box, colour))
    return verdicts


class GenevalJudge:
    """GenEval's protocol through ``transformers``: Mask2Former instances (``Mask2FormerForUniversalSegmentation``
    and its image processor) above a score of 0.3, and the colour of the most confident instance read by CLIP over
    GenEval's ten colour names (:func:`geneval_verdicts` states the rule).

    ``detector``: the segmenter (default :data:`GENEVAL_DETECTOR`, COCO's 80 classes; a subject must be one of its
    classes); ``clip``: the CLIP that reads colours (default :data:`GENEVAL_CLIP`, GenEval's ViT-L/14). An instance's
    score is the processor's (class probability × mean mask probability, as in mmdetection's Mask2Former)."""

    def __init__(self, detector=GENEVAL_DETECTOR, clip=GENEVAL_CLIP, *, detector_processor=None, clip_processor=None,
                 device=None, threshold: float = GENEVAL_THRESHOLD, colours: Sequence[str] = GENEVAL_COLOURS,
                 templates: Sequence[str] = GENEVAL_COLOUR_TEMPLATES):
        from transformers import AutoModel, AutoModelForUniversalSegmentation

        self.detector, self.detector_processor = _load(detector, detector_processor, AutoModelForUniversalSegmentation)
        self.clip, self.clip_processor = _load(clip, clip_processor, AutoModel)
        self.device = _device(device)
        self.detector.to(self.device).eval()
        self.clip.to(self.device).eval()
        self.threshold, self.colours, self.templates = threshold, tuple(colours), tuple(templates)
        self.labels = {int(i): str(name).lower() for i, name in self.detector.config.id2label.items()}

    @torch.no_grad()
    def instances(self, image) -> list[Instance]:
        """Every instance the segmenter finds in one image, whatever its score, with masks at the image's size."""
        pil = _images(image)
        if len(pil) != 1:
            raise ValueError(f"expected one image, got {len(pil)}")
        inputs = self.detector_processor(images=pil, return_tensors="pt")
        out = self.detector(**{k: v.to(self.device) for k, v in inputs.items()})
        out = type(out)(class_queries_logits=out.class_queries_logits.float().cpu(),  # the post-processing's maps
                        masks_queries_logits=out.masks_queries_logits.float().cpu())  # are made on the CPU
        found = self.detector_processor.post_process_instance_segmentation(
            out, threshold=0.0, target_sizes=[(pil[0].height, pil[0].width)], return_binary_maps=True)[0]
        if found["segmentation"] is None:
            return []
        masks = found["segmentation"].bool().cpu().numpy()
        return [Instance(self.labels[info["label_id"]], float(info["score"]), masks[k])
                for k, info in enumerate(found["segments_info"])]

    @torch.no_grad()
    def colour_scores(self, crop, noun: str) -> np.ndarray:
        """CLIP's cosine similarity of ``crop`` with each colour: the colour's prompts
        (:data:`GENEVAL_COLOUR_TEMPLATES`) embedded, normalised, averaged and normalised again (a zero-shot
        classifier, as clip_benchmark builds it)."""
        texts = [t.format(colour=c, object=noun) for c in self.colours for t in self.templates]
        inputs = self.clip_processor(text=texts, images=_images(crop), return_tensors="pt", padding=True)
        out = self.clip(**{k: v.to(self.device) for k, v in inputs.items()})
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        per_colour = text.view(len(self.colours), len(self.templates), -1).mean(1)
        classifier = torch.nn.functional.normalize(per_colour, dim=-1)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        return (image @ classifier.T)[0].cpu().numpy()

    def classes(self, subjects: str | Sequence) -> list[tuple[str, str]]:
        """(attribute, class) per subject: the longest of the segmenter's class names that ends its phrase ("a red
        dining table" → ("red", "dining table"), "a hot dog" → ("", "hot dog")); a subject of no class is refused."""
        names = set(self.labels.values())
        pairs = []
        for attribute, noun in _phrases(subjects):
            words = [*attribute.lower().split(), noun.lower()]
            ends = [k for k in range(len(words)) if " ".join(words[k:]) in names]
            if not ends:
                listed = sorted(names)
                raise ValueError(f"the GenEval judge's segmenter has no class {noun!r}; its classes are "
                                 f"{', '.join(listed[:20])}{' …' if len(listed) > 20 else ''}: give prompts about "
                                 "them, or another judge (vqa, clip, detector) for open-vocabulary subjects")
            pairs.append((" ".join(words[:ends[0]]), " ".join(words[ends[0]:])))
        return pairs

    def __call__(self, image, subjects: str | Sequence) -> list[Verdict]:
        """One image's verdicts, per subject present / mixed / missing (:func:`geneval_verdicts`) on the subjects'
        classes (:meth:`classes`)."""
        return geneval_verdicts(image, self.instances(image), self.classes(subjects), self.colour_scores,
                                self.threshold, self.colours)


def _geneval_models(model: str) -> tuple[str, str]:
    """(segmenter, CLIP) from a spec's MODEL: "" for GenEval's, ``DETECTOR,CLIP``, or a folder holding both as
    ``detector/`` and ``clip/`` (any other single name is the segmenter, with GenEval's CLIP)."""
    if not model:
        return GENEVAL_DETECTOR, GENEVAL_CLIP
    if "," in model:
        detector, _, clip = model.partition(",")
        return detector.strip() or GENEVAL_DETECTOR, clip.strip() or GENEVAL_CLIP
    folder = Path(model).expanduser()
    if (folder / "detector").is_dir() and (folder / "clip").is_dir():
        return str(folder / "detector"), str(folder / "clip")
    return model, GENEVAL_CLIP


# -- VQA: P("yes") in the VQAScore / TIFA manner ----------------------------------------------------------------------


def question(noun: str, attribute: str = "") -> str:
    """``question("circle", "red")`` → "Is there a red circle?"; "an" before a vowel ("Is there an ellipse?")."""
    phrase = f"{attribute} {noun}".strip()
    return f"Is there {'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}?"


def questions(subjects: str | Sequence) -> list[tuple[str, str | None]]:
    """Per subject, its object question and its attribute question (None where it has no attribute):
    "a red circle and a square" → [("Is there a circle?", "Is there a red circle?"), ("Is there a square?", None)]."""
    return [(question(noun), question(noun, attribute) if attribute else None) for attribute, noun in
            _phrases(subjects)]


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P("yes") from answer-token logits (…, vocabulary): the softmax over the two tokens "yes" and "no" alone,
    e^yes / (e^yes + e^no), so the rest of the vocabulary plays no part (VQAScore's yes-probability, restricted to
    the two answers a yes/no question has)."""
    pair = torch.stack([logits[..., yes_id], logits[..., no_id]], dim=-1).float()
    return pair.softmax(dim=-1)[..., 0]


def vqa_verdicts(subjects: str | Sequence, object_yes: Sequence[float], attribute_yes: Sequence[float],
                 threshold: float = VQA_THRESHOLD) -> list[Verdict]:
    """The VQA rule, per subject: ``missing`` when P(yes | "Is there a {object}?") < ``threshold``; else ``present``
    when the subject has no attribute or P(yes | "Is there a {attribute} {object}?") ≥ ``threshold``, and ``mixed``
    when the object is there but the attribute question is answered no. ``attribute_yes`` holds NaN for subjects
    without an attribute."""
    phrases = _phrases(subjects)
    if not len(phrases) == len(object_yes) == len(attribute_yes):
        raise ValueError(f"{len(phrases)} subjects but {len(object_yes)} object and {len(attribute_yes)} attribute "
                         "probabilities")
    verdicts = []
    for (attribute, noun), p_object, p_attribute in zip(phrases, object_yes, attribute_yes):
        if p_object < threshold:
            status = "missing"
        else:
            status = "present" if not attribute or p_attribute >= threshold else "mixed"
        seen = attribute if attribute and p_attribute >= threshold else ""
        verdicts.append(Verdict(noun, status, float(p_object), (0.0, 0.0, 1.0, 1.0), seen, float(p_attribute)))
    return verdicts


class VqaJudge:
    """A visual question answering model asked "Is there a {object}?" and "Is there a {attribute} {object}?" per
    subject (:func:`questions`), answered by P("yes") (:func:`yes_probability` of the first answer token's logits);
    :func:`vqa_verdicts` states the rule. The model is a BLIP VQA model (``BlipForQuestionAnswering``, default
    :data:`VQA_MODEL`): its answer decoder's first-token logits after the decoder's start token."""

    def __init__(self, model=VQA_MODEL, processor=None, *, device=None, threshold: float = VQA_THRESHOLD):
        from transformers import AutoModelForVisualQuestionAnswering

        self.model, self.processor = _load(model, processor, AutoModelForVisualQuestionAnswering)
        if not all(hasattr(self.model, part) for part in ("vision_model", "text_encoder", "text_decoder")):
            raise ValueError(f"the VQA judge reads a BLIP question-answering model's answer decoder "
                             f"(BlipForQuestionAnswering); {type(self.model).__name__} is not one")
        self.device = _device(device)
        self.model.to(self.device).eval()
        self.threshold = threshold
        tokenizer = self.processor.tokenizer
        self.yes_id, self.no_id = (self._token(tokenizer, word) for word in ("yes", "no"))

    @staticmethod
    def _token(tokenizer, word: str) -> int:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"the VQA model's tokenizer does not spell {word!r} as one known token ({ids}); "
                             "P(yes) needs one answer token each for 'yes' and 'no'")
        return int(ids[0])

    @torch.no_grad()
    def answer_logits(self, image, asked: Sequence[str]) -> torch.Tensor:
        """(questions, vocabulary): the logits of the first answer token for each question about one image."""
        pil = _images(image)
        if len(pil) != 1:
            raise ValueError(f"expected one image, got {len(pil)}")
        inputs = self.processor(images=pil, text=list(asked), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        seen = self.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        seen = seen.expand(len(asked), -1, -1)
        image_mask = torch.ones(seen.shape[:-1], dtype=torch.long, device=self.device)
        asked_states = self.model.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                               encoder_hidden_states=seen, encoder_attention_mask=image_mask)[0]
        start = torch.full((len(asked), 1), self.model.decoder_start_token_id, device=self.device)
        out = self.model.text_decoder(input_ids=start, encoder_hidden_states=asked_states,
                                      encoder_attention_mask=inputs["attention_mask"])
        return out.logits[:, -1].float()

    def yes_probabilities(self, image, asked: Sequence[str]) -> np.ndarray:
        """P("yes") per question about one image."""
        return yes_probability(self.answer_logits(image, asked), self.yes_id, self.no_id).cpu().numpy()

    def __call__(self, image, subjects: str | Sequence) -> list[Verdict]:
        """One image's verdicts, per subject present / mixed / missing (:func:`vqa_verdicts`)."""
        pairs = questions(subjects)
        asked = [q for pair in pairs for q in pair if q is not None]
        answered = dict(zip(asked, self.yes_probabilities(image, asked)))
        return vqa_verdicts(subjects, [answered[o] for o, _ in pairs],
                            [math.nan if a is None else answered[a] for _, a in pairs], self.threshold)


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


JUDGE_SPEC = ("exact, clip[:MODEL][@THRESHOLD], detector[:MODEL][@THRESHOLD], geneval[:MODEL][@THRESHOLD] or "
              "vqa[:MODEL][@THRESHOLD]")
# what a threshold is on each judge's scale: its range, its name, an example
THRESHOLDS = {"clip": ((-1.0, 1.0), "a CLIP cosine similarity", CLIP_PRESENT),
              "detector": ((0.0, 1.0), "a detection score", DETECTION_THRESHOLD),
              "geneval": ((0.0, 1.0), "an instance score", GENEVAL_THRESHOLD),
              "vqa": ((0.0, 1.0), 'a probability of "yes"', VQA_THRESHOLD)}


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed ``--judge`` value: ``kind`` (exact, geneval, vqa, clip, detector), ``model`` ("" for the default) and
    ``threshold`` (None for the default)."""

    kind: str
    model: str
    threshold: float | None


def parse_judge_spec(spec: str) -> JudgeSpec:
    """``exact``, ``geneval[:MODEL][@THRESHOLD]``, ``vqa[:MODEL][@THRESHOLD]``, ``clip[:MODEL][@THRESHOLD]`` or
    ``detector[:MODEL][@THRESHOLD]`` (``owl`` for detector), checked before any model loads: a threshold that is not
    a number, or one outside the judge's scale, is refused, and so is a threshold for the exact judge, which has none
    (its verdicts come from the shapes world's exact rules)."""
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
    if kind not in THRESHOLDS:
        raise ValueError(f"unknown judge {spec!r}; give {JUDGE_SPEC}")
    if ":" in spec.partition("@")[0] and not model:
        raise ValueError(f"judge {spec!r} names no model after ':'; give {kind}:MODEL (a local folder or hub id) or "
                         f"leave ':' out for the default")
    cut = None
    if at:
        (low, high), scale, example = THRESHOLDS[kind]
        try:
            cut = float(threshold)
        except ValueError:
            cut = math.nan
        if not low <= cut <= high:
            raise ValueError(f"judge {spec!r}: the threshold after '@' must be a number from {low:g} to {high:g} "
                             f"({scale}), got {threshold!r}; e.g. {kind}@{example}")
    return JudgeSpec(kind, model, cut)


def judge_from_spec(spec: str, device=None):
    """A study's judge from ``exact`` (the shapes world), ``geneval[:MODEL][@T]``, ``vqa[:MODEL][@T]``,
    ``clip[:MODEL][@T]`` or ``detector[:MODEL][@T]`` (MODEL: a hub id or a local folder; for geneval also
    ``DETECTOR,CLIP`` or a folder holding ``detector/`` and ``clip/``; defaults :data:`GENEVAL_DETECTOR` with
    :data:`GENEVAL_CLIP`, :data:`VQA_MODEL`, :data:`CLIP_MODEL`, :data:`DETECTOR_MODEL`); the spec is checked
    (:func:`parse_judge_spec`) before a model loads."""
    parsed = parse_judge_spec(spec)
    if parsed.kind == "exact":
        from probe.shapes.judge import judge

        return judge
    cut = THRESHOLDS[parsed.kind][2] if parsed.threshold is None else parsed.threshold
    if parsed.kind == "clip":
        clip = ClipJudge(parsed.model or CLIP_MODEL, device=device)
        return NamedJudge(spec, lambda image, prompt: clip.verdicts(image, prompt, cut))
    if parsed.kind == "geneval":
        detector, clip = _geneval_models(parsed.model)
        return NamedJudge(spec, GenevalJudge(detector, clip, device=device, threshold=cut))
    if parsed.kind == "vqa":
        return NamedJudge(spec, VqaJudge(parsed.model or VQA_MODEL, device=device, threshold=cut))
    return NamedJudge(spec, DetectorJudge(parsed.model or DETECTOR_MODEL, device=device, threshold=cut))
