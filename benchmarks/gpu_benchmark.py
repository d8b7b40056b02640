"""probe on one GPU, side by side with what it wraps: recording against the plain pipeline call, and Attend-and-Excite
through probe's tap against diffusers' own pipeline, on full-width models with random weights.

Recording (``probe.record``, in memory) against ``pipe(...)`` on the same prompt, seed, steps and guidance:
  SD1.5 at 512², SDXL at 1024² (their whole architectures, :mod:`_common`), SD3 (24 joint blocks of 24 × 64) and
  FLUX.1 (19 double- and 38 single-stream blocks of 24 × 128) at 4,096 image tokens, as at 1024²
  (``dit_record_overhead``'s full-size transformers; their text encoders and VAE are the tiny built-ins', whose cost
  is the same in both arms). Arms: ``cross`` (every cross-attention map, head mean), ``cross+self`` (UNets: cross and
  self maps at every layer with ≤ 32² queries, as ``record_overhead`` (b); transformers: every cross map and self
  maps with ``self_keys=16``, since full 4,096² maps of every block and step would not fit a host), ``qk``
  (``self_store="qk"``: every self layer's q and k, where the family has it).
A&E: ``probe.steer.guide.generate(objective="ae")`` against ``StableDiffusionAttendAndExcitePipeline`` on SD1.5 at 512²
  (``guidance_speed``'s runs: the same schedule, refinement and token indices).
attention-map-diffusers (``amd``, where it is installed: ``gpu_wheels.sh`` carries it): ``probe.record`` of every cross
  map (head mean, every text key) against its ``AttentionCapture`` of the same maps in ``exact`` and ``fast`` mode and
  the plain call, SD1.5 at 512²; the ratio is against its faster mode, and the maps are compared.

Each arm runs once to warm up, then the arms run in turn, round by round (the order rotated each round); an arm's
time is the median of its rounds, and its ratio is median(arm) / median(baseline). Peak GPU memory is
``torch.cuda.max_memory_allocated`` during a run (the largest over an arm's runs). Writes ``gpu_benchmark.json`` and
``gpu_benchmark.md`` (the table) into ``--out`` (default ``$OUT``, else ``benchmarks/gpu_results``); a stage that
fails or would start after ``--budget`` seconds is reported as such and the others still run.

    bash benchmarks/gpu_wheels.sh                            # here, once: the wheels to carry, into .gpu_wheels/
    bash benchmarks/gpu.sh                                   # on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu_benchmark.py --dry --out /tmp/g    # CPU check: tiny layer counts, 32 px, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

PROMPT = "a red circle and a blue square"
SEED = 0
STAGES = ("sd15", "ae", "amd", "sdxl", "sd3", "flux")  # cheapest first, so a short budget still gives most rows
# a stage's build and runs on an H100 at the defaults, guessed from the models' sizes until a run measures them: a
# stage starts if it should end in budget
EXPECTED_S = {"sd15": 40, "ae": 60, "amd": 45, "sdxl": 70, "sd3": 60, "flux": 150}
LABELS = {"ae": " A&E", "amd": " vs attention-map-diffusers"}  # a stage's row label after its model
PIXELS = {"sd15": 512, "sdxl": 1024}  # the transformers run at their builders' own size (4,096 image tokens)
SELF_KEYS = 16  # transformers' self maps: each query's attention summed onto 16 × 16 key cells
DRY_PIXELS = 32


@dataclass
class Config:
    """What one run uses."""

    device: str
    dtype: str
    steps: int
    ae_steps: int
    rounds: int
    warmup: int
    budget_s: float
    stages: tuple[str, ...]
    dry: bool
    threads: int = 0
    out: str = ""


# -- the wheels carried to a machine without network ----------------------------------------------------------------


def installed_version(name: str) -> str | None:
    """The version of distribution ``name`` this interpreter has, None if it has none."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def wheels_needed(folder: Path, installed: Callable[[str], str | None] = installed_version) -> list[Path]:
    """The wheels in ``folder`` (``gpu_wheels.sh``'s) whose package this interpreter lacks at that version: the
    machine's own packages stay where they are (its torch above all), the carried ones run at the versions tested."""
    needed = []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if installed(name) != version:
            needed.append(wheel)
    return needed


# -- timing ---------------------------------------------------------------------------------------------------------


def median_ratio(arms: dict, arm: str, baseline: str) -> float:
    """median(arm's seconds) / median(baseline's seconds): the number each table row reports."""
    return statistics.median(arms[arm]["seconds"]) / statistics.median(arms[baseline]["seconds"])


def side_by_side(runs: dict[str, Callable], cfg: Config) -> tuple[dict, dict]:
    """Warm every arm up, then run them in turn for ``cfg.rounds`` rounds (each round starts one arm later); each
    arm's seconds, median and peak device memory, and the last output of each."""
    from _common import clock, peak_gib, reset_peak

    for _ in range(cfg.warmup):
        for fn in runs.values():
            fn()
    names = list(runs)
    arms = {name: {"seconds": [], "peak_gib": None} for name in names}
    outputs = {}
    for r in range(cfg.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            reset_peak(cfg.device)
            start = clock(cfg.device)
            outputs[name] = runs[name]()
            arms[name]["seconds"].append(clock(cfg.device) - start)
            peak = peak_gib(cfg.device)
            if peak is not None:
                arms[name]["peak_gib"] = max(arms[name]["peak_gib"] or 0.0, peak)
            print(f"    {name}: {arms[name]['seconds'][-1]:.3f} s" + (f", peak {peak:.2f} GiB" if peak else ""),
                  flush=True)
    for name in names:
        arms[name]["median_s"] = statistics.median(arms[name]["seconds"])
    return arms, outputs


# -- models ---------------------------------------------------------------------------------------------------------


def build(name: str, cfg: Config):
    """(pipeline, image side in pixels, pipeline keywords both arms pass, notes on what the model is)."""
    import torch
    from _common import sd15_pipeline, sdxl_pipeline

    dtype = getattr(torch, cfg.dtype)
    if name in ("sd15", "sdxl"):
        builder = sd15_pipeline if name == "sd15" else sdxl_pipeline
        pipe = builder(cfg.device, dtype, tiny=cfg.dry)
        pixels = DRY_PIXELS if cfg.dry else PIXELS[name]
        what = "the whole architecture" if not cfg.dry else "the same layout, narrow (tiny=True)"
        return pipe, pixels, {}, [f"{name}: {what}, random weights, {pixels}² px"]
    from dit_record_overhead import MAX_SEQUENCE, _pipeline

    notes = []
    try:  # initialised on the device: FLUX's 12 B random weights take minutes on a CPU, seconds on a GPU
        with torch.device(cfg.device):
            pipe = _pipeline(name, not cfg.dry, cfg.device, dtype)
    except Exception as err:
        notes.append(f"{name}: built on the CPU, since building on {cfg.device} failed ({type(err).__name__}: {err})")
        _free(cfg.device)
        pipe = _pipeline(name, not cfg.dry, cfg.device, dtype)
    pixels = DRY_PIXELS if cfg.dry else pipe.default_sample_size * pipe.vae_scale_factor
    blocks = (f"{pipe.transformer.config.num_layers} joint blocks" if name == "sd3" else
              f"{pipe.transformer.config.num_layers} double- + {pipe.transformer.config.num_single_layers} single-"
              "stream blocks")
    width = f"{pipe.transformer.config.num_attention_heads} heads × {pipe.transformer.config.attention_head_dim}"
    size = "full-size transformer" if not cfg.dry else "reduced transformer (dit_record_overhead's CPU size)"
    return pipe, pixels, {"max_sequence_length": MAX_SEQUENCE}, [*notes,
        f"{name}: {size}, {blocks} of {width}, random weights; text encoders and VAE: the tiny built-ins' (the same "
        f"cost in both arms); {pixels}² px"]


def arm_settings(pipe, pixels: int, unet: bool) -> dict[str, dict]:
    """``probe.record`` keywords of each recorded arm."""
    from record_overhead import case_kwargs

    self_arm = case_kwargs("b", pipe, pixels) if unet else {"kinds": ("cross", "self"), "self_keys": SELF_KEYS}
    return {"cross": {"kinds": ("cross",)}, "cross+self": self_arm,
            "qk": {"kinds": ("cross", "self"), "self_store": "qk"}}


def _describe(kwargs: dict, unet: bool) -> str:
    if kwargs.get("self_store") == "qk":
        return "cross maps + every self layer's q and k (self_store='qk')"
    if "self" not in kwargs["kinds"]:
        return "cross maps, every layer and step, head mean"
    if unet:
        return f"cross and self maps at the {len(kwargs['layers'])} layers with ≤ 32² queries"
    return f"cross maps + self maps with self_keys={SELF_KEYS}"


def record_stage(name: str, cfg: Config) -> dict:
    """One model: the plain pipeline call and each recorded arm, side by side."""
    import numpy as np
    import torch

    import probe
    from probe.models import attention_layers, generation
    from probe.record import plan

    started = time.perf_counter()
    pipe, pixels, call, notes = build(name, cfg)
    build_s = time.perf_counter() - started
    unet = hasattr(pipe, "unet")
    run = generation(pipe, cfg.steps, None, caller="benchmark")  # the pipeline's own guidance scale, in both arms
    size = {"height": pixels, "width": pixels, **call}
    settings, not_run = {}, {}
    for arm, kwargs in arm_settings(pipe, pixels, unet).items():
        try:
            nbytes = plan(pipe, PROMPT, seeds=[SEED], steps=cfg.steps, **size, **kwargs).nbytes
        except (ValueError, TypeError) as err:
            not_run[arm] = f"not supported here: {err}"
            continue
        settings[arm] = (kwargs, nbytes)

    def plain():
        return pipe(PROMPT, generator=torch.Generator(cfg.device).manual_seed(SEED), output_type="np",
                    **run.pipeline_kwargs(), **size).images[0]

    def recorded(kwargs: dict):
        return lambda: probe.record(pipe, PROMPT, seeds=[SEED], steps=run.steps,
                                    guidance_scale=run.guidance_scale, progress=False, **size,
                                    **kwargs)["images"]["image"].values[0]

    runs = {"plain": plain, **{arm: recorded(kwargs) for arm, (kwargs, _) in settings.items()}}
    weights = torch.cuda.memory_allocated(cfg.device) / 2**30 if cfg.device.startswith("cuda") else None
    arms, outputs = side_by_side(runs, cfg)
    reference = (np.asarray(outputs["plain"], dtype=np.float64) * 255).round().clip(0, 255)
    arms["plain"]["what"] = "pipe(prompt, generator=…)"
    arms["plain"]["finite"] = bool(np.isfinite(np.asarray(outputs["plain"], dtype=np.float64)).all())
    for arm, (kwargs, nbytes) in settings.items():
        arms[arm].update({"what": _describe(kwargs, unet), "kwargs": _jsonable(kwargs), "recording_mb": nbytes / 1e6,
                          "max_pixel_diff": float(np.abs(outputs[arm].astype(np.float64) - reference).max())})
    grids = [layer.grid for layer in attention_layers(pipe, pixels, pixels)]
    return {"stage": "record", "model": name, "notes": notes, "pixels": pixels,
            "image_tokens": max(h * w for h, w in grids), "steps": run.steps, "guidance_scale": run.guidance_scale,
            "dtype": cfg.dtype, "build_s": build_s, "weights_gib": weights, "baseline": "plain", "arms": arms,
            "ratios": {arm: median_ratio(arms, arm, "plain") for arm in arms if arm != "plain"}, "not_run": not_run}


def ae_stage(cfg: Config) -> dict:
    """Attend-and-Excite on SD1.5: probe's tap (``generate(objective="ae")``) against diffusers' own pipeline."""
    import torch
    from _common import sd15_pipeline
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )
    from guidance_speed import GUIDANCE, SUBJECTS, Settings, diffusers_ae

    from probe.prompts import subject_indices
    from probe.steer.guide import Schedule, generate

    started = time.perf_counter()
    pipe = sd15_pipeline(cfg.device, getattr(torch, cfg.dtype), tiny=cfg.dry)
    reference = StableDiffusionAttendAndExcitePipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    reference.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - started
    s = Settings(model="sd15", device=cfg.device, dtype=cfg.dtype, latent=None if cfg.dry else PIXELS["sd15"] // 8,
                 steps=cfg.ae_steps, pairs=cfg.rounds, refine=not cfg.dry, threads=cfg.threads)
    indices = [i for (i,) in subject_indices(pipe, PROMPT, SUBJECTS)]
    # the same method as diffusers': its token softmax (every slot but the first and last), so the latents agree
    schedule = Schedule(thresholds=s.thresholds, alter_fraction=s.alter / s.steps, tokens="diffusers")

    def ours():
        return generate(pipe, PROMPT, subjects=SUBJECTS, seed=SEED, steps=s.steps, schedule=schedule,
                        guidance_scale=GUIDANCE, height=s.pixels, width=s.pixels, output_type="latent",
                        progress=False).latents

    arms, outputs = side_by_side({"diffusers": lambda: diffusers_ae(reference, indices, s), "probe": ours}, cfg)
    arms["diffusers"]["what"] = "StableDiffusionAttendAndExcitePipeline"
    arms["probe"]["what"] = 'probe.steer.guide.generate(objective="ae")'
    difference = float((outputs["probe"].float() - outputs["diffusers"].float()).abs().max())
    refine = f"refinement at steps {sorted(s.thresholds)} (at most 20 iterations)" if s.thresholds else "no refinement"
    note = (f"A&E on the first {s.alter} of {s.steps} steps, {refine}, {s.pixels or DRY_PIXELS}² px, latents out; "
            f"the two's latents agree to {difference:.1e}")
    return {"stage": "ae", "model": "sd15", "notes": [note], "steps": s.steps, "dtype": cfg.dtype, "build_s": build_s,
            "baseline": "diffusers", "arms": arms, "ratios": {"probe": median_ratio(arms, "probe", "diffusers")},
            "max_latent_diff": difference, "not_run": {}}


def amd_stage(cfg: Config) -> dict:
    """probe's cross maps against attention-map-diffusers' capture of the same maps, both modes, on SD1.5."""
    import torch
    from _common import sd15_pipeline
    from record_overhead import AMD_MODES, amd_installed, amd_max_difference

    import probe
    from probe.models import generation

    if not amd_installed():
        return {"stage": "amd", "model": "sd15", "skipped": "not run: attention-map-diffusers is not installed "
                "(pip install attention-map-diffusers, or carry it with bash benchmarks/gpu_wheels.sh)"}
    from attention_map_diffusers import AttentionCapture

    started = time.perf_counter()
    pipe = sd15_pipeline(cfg.device, getattr(torch, cfg.dtype), tiny=cfg.dry)
    build_s = time.perf_counter() - started
    pixels = DRY_PIXELS if cfg.dry else PIXELS["sd15"]
    run = generation(pipe, cfg.steps, None, caller="benchmark")

    def plain():
        return pipe(PROMPT, generator=torch.Generator(cfg.device).manual_seed(SEED), output_type="np",
                    height=pixels, width=pixels, **run.pipeline_kwargs()).images[0]

    def ours():
        return probe.record(pipe, PROMPT, seeds=[SEED], steps=run.steps, guidance_scale=run.guidance_scale,
                            progress=False, height=pixels, width=pixels, kinds=("cross",), keep_padding=True)

    def theirs(mode: str):
        def capture():
            with AttentionCapture(pipe, relations="image->text", layers="all", timesteps="all", heads="mean",
                                  mode=mode) as held:
                plain()
            return held.compute()
        return capture

    arms, outputs = side_by_side({"plain": plain, "probe": ours, **{m: theirs(m) for m in AMD_MODES}}, cfg)
    best = min(AMD_MODES, key=lambda m: arms[m]["median_s"])
    arms["plain"]["what"] = "pipe(prompt, generator=…)"
    arms["probe"]["what"] = 'probe.record(kinds=("cross",), keep_padding=True)'
    for mode in AMD_MODES:
        arms[mode]["what"] = f"attention-map-diffusers AttentionCapture(image->text, all, heads=mean, mode={mode})"
    differences = {m: amd_max_difference(outputs["probe"], outputs[m]) for m in AMD_MODES}
    note = ("the same maps: " + ", ".join(f"probe vs {m} at most {d:.1e} over {n} maps"
                                          for m, (d, n) in differences.items()) + f"; {pixels}² px")
    return {"stage": "amd", "model": "sd15", "notes": [note], "pixels": pixels,
            "image_tokens": (pixels // pipe.vae_scale_factor) ** 2, "steps": run.steps, "dtype": cfg.dtype,
            "build_s": build_s, "baseline": best, "arms": arms,
            "ratios": {arm: median_ratio(arms, arm, best) for arm in arms if arm != best},
            "max_map_diff": {m: d for m, (d, _) in differences.items()}, "not_run": {}}


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- the run --------------------------------------------------------------------------------------------------------


def run_stages(cfg: Config, write: Callable[[list[dict]], None]) -> list[dict]:
    """Every stage in turn; one that fails or would start past the budget is a row saying so. Written after each."""
    started, stages = time.perf_counter(), []
    for stage in cfg.stages:
        spent = time.perf_counter() - started
        kind, model = (stage, "sd15") if stage in ("ae", "amd") else ("record", stage)
        if spent + (0 if cfg.dry else EXPECTED_S[stage]) > cfg.budget_s:
            stages.append({"stage": kind, "model": model,
                           "skipped": f"not run: {spent:.0f} s of the {cfg.budget_s:.0f} s budget were spent, and "
                                      f"it takes about {EXPECTED_S[stage]} s"})
        else:
            print(f"{stage} ({spent:.0f} s in)", flush=True)
            try:
                runner = {"ae": ae_stage, "amd": amd_stage}.get(stage)
                stages.append(runner(cfg) if runner else record_stage(stage, cfg))
            except Exception as err:  # one stage's failure (out of memory, say) leaves the others' rows
                traceback.print_exc()
                stages.append({"stage": kind, "model": model, "error": f"{type(err).__name__}: {err}"})
            _free(cfg.device)  # the stage's models went with its frame
        write(stages)
    return stages


def table(stages: list[dict]) -> str:
    """The markdown table: one row per arm against its baseline."""
    rows = ["| model | arm | setting | median s (arm · baseline) | ratio | peak GiB (arm · baseline) |",
            "|---|---|---|---|---|---|"]
    for st in stages:
        label = st["model"] + LABELS.get(st["stage"], "")
        size = f"{st['pixels']}² px, {st['image_tokens']:,} image tokens; " if "image_tokens" in st else ""
        if "arms" not in st:
            rows.append(f"| {label} | — | {st.get('skipped') or st.get('error')} | — | — | — |")
            continue
        base = st["arms"][st["baseline"]]
        for arm, ratio in st["ratios"].items():
            a = st["arms"][arm]
            peak = " · ".join("—" if p is None else f"{p:.2f}" for p in (a["peak_gib"], base["peak_gib"]))
            setting = f"{a['what']} vs {base['what']}; {size}{st['steps']} steps, {st['dtype']}"
            rows.append(f"| {label} | {arm} | {setting} | {a['median_s']:.3f} · {base['median_s']:.3f} | "
                        f"**{ratio:.3f}** | {peak} |")
        rows += [f"| {label} | {arm} | {why} | — | — | — |" for arm, why in st["not_run"].items()]
    return "\n".join(rows)


def parse(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU check: tiny layer counts, 32 px, 2 steps, float32")
    p.add_argument("--device", help="default: cuda (cpu with --dry)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on a GPU (random weights overflow less than in float16), float32 on a CPU")
    p.add_argument("--steps", type=int, help="denoising steps of each recording (default 10; 2 with --dry)")
    p.add_argument("--ae-steps", type=int, help="A&E's steps (default 20: refinement at steps 0 and 10; 2 with --dry)")
    p.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 5; 3 with --dry)")
    p.add_argument("--warmup", type=int, help="untimed runs of each arm first (default 1; 0 with --dry)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds within which every stage that starts should end (default 420: with the wheels' "
                        "install and imports, the whole call within 8 minutes)")
    p.add_argument("--only", nargs="+", choices=STAGES, help="these stages only (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    p.add_argument("--out", type=Path, help="folder of gpu_benchmark.json and .md (default $OUT, else "
                                            "benchmarks/gpu_results)")
    args = p.parse_args(argv)
    dry = args.dry
    cfg = Config(device=args.device or ("cpu" if dry else "cuda"), dtype=args.dtype or ("float32" if dry else
                 "bfloat16"), steps=args.steps or (2 if dry else 10), ae_steps=args.ae_steps or (2 if dry else 20),
                 rounds=args.rounds or (3 if dry else 5),
                 warmup=(0 if dry else 1) if args.warmup is None else args.warmup, budget_s=args.budget,
                 stages=tuple(s for s in STAGES if not args.only or s in args.only), dry=dry, threads=args.threads,
                 out=str(args.out or os.environ.get("OUT") or HERE / "gpu_results"))
    return cfg


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wheels-needed"]:  # gpu.sh's question, answered before torch or probe is imported
        print("\n".join(str(w) for w in wheels_needed(Path(argv[1]))))
        return None
    cfg = parse(argv)
    import diffusers
    import torch
    from _common import quiet_torch

    quiet_torch(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else "cpu"
    head = {"benchmark": "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": cfg.device,
            "device_name": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "config": {k: v for k, v in asdict(cfg).items()}}
    print(f"GPU benchmark on {device_name} (torch {torch.__version__}, diffusers {diffusers.__version__}): "
          f"{cfg.steps} steps, {cfg.rounds} rounds after {cfg.warmup} warm-up, {cfg.dtype}", flush=True)
    started = time.perf_counter()

    def write(stages: list[dict]) -> None:
        result = {**head, "stages": stages, "wall_s": time.perf_counter() - started}
        (out / "gpu_benchmark.json").write_text(json.dumps(result, indent=1))
        (out / "gpu_benchmark.md").write_text(
            f"GPU benchmark — {head['started']}, {device_name}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, {cfg.dtype}\n\n{table(stages)}\n\n"
            + "\n".join(f"- {note}" for st in stages for note in st.get("notes", [])) + "\n")

    stages = run_stages(cfg, write)
    print("\n" + table(stages))
    print(f"\nwrote {out / 'gpu_benchmark.json'} and {out / 'gpu_benchmark.md'} "
          f"({time.perf_counter() - started:.0f} s)")
    return json.loads((out / "gpu_benchmark.json").read_text())


if __name__ == "__main__":
    main()
