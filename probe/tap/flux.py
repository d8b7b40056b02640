"""The FLUX family: FLUX.1 (``FluxTransformer2DModel``) and FLUX.2 (``Flux2Transformer2DModel``, Dev and Klein).
Attention modules are ``FluxAttention`` / ``Flux2Attention`` and, in FLUX.2's single-stream blocks,
``Flux2ParallelSelfAttention`` (``AttentionModuleMixin``); text tokens come first (``cat([text, image])``), q and k
get RMS norms and rotary embeddings before the scores, and attention goes through ``dispatch_attention_fn`` in
(batch, tokens, heads, dim). Double-stream blocks project text and image separately; single-stream blocks receive
the concatenation, so the text length is read from the transformer's own call, and the image grid from its position
ids ((t, h, w) in FLUX.1, (t, h, w, l) in FLUX.2). FLUX.2's reference-image tokens (KV cache) sit between text and
image; a call with them is refused."""

from __future__ import annotations

from probe.tap.core import TapError
from probe.tap.layers import TEXT_QUERIES, Family, Split, attention_modules, unknown_modules

PACK = 2  # FLUX packs 2×2 latent pixels into one token


class Flux(Family):
    name = "flux"

    def matches(self, net) -> bool:
        from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

        return isinstance(net, (FluxTransformer2DModel, Flux2Transformer2DModel))

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        found = {name: ("cross", "self", *TEXT_QUERIES) for name in attention_modules(net)
                 if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn")}
        if len(found) != len(attention_modules(net)):
            raise TypeError(f"attention modules the FLUX family does not know: {unknown_modules(net, set(found))}")
        return found

    def latent(self, pipe) -> tuple[int, int]:
        size = getattr(pipe, "default_sample_size", 128)
        return size, size

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * PACK

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] // PACK, latent_hw[1] // PACK

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        if kwargs.get("num_ref_tokens") or kwargs.get("kv_cache") is not None:
            raise TapError("FLUX.2 with reference-image tokens (kv_cache / num_ref_tokens): they sit between the "
                           "text and image tokens of each softmax, a layout the tap does not split yet; record "
                           "without reference images")
        text = kwargs.get("encoder_hidden_states")
        state.text_tokens = None if text is None else text.shape[1]
        ids = kwargs.get("img_ids")
        if ids is not None:
            ids = ids[0] if ids.ndim == 3 else ids
            state.image_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        if encoder_hidden_states is not None:  # double stream: text keys first
            n_text = encoder_hidden_states.shape[1]
        else:  # single stream: hidden_states is already [text; image]
            n_text = state.text_tokens
        return Split(slice(n_text, None), slice(n_text, None), slice(0, n_text), slice(0, n_text))

    def runtime_grid(self, layer, hidden_states, state) -> tuple[int, int]:
        return state.image_grid or layer.grid
