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


def sd15_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder, DDIM) with random weights.

    Built offline and deterministically (torch is seeded first); nothing is read from or written to disk
    except the project's tokenizer.
    """
    tok = project_tokenizer()
    vocab = len(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
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


def quiet_torch(threads: int) -> None:
    """A benchmark's start: torch's CPU threads (0: torch's own choice) and diffusers' logging off."""
    from diffusers.utils import logging as dlogging

    if threads:
        torch.set_num_threads(threads)
    dlogging.set_verbosity_error()
