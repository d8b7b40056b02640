"""The parts of small random pipelines whose text encoder is a chat LLM (FLUX.2's Mistral / Qwen3, Z-Image's Qwen3):
a tokenizer with a chat template and a small random LLM. (Their text keys: :mod:`probe.families.keys`.)"""

from __future__ import annotations

from probe.families import tiny as parts

CHAT_TEMPLATE = (  # a Qwen-style template, for the small random pipelines' tokenizer
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


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
