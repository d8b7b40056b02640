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
from collections.abc import Sequence
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


SENTENCEPIECE_SPACE = "\u2581"  # T5's mark of a word start ("▁cat"): not part of the word


def _piece(token: str) -> str:
    """A token's text as it spells a word: lower case, without T5's word-start mark, so "▁Cat" spells "cat"."""
    return token.lower().removeprefix(SENTENCEPIECE_SPACE)


def token_indices(tokens: list[str], word: str) -> list[int]:
    """Indices of the word pieces that spell ``word`` in a tokenised prompt.

    ``tokens`` are the prompt's token texts as a recording stores them (``</w>`` removed; T5's word-start mark
    ``▁`` is ignored). The first run of consecutive pieces whose concatenation equals ``word`` is returned, so a
    word split into several pieces gives all of them.
    """
    target = word.lower().strip()
    pieces = [_piece(t) for t in tokens]
    for i in range(len(pieces)):
        if not pieces[i]:
            continue
        joined = ""
        for j in range(i, len(pieces)):
            joined += pieces[j]
            if joined == target:
                return list(range(i, j + 1))
            if not target.startswith(joined):
                break
    shown = [t for t in tokens if t]
    raise ValueError(f"{word!r} is not in the prompt; its tokens are {shown}")


# -- subjects of a prompt ------------------------------------------------------------------------------------------


def _phrase_words(prompt: str) -> list[list[str]]:
    """``"a cat and a red car"`` → ``[["a", "cat"], ["a", "red", "car"]]``: the words of each subject phrase."""
    parts = (re.findall(r"[a-z0-9'-]+", part) for part in _JOINERS.split(prompt.strip().lower().rstrip(".")))
    return [words for words in parts if any(w not in _ARTICLES for w in words)]


def _phrases(prompt: str) -> list[list[str]]:
    """``"a cat and a red car"`` → ``[["cat"], ["red", "car"]]``: the words of each subject phrase, no articles."""
    return [[w for w in words if w not in _ARTICLES] for words in _phrase_words(prompt)]


_NOT_NOUN_ENDINGS = ("ly", "ing")  # adverbs ("quickly") and verbs' -ing forms ("running")
_NOUNS_THAT_LOOK_OTHERWISE = frozenset({
    "butterfly", "fly", "dragonfly", "firefly", "family", "lily", "jelly", "belly", "bully", "holly", "dolly", "ally",
    "king", "ring", "wing", "string", "swing", "spring", "thing", "sling", "building", "painting", "ceiling",
    "pudding", "earring", "wedding", "sibling", "duckling", "seedling", "lightning", "stocking", "icing", "viking",
})
_ADJECTIVES = frozenset({
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "big", "small", "large", "little", "tiny", "huge", "tall", "short", "long", "old", "young", "new", "cute",
})


def _not_a_noun(words: list[str]) -> bool:
    """Whether a phrase's last word cannot be its noun: an adjective ("a cat and red"), an adverb or an -ing form
    ("running quickly"), unless an article introduces it ("an orange", "a king" are nouns; "a dog running" is not)."""
    last = words[-1]
    if len(words) > 1 and words[-2] in _ARTICLES:
        return False
    return last in _ADJECTIVES or (last.endswith(_NOT_NOUN_ENDINGS) and len(last) > 4
                                   and last not in _NOUNS_THAT_LOOK_OTHERWISE)


def subjects_of(prompt: str) -> list[str]:
    """The subject nouns of an "a X and a Y" prompt (also "with", and three or more subjects).

    The noun is the last word of each phrase: ``"a monkey and a red car"`` → ``["monkey", "car"]``. A guess: where
    a phrase's last word reads as an adverb, an -ing form or an adjective ("running quickly") it is refused rather
    than guided or measured as a subject, and the error says to give the subjects.
    """
    phrases = _phrase_words(prompt)
    if not phrases:
        raise ValueError(f"no subjects in {prompt!r}; expected a prompt like 'a cat and a dog', or give the subjects")
    for words in phrases:
        if _not_a_noun(words):
            raise ValueError(f"cannot find the subject nouns of {prompt!r}: {words[-1]!r}, the last word of "
                             f"{' '.join(words)!r}, reads as an adverb, an -ing form or an adjective, not a noun; "
                             "give the subjects yourself (subjects=[...], --subjects, or 'prompt | noun, noun' in a "
                             "prompts file)")
    return [[w for w in words if w not in _ARTICLES][-1] for words in phrases]


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


def text_layout(pipe, prompt: str, keep_padding: bool = False, max_sequence_length: int | None = None) -> TextLayout:
    """Where each token of ``prompt`` sits among the denoiser's text keys. UNet pipelines: one CLIP sequence
    (SDXL's two encoders share positions); SD3: CLIP's 77 positions, then T5's; FLUX: T5's alone."""
    from probe.families import family

    parts = family(pipe).text_parts(pipe, max_sequence_length)
    texts, positions, encoders, offset = [], [], [], 0
    for encoder, tok, length in parts:
        enc = tok(prompt, padding="max_length", max_length=length, truncation=True)
        keep = range(len(enc.input_ids)) if keep_padding else [i for i, m in enumerate(enc.attention_mask) if m]
        names = tok.convert_ids_to_tokens(enc.input_ids)
        texts += [names[i].removesuffix("</w>") for i in keep]
        positions += [offset + i for i in keep]
        encoders += [encoder] * len(keep)
        offset += length
    return TextLayout(texts, positions, encoders)


def text_keys_tokenizer(pipe):
    """The tokenizer whose positions start the denoiser's text keys (FLUX: T5's; otherwise CLIP's)."""
    from probe.families import family

    return family(pipe).text_keys_tokenizer(pipe)


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
    found = place_subjects(prompt_tokens(tokenizer, prompt), subjects, prompt)
    positions = token_positions(tokenizer, prompt)
    return [[positions[i] for i in idx] for idx in found]


def place_subjects(tokens: Sequence[str], subjects: Sequence[str], prompt: str) -> list[list[int]]:
    """Indices into one encoder's ``tokens`` of each subject's word pieces, by the rules of :func:`subject_indices`
    (successive listings take successive occurrences, ``word#k`` names one, a word occurring more often than it is
    listed is an error): the one placement that guidance and every analysis of a recording share."""
    tokens = list(tokens)
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
                             f"{shown}. A word that is not in {prompt!r} has no map: give subjects as they are "
                             "written in the prompt.")
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
    return found


def recorded_subject_tokens(tokens: Sequence[str], encoders: Sequence[str] | None, subjects: Sequence[str],
                            prompt: str) -> list[list[int]]:
    """Which of a recording's tokens each subject word means: the one rule for every map made from a recording
    (:func:`probe.analysis.maps.word_map`, ``probe show``, the explorer's subjects, :mod:`probe.analysis.lazy`,
    :mod:`probe.ui.lab`).

    A word means every copy of it among the prompt's text keys: on SD3 the CLIP copy and the T5 copy (the
    recording's ``encoder`` coordinate, "clip" / "t5", tells them apart; UNets and FLUX have one copy). Its map is
    the mean over all its word pieces in all copies, as :func:`probe.analysis.maps.token_map` averages a word's pieces,
    so
    each copy's piece counts once. Guidance's maps on SD3 use the CLIP copy alone (:func:`subject_indices`
    places words in CLIP's sequence), so on SD3 a recording's subject map and guidance's differ by the T5 copy.
    Within each copy words are placed as :func:`place_subjects` places them for guidance: a word listed as often as
    it occurs takes successive occurrences, ``cat#2`` names the second occurrence in the prompt (the second in
    every copy), and a word that occurs more often than it is listed is an error that says to name one. A copy
    that cannot place every subject (a long prompt cut short by CLIP's 77 tokens) is left out; a word in no copy is
    an error. ``tokens``: one sample's token texts (empty for padding); ``encoders``: their encoder, or None.
    Returns indices into ``tokens``.
    """
    copies: dict[str, list[int]] = {}
    for i, (text, encoder) in enumerate(zip(tokens, encoders if encoders is not None else [""] * len(tokens))):
        if text:
            copies.setdefault(str(encoder), []).append(i)
    found: list[list[int]] = [[] for _ in subjects]
    errors: list[ValueError] = []
    for where in copies.values():
        try:
            placed = place_subjects([tokens[i] for i in where], subjects, prompt)
        except ValueError as err:
            errors.append(err)
            continue
        for j, run in enumerate(placed):
            found[j] += [where[i] for i in run]
    if errors and len(errors) == len(copies):
        raise errors[0]
    if not copies:
        raise ValueError(f"the recording holds no tokens for {prompt!r}; record it again")
    return found


_SPECIAL_TOKEN = re.compile(r"<\|?/?[a-z_]+\|?>")  # <|startoftext|>, <|endoftext|>, </s>, <pad>, <unk>


def recorded_words(tokens: Sequence[str]) -> list[bool]:
    """Which of a recording's tokens are the prompt's words: not padding (empty) and not a start, end or padding
    token, in every encoder's copy. Attend-and-Excite's softmax runs over these (its official code: the words,
    :func:`word_positions`); on SD3 the CLIP end token and T5's own special tokens sit between the two copies, and a
    softmax that kept them would be theirs."""
    return [bool(t) and not _SPECIAL_TOKEN.fullmatch(t) for t in tokens]


def subject_keys(pipe, prompt: str, subjects: Sequence[str], max_sequence_length: int | None = None
                 ) -> tuple[list[list[int]], list[int]]:
    """Each subject's positions among the denoiser's text keys, and the positions of the prompt's words, by the one
    rule of :func:`recorded_subject_tokens` (every copy of a word: CLIP's and T5's on SD3): what guidance and the
    attention intervention act on, so that they move the very maps a recording's reader sees."""
    layout = text_layout(pipe, prompt, max_sequence_length=max_sequence_length)
    found = recorded_subject_tokens(layout.texts, layout.encoders, subjects, prompt)
    words = [p for p, is_word in zip(layout.positions, recorded_words(layout.texts)) if is_word]
    return [[layout.positions[i] for i in ix] for ix in found], words


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


def prompt_file(path: str | Path) -> dict[str, list[str] | None]:
    """The prompts of a text file, one per line (subjects after a ``|``: ``a cat and a dog | cat, dog``), each once:
    prompt → its subjects (None: its nouns). Checked before any study starts, so that a mistyped path or an empty
    file is not found hours in (or a study of no prompts run)."""
    path = Path(path)
    if path.suffix != ".txt":
        raise ValueError(f"unknown prompt set {str(path)!r}; give one of {[*FILE_SETS, *SHAPES_SETS]} or a .txt file "
                         "with one prompt per line")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give the path of a .txt file with one "
                                f"prompt per line, or a prompt set: {[*FILE_SETS, *SHAPES_SETS]}")
    given: dict[str, list[str] | None] = {}
    for line in path.read_text().splitlines():
        prompt, _, subjects = (part.strip() for part in line.partition("|"))
        if prompt:
            words = [w.strip() for w in subjects.split(",") if w.strip()]
            given.setdefault(prompt, words or None)
    if not given:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts; write one prompt per line, e.g. 'a cat and a "
                         "dog' (its subjects after a '|' where they are not its nouns)")
    return given


def check_prompt_sets(names: Sequence[str]) -> list[str]:
    """Prompt set names as given, each a known set or a readable prompt file (:func:`prompt_file`), checked before
    anything is generated."""
    for name in names:
        if name not in FILE_SETS and name not in SHAPES_SETS:
            prompt_file(name)
    return list(names)


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
    else:
        given = prompt_file(name)
    prompts = list(given)[:n]
    rows = [{"prompt": p, "subjects": given[p] or subjects_of(p), "attributes": attributes_of(p), "set": name}
            for p in prompts]
    return datasets.Dataset.from_list(rows)
