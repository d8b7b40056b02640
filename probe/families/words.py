"""Small word-level tokenizers for the tiny random pipelines of families whose real tokenizers are byte-level BPE
(Qwen2 / Qwen3 / Mistral: "Ġcat"; :func:`chat` adds Qwen's chat template) or SentencePiece-style (Gemma: "▁cat"):
one token per word of the project's vocabulary (the words of its CLIP BPE, :func:`probe._assets.tokenizer_files`) in
the real tokenizer's spelling, built from sorted lists, so the ids are the same in every process and on every machine
(nothing is trained). A word outside the vocabulary is one unknown token, so a text has as many tokens as the real
tokenizer gives it where the real one keeps each word whole (Qwen-Image's template prefix: 34)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from probe._assets import tokenizer_files

BYTE_SPACE = "Ġ"  # byte-level BPE's mark of a leading space
PIECE_SPACE = "▁"  # SentencePiece's
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's special tokens (the first pads)
CHAT_TEMPLATE = (  # a Qwen-style chat template
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
CHAT_ROLES = "system\nuser\nassistant\n"  # the words CHAT_TEMPLATE adds around the messages


@cache
def project_words() -> tuple[str, ...]:
    """The whole words of the project's CLIP vocabulary, sorted."""
    vocab, _ = tokenizer_files()
    return tuple(sorted(w.removesuffix("</w>") for w in json.loads(vocab.read_text()) if w.endswith("</w>")))


def _fast(model: Tokenizer, specials: list[str], **tokens) -> PreTrainedTokenizerFast:
    model.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=model, padding_side="right", model_max_length=2048, **tokens)


def _vocab(specials: list[str], words: list[str], texts: Sequence[str], split) -> dict[str, int]:
    """Token → id: the special tokens, ``words``, then every piece of ``texts`` (a pipeline's own template or
    instruction, so that it reads as words) as ``split`` cuts it."""
    pieces = [piece for text in texts for piece, _ in split.pre_tokenize_str(text)]
    return {token: i for i, token in enumerate(dict.fromkeys([*specials, *words, *sorted(set(pieces))]))}


def byte_level(specials: list[str], unknown: str, texts: Sequence[str] = (), **tokens) -> PreTrainedTokenizerFast:
    """Qwen2-style: GPT-2 byte-level pre-tokenizer; every byte, every project word with and without its leading
    space mark, and the pieces of ``texts`` are tokens."""
    words = project_words()
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bytes_ = sorted(pre_tokenizers.ByteLevel.alphabet())  # the library lists them in a different order each run
    ids = _vocab(specials, [*bytes_, *words, *(BYTE_SPACE + w for w in words)], texts, split)
    model = Tokenizer(models.WordLevel(ids, unk_token=unknown))
    model.pre_tokenizer = split
    model.decoder = decoders.ByteLevel()
    return _fast(model, specials, unk_token=unknown, **tokens)


def pieces(specials: list[str], bos: str, unknown: str, texts: Sequence[str] = (), **tokens
           ) -> PreTrainedTokenizerFast:
    """Gemma-style: words split at spaces, each space a ``▁`` before the next word; the start token before every
    text; the pieces of ``texts`` are tokens too."""
    words = project_words()
    split = pre_tokenizers.Metaspace(replacement=PIECE_SPACE, prepend_scheme="never")
    ids = _vocab(specials, [*words, *(PIECE_SPACE + w for w in words)], texts, split)
    model = Tokenizer(models.WordLevel(ids, unk_token=unknown))
    model.pre_tokenizer = split
    model.decoder = decoders.Metaspace(replacement=PIECE_SPACE, prepend_scheme="never")
    model.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                         special_tokens=[(bos, ids[bos])])
    return _fast(model, specials, bos_token=bos, unk_token=unknown, **tokens)


def chat(texts: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A Qwen-style chat tokenizer: :func:`byte_level` with Qwen's special tokens and :data:`CHAT_TEMPLATE`, the
    template's roles and the pieces of ``texts`` (a pipeline's own template or system message) as tokens."""
    tok = byte_level(CHAT_TOKENS, CHAT_TOKENS[0], texts=[CHAT_ROLES, *texts], pad_token=CHAT_TOKENS[0],
                     eos_token=CHAT_TOKENS[2])
    tok.chat_template = CHAT_TEMPLATE
    return tok
