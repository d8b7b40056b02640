"""Helpers shared by the benchmarks: an offline SD 1.5 pipeline, clocks and memory readings."""

from __future__ import annotations

import resource
import sys
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import probe
from probe.models import project_tokenizer

SEED = 0


def _clip_text(tok, hidden: int, layers: int, heads: int, intermediate: int, projection: int | None = None,
               act: str = "quick_gelu"):
    """A CLIP text encoder of this size over the project's tokenizer (with a projection: SDXL's second encoder)."""
    from transformers import CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(tiny: bool) -> AutoencoderKL:
    """Stable Diffusion's VAE (8× down); tiny: 2 narrow blocks (2× down), so a 32 px image has 16×16 latents."""
    blocks = (32, 32) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
        sample_size=32 if tiny else 512, block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
    )


def sd15_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32,
                  tiny: bool = False) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder, DDIM) with random weights.

    Built offline and deterministically (torch is seeded first), the models on ``device`` (a GPU initialises a billion
    random weights in seconds, a CPU in tens of seconds); nothing is read from or written to disk except the
    project's tokenizer. ``tiny``: the same layout with narrow blocks, one layer each and a 2-block VAE
    (32 px images), for a quick check of a benchmark on the CPU.
    """
    tok = project_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised where they run: seconds on a GPU
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=16 if tiny else 64, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
            block_out_channels=(32, 32, 64, 64) if tiny else (320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32 if tiny else 768, attention_head_dim=8, norm_num_groups=32,
        )
        vae = _vae(tiny)
        text = _clip_text(tok, 32, 2, 2, 64) if tiny else _clip_text(tok, 768, 12, 12, 3072)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    return probe.load(pipe)  # disables the progress bar


def sdxl_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32, tiny: bool = False):
    """Stable Diffusion XL's architecture (the base UNet: 320/640/1280 channels, 1/2/10 transformer layers, heads of
    64; CLIP ViT-L and OpenCLIP bigG text encoders; Euler) with random weights, built offline as
    :func:`sd15_pipeline`; ``tiny``: the same layout, narrow, for a quick check on the CPU (32 px)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = project_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        if tiny:
            text, text_2 = _clip_text(tok, 32, 2, 2, 64), _clip_text(tok, 32, 2, 2, 64, projection=32, act="gelu")
        else:
            text = _clip_text(tok, 768, 12, 12, 3072)
            text_2 = _clip_text(tok, 1280, 32, 20, 5120, projection=1280, act="gelu")
        time_dim = 8 if tiny else 256
        unet = UNet2DConditionModel(
            sample_size=16 if tiny else 128, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
            block_out_channels=(32, 64, 64) if tiny else (320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2) if tiny else (1, 2, 10),
            attention_head_dim=(2, 2, 2) if tiny else (5, 10, 20),  # heads per block, as SDXL's config names them
            cross_attention_dim=text.config.hidden_size + text_2.config.hidden_size, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text_2.config.projection_dim,
            norm_num_groups=32,
        )
        vae = _vae(tiny)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=project_tokenizer(), unet=unet, scheduler=scheduler)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    return probe.load(pipe)


def synchronize(device: str) -> None:
    """Wait for queued device work, so that a clock read after it covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def clock(device: str) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """Current resident set size in MB (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak(device: str) -> None:
    """Start a new peak of the device's allocated memory (CUDA; nothing elsewhere)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    """The device's peak allocated memory since :func:`reset_peak`, in GiB (``torch.cuda.max_memory_allocated``);
    None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None


def quiet_torch(threads: int) -> None:
    """A benchmark's start: torch's CPU threads (0: torch's own choice) and diffusers' logging off."""
    from diffusers.utils import logging as dlogging

    if threads:
        torch.set_num_threads(threads)
    dlogging.set_verbosity_error()
