"""What a family of denoisers differs in: its attention layout (which modules hold which kinds, their grids, where the
image and text tokens sit in each softmax) and everything else the library runs outside the pipeline's own loop
(text encoding and token layout, schedule, initial noise, latent packing, how a real image is inverted).

Code outside :mod:`probe.families` asks the family (``family_of(denoiser(pipe))``), never the model's name or class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from probe.families.layout import Layer, Split, denoiser

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(latents, t): the denoiser on one prompt
TextPart = tuple[str, object, int]  # (encoder name, tokenizer, positions it takes among the text keys)


class Family:
    """How one kind of denoiser lays out its attention and is driven (one subclass a file: UNet, SD3, FLUX …)."""

    name = ""
    title = ""  # for messages: "SD3 / SD3.5"
    flow = False  # flow matching (Euler sampler over σ): real images are inverted by walking σ upwards
    self_qk = False  # self-attention is its own softmax over image keys: its maps can be rebuilt from q and k

    conditional_first = False  # the pipeline's classifier-free guidance batch is [conditional; unconditional]
    reference_inputs: tuple[str, ...] = ()  # optional image inputs of a text-to-image pipeline (reference images)

    # -- attention layout (the tap) --
    def matches(self, net) -> bool:
        raise NotImplementedError

    def unmapped(self, net) -> dict[str, str]:
        """Kinds of attention this denoiser computes without a softmax → why: it has no map of them to record, guide
        with or inject, so asking for one is refused with the reason (none by default)."""
        return {}

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        """Every attention module of ``net`` → the kinds it holds (an unknown module is an error)."""
        raise NotImplementedError

    def latent(self, pipe) -> tuple[int, int]:
        """The pipeline's default latent size (h, w) in latent pixels."""
        raise NotImplementedError

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Query grid of the image tokens of module ``name`` at a latent size."""
        raise NotImplementedError

    def pixel_multiple(self, pipe) -> int:
        """What an image side must be a multiple of (autoencoder scale × the UNet's downsamplings or a
        transformer's patches, and whatever the pipeline itself checks)."""
        raise NotImplementedError

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        """Read what a call of the denoiser tells about token counts and grids (before it runs)."""

    def cfg_call(self, pipe, state) -> bool:
        """Whether the pipeline's own denoiser call now running (after :meth:`observe`) holds both classifier-free
        guidance halves: where the pipeline guides, every call does unless the family knows otherwise."""
        return bool(getattr(pipe, "do_classifier_free_guidance", False))

    def split(self, attn, hidden_states: torch.Tensor, encoder_hidden_states, state) -> Split:
        """Where the image and text tokens of this call's softmax sit."""
        raise NotImplementedError

    def runtime_grid(self, layer: Layer, hidden_states: torch.Tensor, state) -> tuple[int, int]:
        """The query grid at the size actually being generated."""
        return layer.grid

    # -- text --
    def text_parts(self, pipe, max_sequence_length: int | None) -> list[TextPart]:
        """The tokenizers whose positions make up the denoiser's text keys, in order, with their lengths."""
        raise NotImplementedError

    def text_keys_tokenizer(self, pipe):
        """The tokenizer whose positions start the denoiser's text keys."""
        return self.text_parts(pipe, None)[0][1]

    # -- running the denoiser outside the pipeline's loop (guidance, inversion) --
    def conditioned(self, pipe, prompt: str, height: int, width: int, max_sequence_length: int | None,
                    guidance: float) -> Velocity:
        """``f(latents, t)``: the denoiser on the conditional branch of ``prompt``, as the pipeline calls it
        (``guidance``: guidance embedded in the denoiser's input, where the family has it; ignored otherwise)."""
        raise NotImplementedError

    def set_timesteps(self, pipe, steps: int, height: int, width: int) -> None:
        """Set the scheduler's timesteps as the pipeline itself will."""
        pipe.scheduler.set_timesteps(steps, device=pipe._execution_device)

    def initial_noise(self, pipe, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The noise the pipeline draws from ``generator`` for one image, in its latent layout."""
        net = denoiser(pipe)
        return randn_tensor((1, net.config.in_channels, *latent_hw), generator=generator,
                            device=pipe._execution_device, dtype=net.dtype)

    def to_latent(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] → the image's (1, channels, h, w) latent as the pipeline samples in it (before
        :meth:`pack`): an ``AutoencoderKL``'s mean, less its shift, times its scale (1 where its config has none)."""
        vae = pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (vae.encode(pixels.to(vae.dtype)).latent_dist.mean - shift) * _scaling(vae)

    def to_pixels(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        """The inverse, as the pipeline decodes: an unpacked latent → (1, 3, H, W) pixels in [-1, 1]."""
        vae = pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latent.to(vae.dtype) / _scaling(vae) + shift).sample

    def pack(self, pipe, latent: torch.Tensor) -> torch.Tensor:
        """A (1, channels, h, w) VAE latent in the layout the denoiser samples in."""
        return latent

    def unpack(self, pipe, latent: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        """The inverse of :meth:`pack` (an image size of None: the one a square latent implies)."""
        return latent

    def pipeline_latents(self, pipe, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Latents of the sampling layout (what :meth:`initial_noise` gives and the step callback sees) as the
        pipeline's ``latents=`` argument takes them, at a latent size (h, w)."""
        return latents

    # -- small random pipelines for tests and benchmarks --
    def tiny(self) -> dict[str, Callable]:
        """Name → builder of this family's small random pipelines (``probe.load(name)`` builds them)."""
        return {}

    # -- guidance as the edit and the inversion see it --
    def embeds_guidance(self, net) -> bool:
        """Whether guidance is an input of the denoiser (so an inversion is made for one guidance value)."""
        return False

    def inversion_guidance(self, pipe, guidance_scale: float) -> float:
        """The guidance an inversion of this pipeline can be consistent with, for an edit at ``guidance_scale``."""
        return float(guidance_scale)


class Patched(Family):
    """A transformer that cuts its latent into square patches of ``config.patch_size`` latent pixels, one image token
    each (SD3, Sana): the grid is the latent size over the patch, read from the latent of each call."""

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

    def runtime_grid(self, layer: Layer, hidden_states: torch.Tensor, state) -> tuple[int, int]:
        return self.grid(state.net, layer.name, state.latent_hw)


def set_shifted_sigmas(pipe, sigmas, image_tokens: int) -> None:
    """Set a flow-matching scheduler's ``sigmas`` as FLUX-style pipelines do (FLUX.1, Qwen-Image, Z-Image): shifted
    by ``calculate_shift`` of the image token count, with the scheduler's own settings (diffusers' defaults where it
    has none)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    mu = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    pipe.scheduler.set_timesteps(sigmas=sigmas, device=pipe._execution_device, mu=mu)


def _scaling(vae) -> float:
    """An autoencoder's latent scaling factor (1 where its config has none)."""
    return getattr(vae.config, "scaling_factor", None) or 1.0
