"""Overhead of ``probe.record`` on diffusion transformers: SD3-, FLUX.1-, FLUX.2-, Z-Image-, Qwen-Image- and
Sana-architecture transformers at reduced size (random weights, built offline; the text encoders, autoencoders and
tokenizers are the tiny built-ins', whose cost is the same in both arms).

Median ratio of wall times recorded / plain, same prompt, seed, steps and guidance (the scale by the pipeline's own
keyword, as ``probe.record`` passes it), alternated after one warm-up of each, for (a) cross-attention maps of every
block and step, head mean; (b) cross + self at every block, head mean (every relation the family records: Z-Image's
refiners and joint blocks, the joint blocks' text→image and text→text too where asked; Sana has no (b): its
self-attention is linear, without a softmax to record).

    python benchmarks/dit_record_overhead.py --threads 1                 # CPU: every family, reduced size
    python benchmarks/dit_record_overhead.py --families flux2 zimage --pairs 3
    python benchmarks/dit_record_overhead.py --device cuda --full        # GPU: full-size SD3 and FLUX.1, 1024 px
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
from probe.models import generation  # noqa: E402

PROMPT = "a red circle and a blue square"
MAX_SEQUENCE = 64
CASES = {"a": ("cross",), "b": ("cross", "self")}
TARGETS = {"a": 1.10, "b": 1.25}
GUIDANCE = 7.5
FAMILIES = ("sd3", "flux", "flux2", "zimage", "qwen-image", "sana")
REDUCED_PIXELS = 64  # the newer families' tiny autoencoders halve it and their patches halve it again: 16² tokens
WIDTH = {"heads": 8, "head_dim": 64}  # the reduced transformers' attention: 8 heads of 64, as SD3's and FLUX's rows
REDUCED = {  # family → (tiny built-in, transformer config entries changed from the tiny one's)
    "flux2": ("tiny-flux2", {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64,
                             "num_attention_heads": 8, "axes_dims_rope": (16, 16, 16, 16)}),
    "zimage": ("tiny-zimage", {"dim": 512, "n_heads": 8, "n_kv_heads": 8, "n_layers": 4, "n_refiner_layers": 1,
                               "axes_dims": [16, 24, 24]}),
    "qwen-image": ("tiny-qwen-image", {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 8,
                                       "axes_dims_rope": (16, 24, 24)}),
    "sana": ("tiny-sana", {"num_layers": 4, "num_attention_heads": 8, "attention_head_dim": 64,
                           "num_cross_attention_heads": 8, "cross_attention_head_dim": 64,
                           "cross_attention_dim": 512}),
}
UNMAPPED_SELF = {"sana"}  # families whose self-attention has no softmax: case (b) is not run


def _reduced(family: str):
    """A newer family's tiny built-in with its transformer rebuilt at 8 heads of 64 and a few more blocks (the tiny
    one's text, patch and channel sizes kept, so the rest of the pipeline fits it), seeded."""
    name, changes = REDUCED[family]
    pipe = probe.load(name)
    net = pipe.transformer
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = type(net)(**{**config, **changes})
    if family == "zimage":  # random pad tokens, as the tiny one's (they start at zero)
        from probe.families.zimage import _perturb_pad_tokens

        _perturb_pad_tokens(pipe.transformer)
    return pipe


def _pipeline(family: str, full: bool, device: str, dtype: torch.dtype):
    """The tiny built-in with its transformer swapped for a reduced (or, SD3 and FLUX.1, full-size) architecture."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if family in REDUCED:
        return _reduced(family).to(device=device, dtype=dtype)
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
    size = {} if family not in REDUCED else {"height": REDUCED_PIXELS, "width": REDUCED_PIXELS}
    tokens = probe.models.attention_layers(pipe, size.get("height"), size.get("width"))[0].grid
    text = {"max_sequence_length": MAX_SEQUENCE} if family in ("sd3", "flux", "flux2", "sana") else {}
    if family == "sana":  # its pipeline would move 64 px to its nearest aspect-ratio bin (1,024 px)
        size["use_resolution_binning"] = False
    kw = {**generation(pipe, steps, GUIDANCE, caller="benchmark").pipeline_kwargs(), **text, **size}

    def plain():
        pipe(prompt=PROMPT, generator=torch.Generator(device).manual_seed(0), output_type="np", **kw)

    rows = []
    for case, kinds in CASES.items():
        if case == "b" and family in UNMAPPED_SELF:
            print(f"{family} ({case}): not run: its self-attention is linear, without a softmax to record", flush=True)
            continue

        def recorded(kinds=kinds):
            probe.record(pipe, PROMPT, seeds=[0], steps=steps, guidance_scale=GUIDANCE, kinds=kinds, progress=False,
                         **text, **size)

        plain(), recorded()  # warm-up
        times = [(_time(plain, device), _time(recorded, device)) for _ in range(pairs)]
        ratios = [r / p for p, r in times]
        rows.append({"family": family, "case": case, "kinds": list(kinds), "image_tokens": tokens[0] * tokens[1],
                     "steps": steps, "ratio": statistics.median(ratios), "pairs": [round(x, 3) for x in ratios],
                     "spread": [round(min(ratios), 3), round(max(ratios), 3)],
                     "plain_s": statistics.median(p for p, _ in times),
                     "recorded_s": statistics.median(r for _, r in times), "target": TARGETS[case],
                     "met": statistics.median(ratios) <= TARGETS[case]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], threads: int) -> str:
    """The rows side by side as a Markdown table."""
    lines = ["| family | case | image tokens | steps | measured (pairs) | plain · recorded s | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pairs = ", ".join(f"{x:.2f}" for x in r["pairs"])
        lines.append(f"| {r['family']} | ({r['case']}) {' + '.join(r['kinds'])} | {r['image_tokens']:,} | {r['steps']} "
                     f"| **{r['ratio']:.3f}** ({pairs}) | {r['plain_s']:.2f} · {r['recorded_s']:.2f} "
                     f"| ≤ {r['target']:.2f} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines) + f"\n\n({threads} thread{'s' * (threads > 1)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="full-size architectures (a GPU run)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                   help="which families (default all; --full applies to sd3 and flux)")
    p.add_argument("--out", default=None, help="write the rows: .json, or .md (the table)")
    args = p.parse_args()
    quiet_torch(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = [r for family in args.families for r in run(family, args.steps, args.pairs, args.full, args.device, dtype)]
    md = table(rows, args.threads)
    print(f"\n{md}")
    if args.out:
        Path(args.out).write_text(md + "\n" if args.out.endswith(".md") else json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
