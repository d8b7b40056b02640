"""Seconds per training step of the built-in model's UNet + text encoder (forward, backward, AdamW; batch 64 of
16×16×4 latents, no data loading), for the architecture choices the model card compares, side by side in one run.

    python benchmarks/train_step.py [--threads 2] [--steps 8] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from probe.shapes import model as M

VARIANTS = {
    "first model: 8 heads, 0 text layers": {},
    "2 heads": {"attention_head_dim": 2},
    "2 heads, channels-last": {"attention_head_dim": 2, "_channels_last": True},
    "2 heads, 1 causal text layer (the testbed)": {"attention_head_dim": 2, "text_layers": 1},
}


def seconds_per_step(changes: dict, steps: int, batch: int, compile_unet: bool) -> float:
    changes = dict(changes)
    channels_last = changes.pop("_channels_last", False)
    cfg = replace(M.ShapesConfig(), **changes)
    torch.manual_seed(0)
    unet, text = M.unet(cfg), M.text_encoder(cfg, 934)
    x = torch.randn(batch, 4, 16, 16)
    if channels_last:
        unet, x = unet.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    net = torch.compile(unet) if compile_unet else unet
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], 1e-3)
    ids, t = torch.randint(0, 930, (batch, 32)), torch.randint(0, 1000, (batch,))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = F.mse_loss(net(x, t, text(ids).last_hidden_state).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = None
    for name, changes in VARIANTS.items():
        for compiled in (False, True) if args.compile else (False,):
            s = seconds_per_step(changes, args.steps, args.batch, compiled)
            base = base or s
            print(f"| {name}{' (torch.compile)' if compiled else ''} | {s:.3f} | {s / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
