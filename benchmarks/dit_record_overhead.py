"""Overhead of ``probe.record`` on diffusion transformers: SD3- and FLUX-architecture transformers at reduced size
(random weights, built offline; the text encoders are the tiny built-ins', whose cost is the same in both arms).

Median ratio of wall times recorded / plain, same prompt and seed, alternated after one warm-up of each, for
(a) cross-attention maps of every block and step, head mean; (b) cross + self at every block, head mean.

    python benchmarks/dit_record_overhead.py --threads 1                 # CPU: reduced size, 256 image tokens
    python benchmarks/dit_record_overhead.py --device cuda --full        # GPU: the full-size architectures, 1024 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clock, quiet_torch  # noqa: E402

import probe  # noqa: E402

PROMPT = "a red circle and a blue square"
MAX_SEQUENCE = 64
CASES = {"a": ("cross",), "b": ("cross", "self")}
TARGETS = {"a": 1.10, "b": 1.25}


def _pipeline(family: str, full: bool, device: str, dtype: torch.dtype):
    """The tiny built-in with its transformer swapped for a reduced (or full-size) architecture."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    pipe = probe.load(f"tiny-{family}")
    torch.manual_seed(0)
    if family == "sd3":
        size = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24) if full else dict(
            num_layers=6, attention_head_dim=64, num_attention_heads=8)
        pipe.transformer = SD3Transformer2DModel(
            sample_size=64 if not full else 128, patch_size=2, in_channels=4, out_channels=4, joint_attention_dim=32,
            caption_projection_dim=size["attention_head_dim"] * size["num_attention_heads"], pooled_projection_dim=32,
            pos_embed_max_size=64 if not full else 192, qk_norm="rms_norm", **size)
        pipe.default_sample_size = pipe.transformer.config.sample_size
    else:
        size = dict(num_layers=19, num_single_layers=38, num_attention_heads=24) if full else dict(
            num_layers=2, num_single_layers=4, num_attention_heads=8)
        pipe.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, attention_head_dim=128 if full else 64, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(16, 56, 56) if full else (8, 28, 28),
            **size)
        pipe.default_sample_size = 128 if full else 32
    return pipe.to(device=device, dtype=dtype)


def _time(fn, device: str) -> float:
    start = clock(device)
    fn()
    return clock(device) - start


def run(family: str, steps: int, pairs: int, full: bool, device: str, dtype: torch.dtype) -> list[dict]:
    pipe = _pipeline(family, full, device, dtype)
    tokens = probe.models.attention_layers(pipe)[0].grid
    kw = {"num_inference_steps": steps, "max_sequence_length": MAX_SEQUENCE, "guidance_scale": 7.5}

    def plain():
        pipe(PROMPT, generator=torch.Generator(device).manual_seed(0), output_type="np", **kw)

    rows = []
    for case, kinds in CASES.items():
        def recorded(kinds=kinds):
            probe.record(pipe, PROMPT, seeds=[0], steps=steps, kinds=kinds, progress=False,
                         max_sequence_length=MAX_SEQUENCE)

        plain(), recorded()  # warm-up
        times = [(_time(plain, device), _time(recorded, device)) for _ in range(pairs)]
        ratios = [r / p for p, r in times]
        rows.append({"family": family, "case": case, "kinds": list(kinds), "image_tokens": tokens[0] * tokens[1],
                     "steps": steps, "ratio": statistics.median(ratios), "pairs": [round(x, 3) for x in ratios],
                     "plain_s": statistics.median(p for p, _ in times), "target": TARGETS[case]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="full-size architectures (a GPU run)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    quiet_torch(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = [r for family in ("sd3", "flux") for r in run(family, args.steps, args.pairs, args.full, args.device, dtype)]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
