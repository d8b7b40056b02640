"""Prompts and the tokens of their subjects.

Prompt sets come as ``datasets.Dataset`` with the columns ``prompt``, ``subjects`` (the nouns guidance and the
judges act on), ``attributes`` (each subject's adjective, "" if none) and ``set``: Attend-and-Excite's animal–animal,
animal–object and object–object sets, the Self-Cross paper's similar-subject sets SSD-2 / SSD-3 (all read from
``data/prompts/ssd_prompts.json``) and the built-in shapes world's two-object, three-object and similar-subject
prompts (drawn from a seeded generator, the same on every machine).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from probe._assets import DATA

PROMPT_FILE = DATA / "prompts" / "ssd_prompts.json"
FILE_SETS = ("animals", "animals_objects", "objects", "SSD-2", "SSD-3")
SHAPES_SETS = {"shapes-2": (2, False), "shapes-3": (3, False), "shapes-similar": (2, True)}  # (objects, similar)
SHAPES_SET_SIZE = 64  # prompts per shapes set unless asked otherwise
SHAPES_SEED = 0

_JOINERS = re.compile(r"\s+(?:and|with)\s+")
_ARTICLES = frozenset({"a", "an", "the", "one"})


def token_indices(tokens: list[str], word: str) -> list[int]:
    """Indices of the word pieces that spell ``word`` in a tokenised prompt.

    ``tokens`` are the prompt's token texts as a recording stores them (``</w>`` removed). The
    first run of consecutive pieces whose concatenation equals ``word`` is returned, so a word
    split into several pieces gives all of them.
    """
    target = word.lower().strip()
    for i in range(len(tokens)):
        joined = ""
        for j in range(i, len(tokens)):
            joined += tokens[j].lower()
            if joined == target:
                return list(range(i, j + 1))
            if not target.startswith(joined):
                break
    shown = [t for t in tokens if t]
    raise ValueError(f"{word!r} is not in the prompt; its tokens are {shown}")


# -- subjects of a prompt ------------------------------------------------------------------------------------------


def _phrases(prompt: str) -> list[list[str]]:
    """``"a cat and a red car"`` → ``[["cat"], ["red", "car"]]``: the words of each subject phrase, no articles."""
    phrases = []
    for part in _JOINERS.split(prompt.strip().lower().rstrip(".")):
        words = [w for w in re.findall(r"[a-z0-9'-]+", part) if w not in _ARTICLES]
        if words:
            phrases.append(words)
    return phrases


def subjects_of(prompt: str) -> list[str]:
    """The subject nouns of an "a X and a Y" prompt (also "with", and three or more subjects).

    The noun is the last word of each phrase: ``"a monkey and a red car"`` → ``["monkey", "car"]``.
    """
    phrases = _phrases(prompt)
    if not phrases:
        raise ValueError(f"no subjects in {prompt!r}; expected a prompt like 'a cat and a dog'")
    return [words[-1] for words in phrases]


def attributes_of(prompt: str) -> list[str]:
    """Each subject's adjectives (words before the noun), "" if none: ``"a monkey and a red car"`` → ``["", "red"]``."""
    return [" ".join(words[:-1]) for words in _phrases(prompt)]


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """Token texts of a prompt at their positions in the text encoder's sequence (start token at 0, ``</w>`` removed).

    ``tokenizer`` may also be a pipeline (its ``tokenizer`` is used).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
    return [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(ids)]


def token_positions(tokenizer, prompt: str) -> list[int]:
    """Where the prompt's tokens (start, words, end) sit in the sequence the text encoder sees: padded to the
    tokenizer's length on its padding side, so with left padding the start token is not at position 0.

    ``prompt_tokens(tok, p)[i]`` is at ``token_positions(tok, p)[i]``.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    mask = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).attention_mask
    return [i for i, m in enumerate(mask) if m]


@dataclass(frozen=True)
class TextLayout:
    """A prompt's tokens as the denoiser's attention sees them: texts, key positions and which text encoder."""

    texts: list[str]
    positions: list[int]
    encoders: list[str]


DEFAULT_MAX_SEQUENCE = {"sd3": 256, "flux": 512}  # the pipelines' own max_sequence_length defaults


def text_layout(pipe, prompt: str, keep_padding: bool = False, max_sequence_length: int | None = None) -> TextLayout:
    """Where each token of ``prompt`` sits among the denoiser's text keys. UNet pipelines: one CLIP sequence
    (SDXL's two encoders share positions); SD3: CLIP's 77 positions, then T5's; FLUX: T5's alone."""
    from probe.tap import denoiser, family_of

    family = family_of(denoiser(pipe)).name
    if family == "unet":
        parts = [("clip", pipe.tokenizer, pipe.tokenizer.model_max_length)]
    else:
        t5_length = max_sequence_length or DEFAULT_MAX_SEQUENCE[family]
        if family == "sd3":
            parts = [("clip", pipe.tokenizer, pipe.tokenizer.model_max_length)]
            parts += [("t5", pipe.tokenizer_3, t5_length)] if pipe.tokenizer_3 is not None else []
        else:
            parts = [("t5", pipe.tokenizer_2, t5_length)]
    texts, positions, encoders, offset = [], [], [], 0
    for encoder, tok, length in parts:
        enc = tok(prompt, padding="max_length", max_length=length, truncation=True)
        keep = range(length) if keep_padding else [i for i, m in enumerate(enc.attention_mask) if m]
        names = tok.convert_ids_to_tokens(enc.input_ids)
        texts += [names[i].removesuffix("</w>") for i in keep]
        positions += [offset + i for i in keep]
        encoders += [encoder] * len(keep)
        offset += length
    return TextLayout(texts, positions, encoders)


def text_keys_tokenizer(pipe):
    """The tokenizer whose positions start the denoiser's text keys (FLUX: T5's; otherwise CLIP's)."""
    from probe.tap import denoiser, family_of

    return pipe.tokenizer_2 if family_of(denoiser(pipe)).name == "flux" else pipe.tokenizer


def word_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's word tokens only (no start, end or padding): the tokens Attend-and-Excite's
    official code softmaxes over."""
    return token_positions(tokenizer, prompt)[1:-1]


def word_occurrences(tokens: list[str], word: str) -> list[list[int]]:
    """Every run of word pieces that spells ``word`` in a tokenised prompt, in order (no overlaps)."""
    found, start = [], 0
    while True:
        try:
            idx = [start + i for i in token_indices(tokens[start:], word)]
        except ValueError:
            return found
        found.append(idx)
        start = idx[-1] + 1


def subject_indices(tokenizer, prompt: str, subjects: list[str]) -> list[list[int]]:
    """Positions in the text encoder's sequence of each subject word (all its word pieces), as guidance needs them.

    A word that occurs several times in the prompt must be placed: list it as often as it occurs (successive
    listings take successive occurrences, "a cat and a cat" with ``["cat", "cat"]`` → [[2], [5]]) or name the
    occurrence, ``"cat#2"`` (1-based). A word not in the prompt is an error that lists the prompt's tokens.
    """
    tokens = prompt_tokens(tokenizer, prompt)
    shown = [t for t in tokens if t]
    claimed: dict[str, set[int]] = {}
    plain: set[str] = set()
    found: list[list[int]] = []
    for subject in subjects:
        word, _, nth = subject.partition("#")
        key = word.lower()
        runs = word_occurrences(tokens, word)
        if not runs:
            raise ValueError(f"subject {word!r} is not a word of the prompt {prompt!r}; the prompt's tokens are "
                             f"{shown}. Give subjects as they are written in the prompt.")
        taken = claimed.setdefault(key, set())
        if nth:
            if not nth.isdigit() or not 1 <= int(nth) <= len(runs):
                raise ValueError(f"{subject!r}: {word!r} occurs {len(runs)} time(s) in {prompt!r}; "
                                 f"name an occurrence from {word}#1 to {word}#{len(runs)}")
            k = int(nth) - 1
        else:
            free = [k for k in range(len(runs)) if k not in taken]
            if not free:
                raise ValueError(f"subject {word!r} is listed more often than the prompt {prompt!r} holds it "
                                 f"({len(runs)} time(s))")
            k = free[0]
            plain.add(key)
        if k in taken:
            raise ValueError(f"{subject!r} names an occurrence of {word!r} that another subject already takes")
        taken.add(k)
        found.append(runs[k])
    for key in plain:
        if (n := len(word_occurrences(tokens, key))) > len(claimed[key]):
            raise ValueError(f"{key!r} occurs {n} times in {prompt!r} but is listed for fewer: say which with "
                             f"{key}#1 … {key}#{n}, or list it once per occurrence")
    positions = token_positions(tokenizer, prompt)
    return [[positions[i] for i in idx] for idx in found]


# -- prompt sets ---------------------------------------------------------------------------------------------------


@cache
def _file_sets() -> dict[str, list[str]]:
    if not PROMPT_FILE.exists():
        raise FileNotFoundError(f"prompt file {PROMPT_FILE} is missing; it ships with the package (data/)")
    return json.loads(PROMPT_FILE.read_text())


def shapes_prompts(n_objects: int = 2, n: int = SHAPES_SET_SIZE, seed: int = SHAPES_SEED, similar: bool = False):
    """``n`` distinct prompts of the built-in shapes world, "a red circle and a blue square", no noun or colour
    repeated within a prompt (a repeated noun is one token for two objects), drawn as the world draws scenes.

    ``similar`` draws a confusable pair (red/orange, blue/purple, circle/ellipse) and allows two objects only.
    """
    from probe.shapes.world import SHAPES, sample_attributes

    if similar and n_objects != 2:
        raise ValueError(f"similar-subject prompts have two objects, got n_objects={n_objects}")
    if n_objects > len(SHAPES):
        raise ValueError(f"{n_objects} objects cannot have distinct nouns: the world has {len(SHAPES)} shapes")
    rows: dict[str, None] = {}
    for i in itertools.count():
        if len(rows) == n:
            break
        if i > 100 * n + 1000:
            raise ValueError(f"the shapes world has fewer than {n} distinct prompts of this kind")
        pairs = sample_attributes(np.random.default_rng([seed, i]), n_objects, similar, distinct_shapes=not similar)
        if len({shape for _, shape in pairs}) == len(pairs):
            rows.setdefault(" and ".join(f"a {colour} {shape}" for colour, shape in pairs))
    return list(rows)


def prompt_set(name: str, n: int | None = None, seed: int = SHAPES_SEED):
    """A prompt set as a ``datasets.Dataset`` (columns ``prompt``, ``subjects``, ``attributes``, ``set``), each
    prompt once.

    Names: ``animals``, ``animals_objects``, ``objects`` (Attend-and-Excite), ``SSD-2``, ``SSD-3`` (Self-Cross),
    ``shapes-2``, ``shapes-3``, ``shapes-similar`` (built-in world; ``n`` prompts, default 64, from ``seed``), or a
    path to a text file with one prompt per line (subjects: its nouns as :func:`subjects_of` finds them, or written
    after a ``|``: ``a cat and a dog | cat, dog``). ``n`` truncates the file sets.
    """
    import datasets

    given: dict[str, list[str] | None] = {}
    if name in FILE_SETS:
        given = dict.fromkeys(_file_sets()[name])
    elif name in SHAPES_SETS:
        n_objects, similar = SHAPES_SETS[name]
        given = dict.fromkeys(shapes_prompts(n_objects, SHAPES_SET_SIZE if n is None else n, seed, similar))
    elif Path(name).suffix == ".txt" and Path(name).is_file():
        for line in Path(name).read_text().splitlines():
            prompt, _, subjects = (part.strip() for part in line.partition("|"))
            if prompt:
                given.setdefault(prompt, [w.strip() for w in subjects.split(",")] if subjects else None)
    else:
        raise ValueError(f"unknown prompt set {name!r}; known: {[*FILE_SETS, *SHAPES_SETS]} or a .txt file with one "
                         "prompt per line")
    prompts = list(given)[:n]
    rows = [{"prompt": p, "subjects": given[p] or subjects_of(p), "attributes": attributes_of(p), "set": name}
            for p in prompts]
    return datasets.Dataset.from_list(rows)
