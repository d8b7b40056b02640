"""A tokenizer as a denoiser's text keys see a prompt, for pipelines that do not hand the tokenizer's output to the
denoiser as it is: Qwen-Image wraps the prompt in a chat template and drops the template's first tokens, Sana puts
an instruction before it and keeps the first token and the last ones. :class:`TextKeys` answers what the library asks
of a tokenizer (:func:`probe.prompts.text_layout`, subject placement) with the keys' own ids, which of them are the
prompt's, and readable texts, so every reader of a recording places words on the keys the model attends to."""

from __future__ import annotations

from collections.abc import Callable

from transformers import BatchEncoding

Keys = Callable[[str], tuple[list[int], list[int]]]  # prompt → (ids of every text key, 1 where a key is the prompt's)


class TextKeys:
    """``keys(prompt)`` gives the key ids as the pipeline lays them out and which are the prompt's own tokens (the
    others: template, instruction, padding). Called with ``padding="max_length"`` it returns every key (padded to
    ``max_length`` where ``pads``: where the pipeline pads the keys), the prompt's tokens marked in the attention
    mask; without padding only the prompt's own tokens, as a tokenizer returns a prompt without padding."""

    def __init__(self, tokenizer, keys: Keys, length: int, pads: bool):
        self.base = tokenizer  # not `.tokenizer`, which prompts.py would unwrap to the bare prompt's tokenizer
        self.keys, self.model_max_length, self.pads = keys, length, pads

    def __call__(self, text: str, padding=False, max_length: int | None = None, truncation: bool = False,
                 **_) -> BatchEncoding:
        ids, own = self.keys(text)
        if padding != "max_length":
            ids, own = [i for i, o in zip(ids, own) if o], [1] * sum(own)
        if truncation and max_length is not None:
            ids, own = ids[:max_length], own[:max_length]
        if padding == "max_length" and self.pads and max_length is not None and len(ids) < max_length:
            pad = self.base.pad_token_id
            ids, own = ids + [pad] * (max_length - len(ids)), own + [0] * (max_length - len(own))
        return BatchEncoding({"input_ids": ids, "attention_mask": own})

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Each key's text as it spells the prompt: a byte-level token ("Ġcat") decoded ("cat"); a token that decodes
        to white space only (a newline) keeps its own name."""
        names = self.base.convert_ids_to_tokens(list(ids))
        texts = []
        for name in names:
            text = self.base.convert_tokens_to_string([name]).strip()
            texts.append(text or name)
        return texts


def prompt_span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """1 for each token whose characters overlap ``[start, end)`` (the prompt inside a longer text), else 0; special
    tokens and padding (empty offsets) are 0."""
    return [int(b > a and b > start and a < end) for a, b in offsets]
