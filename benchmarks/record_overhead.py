"""Overhead of ``probe.record`` on a Stable Diffusion 1.5-sized pipeline (random weights, built offline).

Time: median ratio of wall times recorded / plain generation, same prompt and seed, runs alternated
(plain, recorded, plain, recorded, …) after one warm-up of each, for

  (a) cross-attention maps of every layer and step, head mean (``kinds=("cross",)``);
  (b) cross- plus self-attention maps of every layer with at most 32² queries.

The built-in model (``probe.load("shapes")``, what the notebooks and the lab run) the same way at 50 steps, with 1
and 2 torch threads (``--only builtin``).

attention-map-diffusers (``--only amd``, when the package is installed; it is no dependency of probe): the same
SD1.5-architecture pipeline and generation with every cross-attention map of every layer and step, head mean, under
its ``AttentionCapture`` in ``exact`` mode (maps made during the call) and ``fast`` mode (q and k kept, maps made
by ``compute()`` after it, which is timed with it), against ``probe.record`` of the same maps (every text key:
``keep_padding=True``, as attention-map-diffusers keeps every key) and the plain call, alternated; the maps are
compared (the conditional half of each of its records against probe's, every layer and step).

Memory: peak RSS of streaming 32 vs 8 samples to zarr (``out=….zarr``, ``batch_size=1``), each in a fresh
subprocess, as the peak ratio and as the extra growth above the RSS just before recording per extra MB of
maps; the same in memory (``out=None``) as a contrast that shows the test would catch maps being held.

    python benchmarks/record_overhead.py                      # CPU: 32×32 latents, 3 steps, float32
    python benchmarks/record_overhead.py --device cuda        # GPU: 64×64 latents, 20 steps, float16
    python benchmarks/record_overhead.py --only memory --out benchmarks/results.json
    python benchmarks/record_overhead.py --only builtin       # built-in model: 50 steps, 1 and 2 threads
    python benchmarks/record_overhead.py --only amd --latent 16 --pairs 3 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import clock, peak_rss_mb, quiet_torch, rss_mb, sd15_pipeline  # noqa: E402

import probe  # noqa: E402
from probe.models import attention_layers  # noqa: E402
from probe.record import plan as record_plan  # noqa: E402

PROMPT = "a red circle and a blue square"
SEED = 0
GUIDANCE = 7.5
DEFAULTS = {  # device → (latent side, steps, dtype)
    "cpu": (32, 3, "float32"),
    "cuda": (64, 20, "float16"),
}
TIME_TARGETS = {"cpu": {"a": 1.10, "b": 1.25}, "cuda": {"a": 1.05, "b": 1.15}}
BUILTIN = "shapes"  # the built-in model
BUILTIN_STEPS = 50
BUILTIN_THREADS = (1, 2)
AMD_MODES = ("exact", "fast")  # attention-map-diffusers' two capture modes
AMD_TARGET = 0.95  # probe's time ≤ this × attention-map-diffusers' best mode
MEMORY_TARGET = 1.10
MEMORY_SAMPLES = (8, 32)  # the first few samples still grow allocator caches; 8 is past that
MEMORY_LATENT, MEMORY_STEPS = 32, 2
PLAN_KEYS = ("steps", "kinds", "layers", "height", "width")
CASES = {
    "a": "cross, every layer and step, head mean",
    "b": "cross + self at every layer with ≤ 32² queries, head mean",
}


@dataclass
class Settings:
    """What one benchmark run uses."""

    device: str
    dtype: str
    latent: int
    steps: int
    pairs: int
    threads: int
    memory_samples: tuple[int, int] = MEMORY_SAMPLES
    memory_model: str = "sd15"
    model: str = "sd15"  # what the timing runs on: sd15 (the architecture, random weights) or the built-in model
    scale: int = 8  # pixels per latent cell

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def pixels(self) -> int:
        return self.latent * self.scale

    def describe(self, latent: int | None = None, steps: int | None = None) -> str:
        latent, steps = latent or self.latent, steps or self.steps
        threads = f", {self.threads} thread{'s' * (self.threads > 1)}" if self.device == "cpu" else ""
        size = f"{latent}×{latent} latents ({latent * self.scale} px)"
        model = "SD1.5 arch" if self.model == "sd15" else f"built-in {self.model} model"
        return f"{model}, {self.device} {self.dtype}, {size}, {steps} steps{threads}"


# -- time ------------------------------------------------------------------------------------------------------------


def case_kwargs(case: str, pipe, pixels: int) -> dict:
    """``probe.record`` keywords of a timing case."""
    if case == "a":
        return {"kinds": ("cross",)}
    small = [layer.name for layer in attention_layers(pipe, pixels, pixels) if layer.grid[0] * layer.grid[1] <= 1024]
    return {"kinds": ("cross", "self"), "layers": small}


def plain_run(pipe, s: Settings) -> np.ndarray:
    """The pipeline call without any tap."""
    return pipe(
        PROMPT, num_inference_steps=s.steps, generator=torch.Generator(s.device).manual_seed(SEED),
        guidance_scale=GUIDANCE, output_type="np", height=s.pixels, width=s.pixels,
    ).images


def recorded_run(pipe, s: Settings, kwargs: dict) -> np.ndarray:
    """The same generation through ``probe.record``, in memory."""
    tree = probe.record(
        pipe, PROMPT, seeds=[SEED], steps=s.steps, guidance_scale=GUIDANCE, progress=False,
        height=s.pixels, width=s.pixels, **kwargs,
    )
    return tree["images"]["image"].values


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as the recording stores them."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def timed(device: str, fn, *args):
    """(wall seconds, process CPU seconds, result) of one call, the device synchronized before each clock read."""
    start, cpu = clock(device), time.process_time()
    result = fn(*args)
    return clock(device) - start, time.process_time() - cpu, result


def time_case(pipe, s: Settings, case: str) -> dict:
    """Alternate plain and recorded runs of one case; the per-pair ratios and their median."""
    kwargs = case_kwargs(case, pipe, s.pixels)
    plan = record_plan(pipe, PROMPT, seeds=[SEED], steps=s.steps, height=s.pixels, width=s.pixels, **kwargs)
    n_layers = sum(len(v) for v in plan.groups.values())
    plain_run(pipe, s)  # warm-up of each
    recorded_run(pipe, s, kwargs)
    plain, recorded, ratios, cpu_ratios, diff = [], [], [], [], 0
    for i in range(s.pairs):
        tp, cp, image = timed(s.device, plain_run, pipe, s)
        tr, cr, rec_image = timed(s.device, recorded_run, pipe, s, kwargs)
        plain.append(tp)
        recorded.append(tr)
        ratios.append(tr / tp)
        cpu_ratios.append(cr / cp)
        diff = max(diff, int(np.abs(to_uint8(image).astype(int) - rec_image).max()))
        print(f"  ({case}) pair {i + 1}/{s.pairs}: plain {tp:.2f} s, recorded {tr:.2f} s, ratio {tr / tp:.3f} "
              f"(process CPU time: {cp:.2f} s, {cr:.2f} s, ratio {cr / cp:.3f})", flush=True)
    median = statistics.median(ratios)
    target = TIME_TARGETS["cuda" if s.device.startswith("cuda") else "cpu"][case]
    return {
        "case": case, "what": CASES[case], "setting": s.describe(), "layers": n_layers, "groups": sorted(plan.groups),
        "recording_mb": plan.nbytes / 1e6, "plain_s": plain, "recorded_s": recorded, "ratios": ratios,
        "cpu_ratios": cpu_ratios, "median_cpu_ratio": statistics.median(cpu_ratios), "median_ratio": median,
        "target": target, "met": median <= target, "max_pixel_diff": diff,
    }


def builtin_rows(s: Settings, steps: int, threads: tuple[int, ...]) -> list[dict]:
    """Both timing cases on the built-in model at ``steps`` steps, for each torch thread count."""
    pipe = probe.load(BUILTIN)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        b = dataclasses.replace(s, model=BUILTIN, latent=pipe.unet.config.sample_size, scale=pipe.vae_scale_factor,
                                steps=steps, threads=n)
        for case in CASES:
            print(f"time ({case}), {b.describe()}: {CASES[case]}", flush=True)
            rows.append(time_case(pipe, b, case))
    torch.set_num_threads(s.threads)
    return rows


# -- attention-map-diffusers -----------------------------------------------------------------------------------------


def amd_installed() -> bool:
    """Whether attention-map-diffusers can be imported (a benchmark-only package: ``pip install
    attention-map-diffusers``)."""
    try:
        import attention_map_diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def amd_run(pipe, s: Settings, mode: str):
    """The plain generation under attention-map-diffusers' capture of every cross-attention map (``image->text``)
    of every layer and step, head mean; its maps made (``compute()``: fast mode makes them here)."""
    from attention_map_diffusers import AttentionCapture

    with AttentionCapture(pipe, relations="image->text", layers="all", timesteps="all", heads="mean",
                          mode=mode) as capture:
        plain_run(pipe, s)
    return capture.compute()


def probe_maps_run(pipe, s: Settings) -> xr.DataTree:
    """``probe.record`` of the same maps: every cross layer and step, head mean, every text key."""
    return probe.record(pipe, PROMPT, seeds=[SEED], steps=s.steps, guidance_scale=GUIDANCE, progress=False,
                        height=s.pixels, width=s.pixels, kinds=("cross",), keep_padding=True)


def amd_max_difference(tree: xr.DataTree, maps) -> tuple[float, int]:
    """Largest |probe − attention-map-diffusers| over every map both hold (its records' conditional half, the
    second of the pipeline's [unconditional; conditional] batch), and how many maps were compared."""
    where = {}
    for group in tree["cross"].children:
        attn = tree[f"cross/{group}"]["attn"]
        for name in attn.layer.values:
            where[f"unet.{name}"] = attn
    worst, compared = 0.0, 0
    for record in maps.records:
        attn = where[record.layer_id]
        ours = attn.sel(sample=0, step=record.step_index, layer=record.layer_id.removeprefix("unet.")).values
        theirs = record.data[-1, 0].float().cpu().numpy()  # (queries, keys) of the conditional row
        ours = ours.reshape(theirs.shape).astype(np.float32)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        compared += 1
    return worst, compared


def amd_rows(s: Settings) -> list[dict]:
    """Plain, probe and attention-map-diffusers' two modes on the SD1.5 architecture, alternated (the order
    rotated each round) after one warm-up of each."""
    print(f"attention-map-diffusers vs probe: building the pipeline ({s.describe()}) …", flush=True)
    pipe = sd15_pipeline(s.device, s.torch_dtype)
    arms = {"plain": lambda: plain_run(pipe, s), "probe": lambda: probe_maps_run(pipe, s),
            **{mode: (lambda mode=mode: amd_run(pipe, s, mode)) for mode in AMD_MODES}}
    results = {name: fn() for name, fn in arms.items()}  # warm-up
    difference, compared = amd_max_difference(results["probe"], results["exact"])
    fast_difference, _ = amd_max_difference(results["probe"], results["fast"])
    del results
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for i in range(s.pairs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            t, _, _ = timed(s.device, arms[name])
            times[name].append(t)
        print(f"  round {i + 1}/{s.pairs}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    best = min(AMD_MODES, key=lambda m: med[m])
    ratio = med["probe"] / med[best]
    return [{"setting": s.describe(), "times_s": times, "median_s": med, "best_mode": best, "ratio": ratio,
             "target": AMD_TARGET, "met": ratio <= AMD_TARGET, "max_map_diff": difference,
             "max_map_diff_fast": fast_difference, "maps_compared": compared}]


# -- memory ----------------------------------------------------------------------------------------------------------


def memory_kwargs(pipe, pixels: int) -> dict:
    """Cross maps everywhere plus self maps at the two finest grids (16² and 32² at 32×32 latents)."""
    layers = attention_layers(pipe, pixels, pixels)
    finest = sorted({layer.grid[0] for layer in layers})[-2:]
    names = [layer.name for layer in layers if layer.kind == "cross" or layer.grid[0] in finest]
    return {"kinds": ("cross", "self"), "layers": names}


def memory_worker(mode: str, n: int, s: Settings) -> dict:
    """In a fresh process: build, warm up with a 1-sample recording, then record ``n`` samples."""
    if s.memory_model == "sd15":
        pipe, pixels = sd15_pipeline(s.device, s.torch_dtype), MEMORY_LATENT * 8
    else:  # the built-in model: fast enough to stream hundreds of samples
        pipe = probe.load(s.memory_model)
        pixels = pipe.unet.config.sample_size * pipe.vae_scale_factor
    common = {"steps": MEMORY_STEPS, "guidance_scale": GUIDANCE, "batch_size": 1, "progress": False,
              "height": pixels, "width": pixels, **memory_kwargs(pipe, pixels)}
    seeds = list(range(n))
    size = record_plan(pipe, PROMPT, seeds=seeds, **{k: v for k, v in common.items() if k in PLAN_KEYS}).nbytes
    with tempfile.TemporaryDirectory(prefix="record_overhead_") as tmp:
        warm = probe.record(pipe, PROMPT, seeds=[1000], out=Path(tmp, "warm.zarr") if mode == "zarr" else None,
                            **common)
        del warm
        gc.collect()
        before, peak_before = rss_mb(), peak_rss_mb()
        if s.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            device_before = torch.cuda.memory_allocated() / 2**20
        tree = probe.record(pipe, PROMPT, seeds=seeds, out=Path(tmp, "rec.zarr") if mode == "zarr" else None,
                            **common)
        peak = peak_rss_mb()
        result = {
            "mode": mode, "samples": n, "rss_before_mb": before, "peak_before_mb": peak_before, "peak_mb": peak,
            "growth_mb": peak - before, "recording_mb": size / 1e6, "pixels": pixels,
        }
        if s.device.startswith("cuda"):
            result["device_growth_mb"] = torch.cuda.max_memory_allocated() / 2**20 - device_before
        del tree
    return result


def run_worker(mode: str, n: int, s: Settings) -> dict:
    """Run :func:`memory_worker` in a fresh interpreter so that peaks don't mix."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(n), "--device", s.device,
           "--dtype", s.dtype, "--threads", str(s.threads), "--memory-model", s.memory_model]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {mode} {n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(s: Settings) -> list[dict]:
    """Big vs small sample counts, streamed to zarr (the target) and in memory (the contrast)."""
    rows = []
    for mode in ("zarr", "memory"):
        small, big = (run_worker(mode, n, s) for n in s.memory_samples)
        print(f"  memory {mode}: {small} | {big}", flush=True)
        row = {
            "mode": mode, "small": small, "big": big,
            "peak_ratio": big["peak_mb"] / small["peak_mb"],
            "growth_per_mb": (big["growth_mb"] - small["growth_mb"]) / (big["recording_mb"] - small["recording_mb"]),
        }
        if "device_growth_mb" in small:
            row["device_growth_ratio"] = big["device_growth_mb"] / small["device_growth_mb"]
        rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------------------------------------


def table(s: Settings, timing: list[dict], memory: list[dict], amd: list[dict] = ()) -> str:
    """The results as a Markdown table."""
    lines = ["| benchmark | setting | measured | target | met |", "|---|---|---|---|---|"]
    for r in timing:
        detail = (f"median of {len(r['ratios'])} pairs; pairs {min(r['ratios']):.3f}–{max(r['ratios']):.3f}; "
                  f"plain {statistics.median(r['plain_s']):.2f} s, recorded {statistics.median(r['recorded_s']):.2f} s")
        if s.device == "cpu":
            detail += f"; process-CPU-time ratio {r['median_cpu_ratio']:.3f}"
        lines.append(
            f"| time ({r['case']}) {r['what']} ({r['layers']} layers, {r['recording_mb']:.1f} MB/sample) "
            f"| {r['setting']} | **{r['median_ratio']:.3f}** ({detail}) | ≤ {r['target']:.2f} "
            f"| {'yes' if r['met'] else 'NO'} |"
        )
    for r in amd:
        med, times = r["median_s"], r["times_s"]
        spread = "; ".join(f"{n} {med[n]:.2f} s ({min(v):.2f}–{max(v):.2f})" for n, v in times.items())
        lines.append(
            f"| probe / attention-map-diffusers' best mode ({r['best_mode']}), every cross map of every layer and "
            f"step, head mean | {r['setting']} | **{r['ratio']:.3f}** (medians of {len(times['plain'])} rounds: "
            f"{spread}; probe / plain {med['probe'] / med['plain']:.3f}, exact / plain "
            f"{med['exact'] / med['plain']:.3f}, fast / plain {med['fast'] / med['plain']:.3f}; max map difference "
            f"{r['max_map_diff']:.1e} vs exact, {r['max_map_diff_fast']:.1e} vs fast, over {r['maps_compared']} "
            f"maps) | ≤ {r['target']:.2f} | {'yes' if r['met'] else 'NO'} |")
    for r in memory:
        a, b = r["small"], r["big"]
        n0, n1 = a["samples"], b["samples"]
        model = (s.describe(MEMORY_LATENT, MEMORY_STEPS) if s.memory_model == "sd15" else
                 f"built-in {s.memory_model} model, {b['pixels']} px, {MEMORY_STEPS} steps, {s.threads} thread(s)")
        setting = (f"{model}; cross everywhere + self at the two finest grids, "
                   f"{b['recording_mb'] / n1:.1f} MB/sample, batch_size 1, fresh process each")
        if r["mode"] == "zarr":
            name, target = "memory: stream to zarr", f"≤ {MEMORY_TARGET:.2f}"
        else:
            name, target = "contrast: in memory (`out=None`)", "none (should exceed 1.1)"
        ratio = r["peak_ratio"]
        lines.append(f"| {name}, {n1} vs {n0} samples, peak RSS | {setting} | **{ratio:.3f}** "
                     f"({a['peak_mb']:.0f} → {b['peak_mb']:.0f} MB) | {target} "
                     f"| {('yes' if ratio <= MEMORY_TARGET else 'NO') if r['mode'] == 'zarr' else '—'} |")
        extra = b["recording_mb"] - a["recording_mb"]
        lines.append(f"| {name}, {n1} vs {n0} samples, extra peak growth per extra MB recorded | {setting} "
                     f"| **{r['growth_per_mb']:.2f}** (growth above pre-recording RSS {a['growth_mb']:.0f} → "
                     f"{b['growth_mb']:.0f} MB for {extra:.0f} MB more maps) | "
                     f"{'well below the contrast' if r['mode'] == 'zarr' else '— (contrast)'} | — |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="timed (plain, recorded) pairs after the warm-up (default 5)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--latent", type=int, help="latent side (default: 32 on CPU, 64 on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    p.add_argument("--memory-samples", type=int, nargs=2, default=MEMORY_SAMPLES, metavar=("SMALL", "BIG"),
                   help=f"samples streamed by the two memory runs (default {MEMORY_SAMPLES[0]} {MEMORY_SAMPLES[1]})")
    p.add_argument("--memory-model", default="sd15",
                   help="sd15 (default: SD1.5 architecture at 32×32 latents) or shapes (the built-in model, 64 px)")
    p.add_argument("--only", choices=["time", "builtin", "amd", "memory"],
                   help="run one benchmark (default all: amd only where attention-map-diffusers is installed)")
    p.add_argument("--builtin-steps", type=int, default=BUILTIN_STEPS, help="steps on the built-in model (50)")
    p.add_argument("--builtin-threads", type=int, nargs="+", default=BUILTIN_THREADS,
                   help="torch thread counts on the built-in model (default 1 2)")
    p.add_argument("--out", type=Path, help="also write the results: .json (everything) or .md (the table)")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> Settings:
    latent, steps, dtype = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    return Settings(args.device, args.dtype or dtype, args.latent or latent, args.steps or steps, args.pairs,
                    args.threads or torch.get_num_threads(), tuple(args.memory_samples),
                    args.memory_model)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    quiet_torch(args.threads)
    s = settings(args)
    if args.worker:
        print(json.dumps(memory_worker(args.worker[0], int(args.worker[1]), s)))
        return
    started = time.strftime("%Y-%m-%d %H:%M")
    timing, memory, amd = [], [], []
    if args.only in (None, "builtin"):
        timing += builtin_rows(s, args.builtin_steps, tuple(args.builtin_threads))
    if args.only in (None, "amd"):
        if amd_installed():
            amd = amd_rows(s)
        else:
            print("attention-map-diffusers is not installed: its comparison is skipped (pip install "
                  "attention-map-diffusers; a benchmark-only package, no dependency of probe)", flush=True)
    if args.only in (None, "time"):
        print(f"building the pipeline ({s.describe()}) …", flush=True)
        pipe = sd15_pipeline(s.device, s.torch_dtype)
        for case in CASES:
            print(f"time ({case}): {CASES[case]}", flush=True)
            timing.append(time_case(pipe, s, case))
        del pipe
        gc.collect()
    if args.only in (None, "memory"):
        print("memory: streaming vs in memory, each in a fresh process …", flush=True)
        memory = memory_rows(s)
    md = table(s, timing, memory, amd)
    header = (f"record overhead — {started}, torch {torch.__version__}, diffusers "
              f"{__import__('diffusers').__version__}" + (f", {s.describe()}" if timing else ""))
    print(f"\n{header}\n\n{md}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps({"started": started, "settings": asdict(s), "torch": torch.__version__,
                                            "timing": timing, "memory": memory, "amd": amd, "table": md},
                                           indent=2))
        else:
            args.out.write_text(f"{header}\n\n{md}\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
