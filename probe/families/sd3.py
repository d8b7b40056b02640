"""The SD3 / SD3.5 family (``SD3Transformer2DModel``): each block's ``attn`` runs one softmax over
[image tokens; text tokens] (image first) for image and text queries alike; the last block is ``context_pre_only``;
SD3.5's dual-attention blocks add ``attn2``, self-attention over the image tokens alone (and may share one processor
instance with ``attn``, so nothing per layer is kept on a processor)."""

from __future__ import annotations

from probe.families import tiny as parts
from probe.families.base import Patched, Velocity
from probe.families.layout import TEXT_QUERIES, Split, attention_modules, every_module


class SD3(Patched):
    name = "sd3"
    title = "SD3 / SD3.5"
    flow = True
    max_sequence = 256  # the pipeline's own max_sequence_length default

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
        return every_module(net, found, self.title)

    def split(self, attn, hidden_states, encoder_hidden_states, state) -> Split:
        n_image = hidden_states.shape[1]
        if encoder_hidden_states is None:
            return Split(slice(None), slice(None), None)
        return Split(slice(0, n_image), slice(0, n_image), slice(n_image, None), slice(n_image, None))

    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        parts = [("clip", pipe.tokenizer, pipe.tokenizer.model_max_length)]  # CLIP's 77 positions, then T5's
        t5 = ("t5", pipe.tokenizer_3, max_sequence_length or self.max_sequence)
        return parts + ([t5] if pipe.tokenizer_3 is not None else [])

    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net, seq = pipe.transformer, {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=pipe._execution_device,
                                                  do_classifier_free_guidance=False, **seq)

        def call(latents, t):
            return net(hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=embeds,
                       pooled_projections=pooled, return_dict=False)[0]
        return call

    def tiny(self) -> dict:
        return {"tiny-sd3": tiny_sd3}

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """SD3 inverts on the conditional branch alone: classifier-free guidance has no counterpart there."""
        return 1.0


def tiny_sd3():
    """A small random SD3.5-style pipeline (joint attention, a dual-attention block, RMS q/k norms, CLIP ×2 + T5
    text), 32 px, the same weights on every call. The project's CLIP tokenizer stands in for T5's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = parts.project_tokenizer()
    with parts.seeded():
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=parts.vae(flow=True),
            text_encoder=parts.text_encoder(len(tok), 16, projection=True), tokenizer=tok,
            text_encoder_2=parts.text_encoder(len(tok), 16, projection=True), tokenizer_2=parts.project_tokenizer(),
            text_encoder_3=parts.t5_encoder(len(tok), 32), tokenizer_3=parts.project_tokenizer(),
        )


Joint = SD3  # the name the tap's family had before it moved here
