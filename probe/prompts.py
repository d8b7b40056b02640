"""Prompts and the tokens of their subjects."""

from __future__ import annotations


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
