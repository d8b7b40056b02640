"""Text keys of pipelines whose text encoder is a chat LLM (FLUX.2's Mistral / Qwen3, Z-Image's Qwen3): the prompt is
wrapped in the pipeline's chat template before it is tokenised, so the denoiser's text keys hold the template's tokens
too. :class:`ChatTokens` is that tokenizer as :func:`probe.prompts.text_layout` reads one: the prompt's own tokens are
its tokens, the template's are masked like padding (dropped from recordings unless padding is kept), and every
position is the one the text encoder sees. Also the parts of small random chat pipelines for tests."""

from __future__ import annotations

from collections.abc import Callable

from transformers import BatchEncoding

from probe.families import tiny as parts

CHAT_TEMPLATE = (  # a Qwen-style template, for the small random pipelines' tokenizer
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


class ChatTokens:
    """A chat LLM's tokenizer that templates the prompt as its pipeline does (``render``: prompt → templated text)
    and marks only the prompt's own tokens (by their character offsets in the templated text) as the prompt's.

    Called with ``padding`` (as :func:`probe.prompts.text_layout` and ``token_positions`` call it): the whole
    templated sequence at the text encoder's positions, the template's tokens masked like padding. Called without
    (as ``prompt_tokens`` calls it): the prompt's own tokens alone. So ``prompt_tokens(tok, p)[i]`` sits at
    ``token_positions(tok, p)[i]``, the rule every subject placement relies on."""

    def __init__(self, tokenizer, render: Callable[[str], str], add_special_tokens: bool, model_max_length: int,
                 padded: bool = True, pad_multiple: int = 1):
        self.base = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer; not `.tokenizer`,
        # which prompts.py would unwrap to the untemplated one
        self.render = render
        self.add_special_tokens = add_special_tokens
        self.model_max_length = model_max_length
        self.padded = padded  # False: the pipeline drops the padding before the denoiser sees the text …
        self.pad_multiple = pad_multiple  # … and the denoiser pads it to a multiple of this with pad tokens of its own

    def __call__(self, prompt: str, padding=False, max_length: int | None = None, truncation: bool = False,
                 **_) -> BatchEncoding:
        text = self.render(prompt)
        start = text.rfind(prompt)  # the prompt after the template's own text (a system message may precede it)
        if start < 0:
            raise ValueError(f"the chat template does not hold the prompt {prompt!r} verbatim: {text!r}")
        end = start + len(prompt)
        enc = self.base(text, padding=padding if self.padded else False, max_length=max_length,
                              truncation=truncation, add_special_tokens=self.add_special_tokens,
                              return_offsets_mapping=True)
        mask = [int(bool(m) and b > a and a < end and b > start)
                for m, (a, b) in zip(enc["attention_mask"], enc["offset_mapping"])]
        ids = list(enc["input_ids"])
        if padding and not self.padded:  # the denoiser's own padding of the unpadded sequence, masked
            extra = -len(ids) % self.pad_multiple
            ids, mask = ids + [self.base.pad_token_id] * extra, mask + [0] * extra
        if not padding:  # the prompt's own tokens
            ids = [i for i, m in zip(ids, mask) if m]
            mask = [1] * len(ids)
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """Each token's own text as a word reads (byte-level BPE's "Ġcat" is "cat"); a token that decodes to blanks
        keeps its raw name, so it never reads as padding."""
        raw = self.base.convert_ids_to_tokens(list(ids))
        return [self.base.decode([i]).strip() or name for i, name in zip(ids, raw)]


def chat_tokenizer(max_length: int = 512):
    """The project's CLIP BPE with chat special tokens and :data:`CHAT_TEMPLATE` (small random pipelines)."""
    tok = parts.project_tokenizer(max_length)
    tok.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def causal_lm(kind: str, vocab: int, width: int, layers: int, pad: int):
    """A small random chat LLM (``mistral``, ``qwen3`` causal LMs or the ``qwen3-model`` body), in eval mode."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    shape = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": width // 2,
             "max_position_embeddings": 1024, "pad_token_id": pad}
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**shape)).eval()
    model = Qwen3ForCausalLM if kind == "qwen3" else Qwen3Model
    return model(Qwen3Config(**shape)).eval()
