"""The Sana family (``SanaTransformer2DModel``, ``SanaPipeline``). Each block has two attention modules: ``attn1``,
self-attention over the image tokens computed as *linear* attention (``SanaLinearAttnProcessor2_0``: ReLU(q) ·
(ReLU(k)ᵀ · v), normalised by ReLU(q) · Σ ReLU(k); no softmax, so no attention map exists to record, guide with or
inject, and asking for one is refused with that reason), and ``attn2``, cross-attention of the image tokens on the
text keys (``SanaAttnProcessor2_0``: a softmax through ``F.scaled_dot_product_attention``, padding keys masked by a
−10000 bias). Classifier-free guidance runs as one batch [unconditional; conditional].

Text keys: Gemma-2's encoding of the lower-cased prompt after the pipeline's complex human instruction (its
``__call__`` default), of which the first token and the last ``max_sequence_length − 1`` are kept, padding included.
The prompt's keys are read with the pipeline's default instruction; a call with another one (or none) moves them.

Sizes: the pipeline refuses sides that are not multiples of 32 px, and by default (``use_resolution_binning=True``)
generates at the nearest size of its aspect-ratio table and resizes the image back: pass
``use_resolution_binning=False`` to generate, record and guide at the size asked for."""

from __future__ import annotations

import inspect
import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.families import tiny as parts
from probe.families import words
from probe.families.base import Patched, Velocity
from probe.families.keys import TextKeys, check_fits, prompt_span
from probe.families.layout import Split, TapError, attention_modules, every_module

SIDE_MULTIPLE = 32  # SanaPipeline.check_inputs: height and width multiples of 32 px
LINEAR = ("self-attention is linear attention (ReLU feature maps, no softmax over the keys), so it has no "
          "self-attention map")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


class Sana(Patched):
    name = "sana"
    title = "Sana"
    flow = True
    max_sequence = 300  # the pipeline's own max_sequence_length default

    def matches(self, net) -> bool:
        from diffusers import SanaTransformer2DModel

        return isinstance(net, SanaTransformer2DModel)

    def unmapped(self, net) -> dict[str, str]:
        return {"self": LINEAR}

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        found: dict[str, tuple[str, ...]] = {}
        for name in attention_modules(net):
            if name.startswith("transformer_blocks.") and name.endswith(".attn2"):
                found[name] = ("cross",)
            elif name.startswith("transformer_blocks.") and name.endswith(".attn1"):
                found[name] = ()  # linear attention: no probabilities to tap
        return every_module(net, found, self.title)

    def pixel_multiple(self, pipe) -> int:
        return math.lcm(super().pixel_multiple(pipe), SIDE_MULTIPLE)

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        return Split(slice(None), None, slice(None))  # cross-attention: image queries, text keys only

    def runtime_grid(self, layer, hidden_states, state) -> tuple[int, int]:
        """The grid being generated, which must be the one the tap was set up for: SanaPipeline generates at another
        size than it was asked for where it bins sizes (its default), and maps at a grid no consumer expects would
        fail far from the cause."""
        grid = super().runtime_grid(layer, hidden_states, state)
        if grid != layer.grid:
            raise TapError(f"{layer.name}: the transformer runs on a {grid[0]}×{grid[1]} token grid, the tap was set "
                           f"up for {layer.grid[0]}×{layer.grid[1]}. SanaPipeline generates at the nearest size of its "
                           "aspect-ratio bins unless called with use_resolution_binning=False: pass that (to record, "
                           "generate, edit …), and give the tap the height and width the pipeline is called with")
        return grid

    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        length = max_sequence_length or self.max_sequence
        return [("gemma", TextKeys(pipe.tokenizer, lambda prompt: _keys(pipe, prompt, length), length), length)]

    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net = pipe.transformer
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=pipe._execution_device,
            max_sequence_length=max_sequence_length or self.max_sequence, complex_human_instruction=_instruction(pipe))
        learned_sigma = net.config.out_channels // 2 == net.config.in_channels

        def call(latents, t):
            n = latents.shape[0]
            out = net(latents.to(net.dtype), encoder_hidden_states=embeds.expand(n, -1, -1).to(net.dtype),
                      encoder_attention_mask=mask.expand(n, -1), timestep=t.expand(n) * net.config.timestep_scale,
                      return_dict=False)[0].float()
            return out.chunk(2, dim=1)[0] if learned_sigma else out
        return call

    def initial_noise(self, pipe, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        """SanaPipeline draws its noise in float32 whatever the transformer's dtype."""
        channels = pipe.transformer.config.in_channels
        return randn_tensor((1, channels, *latent_hw), generator=generator, device=pipe._execution_device,
                            dtype=torch.float32)

    def to_latent(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """The deep-compression autoencoder (``AutoencoderDC``) encodes to one latent, no distribution."""
        vae = pipe.vae
        return vae.encode(pixels.to(vae.dtype)).latent * vae.config.scaling_factor

    def to_pixels(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        return vae.decode(latent.to(vae.dtype) / vae.config.scaling_factor).sample

    def tiny(self) -> dict:
        return {"tiny-sana": tiny_sana}

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """Sana inverts on the conditional branch alone: classifier-free guidance has no counterpart there."""
        return 1.0


def _instruction(pipe) -> list[str] | None:
    """The complex human instruction the pipeline (or its class) puts before every prompt by default."""
    return inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default


def _keys(pipe, prompt: str, length: int) -> tuple[list[int], list[int]]:
    """The text keys of ``prompt`` as SanaPipeline encodes it (lower-cased, after its instruction, padded; the first
    key and the last ``length − 1`` kept) and which are the prompt's own (its start token and words); a prompt that
    the instruction leaves too little room for is refused."""
    text = pipe._text_preprocessing(prompt, clean_caption=False)[0]
    instruction = _instruction(pipe)
    head = "\n".join(instruction) if instruction else ""
    total = len(pipe.tokenizer.encode(head)) + length - 2 if instruction else length
    encoded = pipe.tokenizer(head + text, padding="max_length", max_length=total, truncation=True,
                             add_special_tokens=True, return_offsets_mapping=True)
    check_fits(encoded, head + text, prompt, len(head) + len(text), total,
               lambda: len(pipe.tokenizer.encode(head + text)))
    own = prompt_span(encoded.offset_mapping, len(head), len(head) + len(text))
    keep = [0, *range(total - length + 1, total)]
    return [encoded.input_ids[i] for i in keep], [1, *(own[i] for i in keep[1:])]


def tiny_sana():
    """A small random Sana pipeline (linear self-attention, softmax cross-attention, a Gemma-2 text encoder, a
    two-level deep-compression autoencoder with ×2 downsampling, patches of 2×2 latent pixels), 32 px, the same
    weights on every call; a flow-matching Euler scheduler as diffusers' own tests give it. Its tokenizer splits at
    spaces like Gemma's, one token per word."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = words.pieces(SPECIALS, "<bos>", "<unk>", texts=["\n".join(_instruction(SanaPipeline))],
                             pad_token="<pad>", eos_token="<eos>")
    with parts.seeded():
        transformer = SanaTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=16,
        )
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1), downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
        )
        encoder = parts.llm("gemma2", len(tokenizer), 16, 2, tokenizer.pad_token_id, num_key_value_heads=2,
                            attn_implementation="eager", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
