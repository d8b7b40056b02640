"""Parts of the small random pipelines each family builds for tests and benchmarks (offline, the same weights on every
call and machine): the project's tokenizer, small CLIP / T5 / LLM text encoders, a small autoencoder and a DDIM
scheduler. (Tokenizers in other models' spellings: :mod:`probe.families.words`.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from probe._assets import tokenizer_files

TINY_SEED = 0


@contextmanager
def seeded() -> Iterator[None]:
    """Build inside: the weights depend on nothing but :data:`TINY_SEED`, and the caller's random state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        yield


def project_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The project's CLIP BPE: every word of the bundled prompt lists is one token."""
    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=max_length)


def text_encoder(vocab: int, width: int, projection: bool = False):
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5_encoder(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=vocab - 1, eos_token_id=vocab - 1)).eval()


def llm(kind: str, vocab: int, width: int, layers: int, pad: int, **config):
    """A small random LLM text encoder in eval mode: ``mistral`` or ``qwen3`` causal LMs, the ``qwen3-model`` or
    ``gemma2`` bodies; ``config``: what a family's encoder sets otherwise."""
    from transformers import (
        Gemma2Config,
        Gemma2Model,
        MistralConfig,
        MistralForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3Model,
    )

    models = {"mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
              "qwen3-model": (Qwen3Config, Qwen3Model), "gemma2": (Gemma2Config, Gemma2Model)}
    shape = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": width // 2,
             "max_position_embeddings": 1024, "pad_token_id": pad}
    settings, model = models[kind]
    return model(settings(**{**shape, **config})).eval()


def vae(flow: bool = False) -> AutoencoderKL:
    """A 2-level autoencoder (×2 downsampling, 4 latent channels); ``flow``: with the shift factor flow pipelines
    read."""
    model = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    if flow:
        model.register_to_config(shift_factor=0.0)
    return model


def ddim() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
