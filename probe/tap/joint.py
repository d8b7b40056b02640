"""The SD3 / SD3.5 family (``SD3Transformer2DModel``): each block's ``attn`` runs one softmax over
[image tokens; text tokens] (image first) for image and text queries alike; the last block is ``context_pre_only``;
SD3.5's dual-attention blocks add ``attn2``, self-attention over the image tokens alone (and may share one processor
instance with ``attn``, so nothing per layer is kept on a processor)."""

from __future__ import annotations

from probe.tap.layers import TEXT_QUERIES, Family, Split, attention_modules, unknown_modules


class Joint(Family):
    name = "sd3"

    def matches(self, net) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(net, SD3Transformer2DModel)

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        found = {}
        for name, module in attention_modules(net).items():
            if name.endswith(".attn"):
                found[name] = ("cross", "self", *TEXT_QUERIES) if module.add_k_proj is not None else ("self",)
            elif name.endswith(".attn2"):
                found[name] = ("self",)
        if len(found) != len(attention_modules(net)):
            raise TypeError(f"attention modules the SD3 family does not know: {unknown_modules(net, set(found))}")
        return found

    def latent(self, pipe) -> tuple[int, int]:
        size = pipe.transformer.config.sample_size
        return size, size

    def pixel_multiple(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        p = net.config.patch_size
        return latent_hw[0] // p, latent_hw[1] // p

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        sample = args[0] if args else kwargs["hidden_states"]
        state.latent_hw = tuple(sample.shape[-2:])

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        n_image = hidden_states.shape[1]
        if encoder_hidden_states is None:
            return Split(slice(None), slice(None), None)
        return Split(slice(0, n_image), slice(0, n_image), slice(n_image, None), slice(n_image, None))

    def runtime_grid(self, layer, hidden_states, state) -> tuple[int, int]:
        p = state.net.config.patch_size
        return state.latent_hw[0] // p, state.latent_hw[1] // p
