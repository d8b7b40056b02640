"""A tokenizer as a denoiser's text keys see a prompt, for pipelines that do not hand the tokenizer's output of the bare
prompt to the denoiser: FLUX.2 and Z-Image wrap it in a chat template (FLUX.2 [dev] after a system message), Qwen-Image
too and drops the template's first tokens, Sana puts an instruction before it and keeps the first token and the last
ones. :class:`TextKeys` answers what the library asks of a tokenizer (:func:`probe.prompts.text_layout`,
``prompt_tokens``, ``token_positions``, subject placement) with the keys' own ids, which of them are the prompt's, and
readable texts, so every reader of a recording places words on the keys the model attends to."""

from __future__ import annotations

from collections.abc import Callable

from transformers import BatchEncoding

Keys = Callable[[str], tuple[list[int], list[int]]]  # prompt → (ids of every text key, 1 where a key is the prompt's)
Render = Callable[[str], tuple[str, int]]  # prompt → (the text the text encoder reads, where the prompt starts in it)
MARK = "\ue000"  # a private-use character: in no template, so where it lands in one is the prompt's place


class TextKeys:
    """``keys(prompt)`` gives the key ids as the pipeline lays them out (cut and padded as it cuts and pads them, at
    ``length``: the text keys' own length, so a caller's ``max_length`` and ``truncation`` add nothing) and which are
    the prompt's own tokens (the others: template, instruction, padding). Called with ``padding`` (as ``text_layout``
    and ``token_positions`` call it) it returns every key, the prompt's tokens marked in the attention mask; without
    (as ``prompt_tokens`` calls it) only the prompt's own tokens, as a tokenizer returns a prompt without padding. So
    ``prompt_tokens(view, p)[i]`` sits at ``token_positions(view, p)[i]``, the rule every subject placement relies
    on."""

    def __init__(self, tokenizer, keys: Keys, length: int):
        # a processor's tokenizer; named base, not `.tokenizer`, which prompts.py would unwrap to the bare prompt's
        self.base = getattr(tokenizer, "tokenizer", tokenizer)
        self.keys, self.model_max_length = keys, length

    def __call__(self, text: str, padding=False, **_) -> BatchEncoding:
        ids, own = self.keys(text)
        if not padding:
            ids, own = [i for i, o in zip(ids, own) if o], [1] * sum(own)
        return BatchEncoding({"input_ids": ids, "attention_mask": own})

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Each key's text as it spells the prompt: a byte-level token ("Ġcat") decoded ("cat"); a token that decodes
        to white space only (a newline) keeps its own name, so it never reads as padding."""
        names = self.base.convert_ids_to_tokens(list(ids))
        return [self.base.decode([i]).strip() or name for i, name in zip(ids, names)]


def prompt_span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """1 for each token whose characters overlap ``[start, end)`` (the prompt inside a longer text), else 0; special
    tokens and padding (empty offsets) are 0."""
    return [int(b > a and b > start and a < end) for a, b in offsets]


def check_fits(encoded, text: str, prompt: str, end: int, limit: int, count) -> None:
    """Refuse a prompt that its pipeline's cut (the templated ``text`` encoded up to ``limit`` tokens: ``encoded``,
    with offsets) would shorten: the prompt ends at character ``end`` of the text, so characters of it after the
    last kept token are words the model would never read. ``count()``: the whole text's token count, for the
    message."""
    if sum(encoded["attention_mask"]) < limit:  # nothing was cut
        return
    last = max((b for a, b in encoded["offset_mapping"] if b > a), default=0)
    if text[last:end].strip():
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise ValueError(f"prompt {shown!r} is {count()} tokens inside the pipeline's template (the template's own "
                         f"tokens included); its text encoder reads at most {limit}, so the prompt's last words would "
                         "be cut. Shorten the prompt, or give a larger max_sequence_length where the pipeline takes "
                         "one.")


def templated(tokenizer, render: Render, length: int, drop: int = 0, pad: bool = False, pad_multiple: int = 1,
              add_special_tokens: bool = True) -> Keys:
    """The keys of a prompt inside a template (``render``): the templated text's tokens with the first ``drop``
    dropped (Qwen-Image), cut to ``length``; padded to ``length`` by the tokenizer where the pipeline pads them
    (``pad``: FLUX.2), or with pad tokens up to a multiple of ``pad_multiple`` where the denoiser pads them itself
    (Z-Image). The prompt's own tokens are those whose characters lie in the prompt's span of the text. A prompt
    that the cut would shorten is refused (:func:`check_fits`): the template's tokens count against the length."""
    base = getattr(tokenizer, "tokenizer", tokenizer)

    def keys(prompt: str) -> tuple[list[int], list[int]]:
        text, start = render(prompt)
        enc = base(text, padding="max_length" if pad else False, max_length=length + drop, truncation=True,
                   add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        check_fits(enc, text, prompt, start + len(prompt), length + drop,
                   lambda: len(base(text, add_special_tokens=add_special_tokens)["input_ids"]))
        span = prompt_span(enc["offset_mapping"], start, start + len(prompt))
        own = [int(bool(m)) & s for m, s in zip(enc["attention_mask"], span)][drop:]
        ids = list(enc["input_ids"])[drop:]
        extra = -len(ids) % pad_multiple
        return ids + [base.pad_token_id] * extra, own + [0] * extra
    return keys


def verbatim(render: Callable[[str], str]) -> Render:
    """A chat template's rendering with the prompt's place in it: after the template's own text before the prompt
    (found once, by rendering a mark in the prompt's place), so a prompt that is also a word of the template
    ("assistant") is not placed there; where the template changes with the prompt, its last occurrence."""
    before: list[str] = []

    def placed(prompt: str) -> tuple[str, int]:
        if not before:
            marked = render(MARK)
            before.append(marked[:marked.find(MARK)] if MARK in marked else "")
        text = render(prompt)
        start = len(before[0]) if text.startswith(before[0] + prompt) else text.rfind(prompt)
        if start < 0:
            raise ValueError(f"the chat template does not hold the prompt {prompt!r} verbatim: {text!r}")
        return text, start
    return placed
