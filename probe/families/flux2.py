"""The FLUX.2 family (``Flux2Transformer2DModel``: ``Flux2Pipeline`` with a Mistral text encoder, and
``Flux2KleinPipeline`` with Qwen3). Its attention is laid out as FLUX.1's (:mod:`probe.families.flux`: text first,
double- and single-stream blocks, position ids (t, h, w, l)); what differs is everything around it:

- text: the prompt is wrapped in a chat template (``Flux2Pipeline`` adds its system message) and the text keys are
  the LLM's hidden states at every position of the padded templated sequence (:class:`~probe.families.keys.TextKeys`);
- latents: the autoencoder's latent is patchified (2×2 pixels → 4× channels), normalised by the autoencoder's batch
  norm statistics and packed into (tokens, channels); the pipeline's ``latents=`` takes the patchified
  (channels, h/2, w/2) form, its loop the packed one;
- schedule: sigmas linspace(1, 1/T) shifted by ``compute_empirical_mu`` (image tokens and step count);
- guidance: ``Flux2Pipeline`` embeds it (when the transformer has a guidance embedder); ``Flux2KleinPipeline`` runs
  classifier-free guidance as two passes, ``cond`` and ``uncond`` (unless distilled).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.families import tiny as parts
from probe.families import words
from probe.families.base import Velocity
from probe.families.flux import PACK, Flux
from probe.families.keys import TextKeys, templated, verbatim
from probe.families.layout import TapError

KLEIN_TEXT_LAYERS = 27  # Flux2KleinPipeline reads hidden states 9, 18, 27
DEV_TEXT_LAYERS = 30  # Flux2Pipeline reads 10, 20, 30


class Flux2(Flux):
    name = "flux2"
    title = "FLUX.2"
    reference_inputs = ("image",)  # reference images are optional; calls with them are refused by observe

    def matches(self, net) -> bool:
        from diffusers import Flux2Transformer2DModel

        return isinstance(net, Flux2Transformer2DModel)

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        ids = kwargs.get("img_ids")
        if ids is not None and bool((ids[..., 0] != 0).any()):  # reference images sit at t = 10, 20, …
            raise TapError("FLUX.2 with reference images (image=): their tokens follow the generated image's in "
                           "every softmax, a layout the tap does not split yet; record, guide and edit without "
                           "reference images")
        super().observe(net, args, kwargs, state)

    # -- text --
    def text_parts(self, pipe, max_sequence_length: int | None) -> list:
        length = max_sequence_length or self.max_sequence
        keys = templated(pipe.tokenizer, verbatim(_render(pipe)), length, pad=True, add_special_tokens=_klein(pipe))
        return [("llm", TextKeys(pipe.tokenizer, keys, length), length)]

    # -- the denoiser outside the pipeline's loop --
    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        net, device = pipe.transformer, pipe._execution_device
        seq = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=device, **seq)
        grid = _grid(pipe, height, width)
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 0, *grid)).to(device)
        embedded = None
        if self.embeds_guidance(net) and not _klein(pipe):  # Klein passes guidance=None
            embedded = torch.full((1,), guidance, device=device, dtype=torch.float32)

        def call(latents, t):
            n = latents.shape[0]
            return net(hidden_states=latents, timestep=t.expand(n).to(latents.dtype) / 1000,
                       guidance=None if embedded is None else embedded.expand(n),
                       encoder_hidden_states=embeds.expand(n, -1, -1), txt_ids=text_ids.expand(n, -1, -1),
                       img_ids=image_ids.expand(n, -1, -1), return_dict=False)[0]
        return call

    def set_timesteps(self, pipe, steps: int, height: int, width: int) -> None:
        """Flux2Pipeline's sigmas and its empirical shift (image tokens and step count)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        gh, gw = _grid(pipe, height, width)
        mu = compute_empirical_mu(image_seq_len=gh * gw, num_steps=steps)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        device = pipe._execution_device
        if sigmas is None:
            pipe.scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            pipe.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def initial_noise(self, pipe, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        net = pipe.transformer
        noise = randn_tensor((1, net.config.in_channels, latent_hw[0] // PACK, latent_hw[1] // PACK),
                             generator=generator, device=pipe._execution_device, dtype=net.dtype)
        return pipe._pack_latents(noise)

    def pack(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        """The autoencoder's latent as Flux2Pipeline encodes an image: patchified, batch-normalised, packed."""
        mean, std = _batch_norm(pipe, latent)
        return pipe._pack_latents((pipe._patchify_latents(latent) - mean) / std)

    def unpack(self, pipe, latent: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        tokens = latent.shape[1]
        if height is None or width is None:
            side = round(tokens**0.5)
            grid = (side, side)
        else:
            grid = _grid(pipe, height, width)
        patches = latent.transpose(1, 2).reshape(latent.shape[0], latent.shape[2], *grid)
        mean, std = _batch_norm(pipe, patches)
        return pipe._unpatchify_latents(patches * std + mean)

    def pipeline_latents(self, pipe, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Flux2 pipelines take ``latents=`` patchified, (batch, channels, h/2, w/2), and pack them themselves."""
        return latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], latent_hw[0] // PACK,
                                               latent_hw[1] // PACK)

    def tiny(self) -> dict:
        return {"tiny-flux2": tiny_flux2, "tiny-flux2-klein": tiny_flux2_klein}

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """Klein's classifier-free guidance has no counterpart in an inversion on the conditional branch (1);
        Flux2Pipeline's guidance is embedded, so the inversion is made at the edit's own."""
        if _klein(pipe) and not pipe.config.is_distilled:
            return 1.0
        return float(guidance_scale)


def _klein(pipe) -> bool:
    from diffusers import Flux2KleinPipeline

    return isinstance(pipe, Flux2KleinPipeline)


def _render(pipe):
    """prompt → the templated text the pipeline's text encoder reads."""
    tok = pipe.tokenizer
    if _klein(pipe):
        return lambda prompt: tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return lambda prompt: tok.apply_chat_template(format_input([prompt], pipe.system_message)[0], tokenize=False,
                                                  add_generation_prompt=False)


def _grid(pipe, height: int, width: int) -> tuple[int, int]:
    """The image token grid at a pixel size, as Flux2 pipelines' prepare_latents computes it."""
    step = pipe.vae_scale_factor * PACK
    return int(height) // step, int(width) // step


def _batch_norm(pipe, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's batch-norm mean and standard deviation over the patchified channels."""
    bn, eps = pipe.vae.bn, pipe.vae.config.batch_norm_eps
    mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(like.device, like.dtype)
    return mean, std


def _transformer(text_width: int):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * text_width,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def _vae():
    """A 2-level FLUX.2 autoencoder (×2, 4 latent channels) with batch-norm statistics that are not the identity."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             sample_size=32)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


TEXT_WIDTH = 16


def _tiny(pipeline, tok, llm: str, text_layers: int):
    """A small random FLUX.2 pipeline of class ``pipeline`` around a chat LLM of kind ``llm`` (:func:`tiny.llm`),
    32 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with parts.seeded():
        vae, transformer = _vae(), _transformer(TEXT_WIDTH)
        encoder = parts.llm(llm, len(tok), TEXT_WIDTH, text_layers, tok.pad_token_id)
        pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                        text_encoder=encoder, tokenizer=tok)
    pipe.default_sample_size = 16
    return pipe


def tiny_flux2():
    """A small random Flux2Pipeline (FLUX.2 [dev]'s layout: double- and single-stream blocks, a Mistral-style chat LLM
    whose hidden states 10, 20 and 30 are the text, the system message in the template), 32 px, the same weights on
    every call. A byte-level word tokenizer (:func:`probe.families.words.chat`) stands in for Mistral's."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return _tiny(Flux2Pipeline, words.chat([SYSTEM_MESSAGE]), "mistral", DEV_TEXT_LAYERS)


def tiny_flux2_klein():
    """A small random Flux2KleinPipeline (FLUX.2 [klein]: a Qwen3-style chat LLM whose hidden states 9, 18 and 27 are
    the text, classifier-free guidance as separate cond / uncond passes), 32 px, the same weights on every call."""
    from diffusers import Flux2KleinPipeline

    return _tiny(Flux2KleinPipeline, words.chat(), "qwen3", KLEIN_TEXT_LAYERS + 1)
