"""Speed of ``probe.steer.guide.generate(objective="ae")`` against diffusers' own Attend-and-Excite pipeline.

Both run on the same pipeline components, prompt, token indices, seed and schedule (A&E's: a gradient step in the
first half of the steps, step size 20·sqrt(linspace(1, 0.5)), refinement at steps 0, 10, 20 while the loss exceeds
1 − {0.05, 0.5, 0.8}, at most 20 iterations), with ``output_type="latent"`` so the VAE does not count. Reported: the
median wall-time ratio ours / diffusers over alternated pairs after one warm-up of each, and the largest absolute
difference between the two final latents (the two implement the same method, so it should be float noise). Ours
runs ``Schedule(tokens="diffusers")``: the softmax over every text slot but the first and last, padding included, as
diffusers' pipeline computes it (the default ``tokens="words"``, official A&E's softmax over the prompt's words, is
another objective: its latents differ from diffusers' by 0.75 on the tiny model at 10 steps, against 3.9e-5 with
diffusers' tokens).

Why ours can be faster: diffusers' ``AttendExciteAttnProcessor`` computes explicit attention probabilities in every
layer of every forward pass (the real CFG pass included) and keeps the 16×16 cross maps; the tap computes explicit
probabilities only in the 16×16 layers during guidance's own passes and uses fused SDPA everywhere else.

    python benchmarks/guidance_speed.py                               # built-in model if present, else SD1.5 arch
    python benchmarks/guidance_speed.py --model sd15 --steps 4 --pairs 3 --threads 2
    python benchmarks/guidance_speed.py --model sd15 --device cuda     # GPU: 64×64 latents, 50 steps, float16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clock, quiet_torch, sd15_pipeline  # noqa: E402

import probe  # noqa: E402
from probe.models import BUILTIN  # noqa: E402
from probe.prompts import subject_indices  # noqa: E402
from probe.steer.guide import Schedule, generate  # noqa: E402

PROMPT = "a red circle and a blue square"
SUBJECTS = ["circle", "square"]
SEED = 0
GUIDANCE = 7.5
AE_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}  # diffusers' defaults (step index → threshold)
AE_ALTER_FRACTION = 0.5  # diffusers' max_iter_to_alter = 25 of 50 steps
TARGET = 0.8  # ours / diffusers on a GPU
DEFAULTS = {  # device → (SD1.5-arch latent side, steps, dtype)
    "cpu": (32, 4, "float32"),
    "cuda": (64, 50, "float16"),
}


@dataclass
class Settings:
    """What one benchmark run uses."""

    model: str
    device: str
    dtype: str
    latent: int | None  # SD1.5 arch only; the other models run at their own size
    steps: int
    pairs: int
    refine: bool
    threads: int

    @property
    def thresholds(self) -> dict[int, float]:
        return {k: v for k, v in AE_THRESHOLDS.items() if k < self.steps} if self.refine else {}

    @property
    def alter(self) -> int:
        return Schedule(alter_fraction=AE_ALTER_FRACTION).alter_steps(self.steps)

    @property
    def pixels(self) -> int | None:
        return self.latent * 8 if self.latent else None

    def describe(self) -> str:
        size = f", {self.latent}×{self.latent} latents" if self.latent else ""
        threads = f", {self.threads} thread{'s' * (self.threads > 1)}" if self.device == "cpu" else ""
        refine = f"refinement at {sorted(self.thresholds)}" if self.thresholds else "no refinement"
        return (f"{self.model}{size}, {self.device} {self.dtype}, {self.steps} steps (A&E on the first {self.alter}, "
                f"{refine}){threads}")


def resolve_model(name: str) -> str:
    """``auto``: the built-in shapes model when its folder exists, else the SD1.5 architecture."""
    if name != "auto":
        return name
    return "shapes" if (BUILTIN["shapes"] / "model_index.json").exists() else "sd15"


def build(s: Settings):
    """(our pipeline, diffusers' A&E pipeline) sharing every component."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )

    dtype = getattr(torch, s.dtype)
    if s.model == "sd15":
        pipe = sd15_pipeline(s.device, dtype)
    else:
        pipe = probe.load(s.model, device=s.device, dtype=None if dtype == torch.float32 else dtype)
    reference = StableDiffusionAttendAndExcitePipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    reference.set_progress_bar_config(disable=True)
    return pipe, reference


def ours(pipe, s: Settings) -> torch.Tensor:
    """A&E through the tap, with diffusers' token softmax, so that both arms compute the same guided generation."""
    schedule = Schedule(thresholds=s.thresholds, alter_fraction=s.alter / s.steps, tokens="diffusers")
    return generate(pipe, PROMPT, subjects=SUBJECTS, seed=SEED, steps=s.steps, schedule=schedule,
                    guidance_scale=GUIDANCE, height=s.pixels, width=s.pixels, output_type="latent",
                    progress=False).latents


def diffusers_ae(reference, indices: list[int], s: Settings) -> torch.Tensor:
    return reference(PROMPT, token_indices=indices, num_inference_steps=s.steps, guidance_scale=GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(SEED), max_iter_to_alter=s.alter,
                     thresholds=s.thresholds, height=s.pixels, width=s.pixels, output_type="latent").images


def timed(device: str, fn, *args) -> tuple[float, torch.Tensor]:
    start = clock(device)
    result = fn(*args)
    return clock(device) - start, result


def run(s: Settings) -> dict:
    pipe, reference = build(s)
    indices = [i for (i,) in subject_indices(pipe, PROMPT, SUBJECTS)]
    ours(pipe, s)  # warm-up of each
    diffusers_ae(reference, indices, s)
    mine, theirs, ratios, diff = [], [], [], 0.0
    for i in range(s.pairs):
        t_ours, a = timed(s.device, ours, pipe, s)
        t_ref, b = timed(s.device, diffusers_ae, reference, indices, s)
        mine.append(t_ours)
        theirs.append(t_ref)
        ratios.append(t_ours / t_ref)
        diff = max(diff, float((a.float() - b.float()).abs().max()))
        print(f"  pair {i + 1}/{s.pairs}: ours {t_ours:.2f} s, diffusers {t_ref:.2f} s, ratio {t_ours / t_ref:.3f}, "
              f"max latent difference {diff:.2e}", flush=True)
    median = statistics.median(ratios)
    return {"ours_s": mine, "diffusers_s": theirs, "ratios": ratios, "median_ratio": median,
            "max_latent_diff": diff, "target": TARGET, "met": median <= TARGET}


def table(s: Settings, r: dict) -> str:
    """The result as a Markdown table."""
    detail = (f"median of {len(r['ratios'])} pairs; pairs {min(r['ratios']):.3f}–{max(r['ratios']):.3f}; ours "
              f"{statistics.median(r['ours_s']):.2f} s, diffusers {statistics.median(r['diffusers_s']):.2f} s")
    met = "yes" if r["met"] else "no"
    if s.device == "cpu":
        met += " (target is for a GPU)"
    return "\n".join([
        "| benchmark | setting | ours / diffusers | max latent difference | target | met |",
        "|---|---|---|---|---|---|",
        f"| A&E: `probe.steer.guide.generate` vs `StableDiffusionAttendAndExcitePipeline` | {s.describe()} "
        f"| **{r['median_ratio']:.3f}** ({detail}) | {r['max_latent_diff']:.1e} | ≤ {TARGET:.1f} | {met} |",
    ])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto", choices=["auto", "shapes", "sd15", "tiny"],
                   help="auto (default): the built-in shapes model if data/models/shapes exists, else sd15 "
                        "(Stable Diffusion 1.5's architecture with random weights); tiny: the test model")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4 on CPU, 50 on CUDA)")
    p.add_argument("--latent", type=int, help="sd15 latent side (default: 32 on CPU, 64 on CUDA)")
    p.add_argument("--pairs", type=int, default=3, help="timed (ours, diffusers) pairs after the warm-up (default 3)")
    p.add_argument("--no-refine", action="store_true", help="no refinement steps (only the per-step gradient step)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    p.add_argument("--out", type=Path, help="also write the results: .json (everything) or .md (the table)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> Settings:
    latent, steps, dtype = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    model = resolve_model(args.model)
    return Settings(model, args.device, args.dtype or dtype, (args.latent or latent) if model == "sd15" else None,
                    args.steps or steps, args.pairs, not args.no_refine, args.threads or torch.get_num_threads())


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    quiet_torch(args.threads)
    s = settings(args)
    started = time.strftime("%Y-%m-%d %H:%M")
    print(f"guidance speed: {s.describe()}", flush=True)
    result = run(s)
    md = table(s, result)
    header = (f"guidance speed — {started}, torch {torch.__version__}, diffusers "
              f"{__import__('diffusers').__version__}")
    print(f"\n{header}\n\n{md}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps({"started": started, "settings": asdict(s), **result, "table": md},
                                           indent=2))
        else:
            args.out.write_text(f"{header}\n\n{md}\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
