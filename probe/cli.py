"""The ``probe`` command line."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from probe.writes import save_figure, write_text

DEFAULT_MODEL = "shapes"


def _model_default() -> str:
    """The built-in shapes model when it is there, else the tiny random one."""
    from probe.models import BUILTIN

    return DEFAULT_MODEL if (BUILTIN[DEFAULT_MODEL] / "model_index.json").exists() else "tiny"


def _summary(tree) -> str:
    lines = [f"model {tree.attrs.get('model')} · {tree.attrs.get('scheduler')} · {tree.attrs.get('steps')} steps · "
             f"guidance {tree.attrs.get('guidance_scale')}"]
    for node in tree.subtree:
        for name, var in node.ds.data_vars.items():
            dims = " × ".join(f"{d} {n}" for d, n in zip(var.dims, var.shape))
            lines.append(f"  {node.path:<14} {name:<6} {dims}  ({var.nbytes / 1e6:.2f} MB)")
    images = tree["images"].ds
    for prompt, seed in zip(images["prompt"].values, images["seed"].values):
        lines.append(f"  sample: {prompt!r} seed {seed}")
    return "\n".join(lines)


def cmd_record(args) -> None:
    import probe

    tree = probe.record(
        probe.load(args.model, device=args.device, scheduler=args.scheduler), args.prompt, seeds=args.seed,
        settings=_record_settings(args), out=args.out, max_bytes=args.max_mb * 1e6 if args.max_mb else None,
        batch_size=args.batch_size, force=args.force,
    )
    print(_summary(tree))
    print(f"written to {args.out}")


def _record_settings(args):
    """The recording settings a command's options give (``probe record``, ``probe sweep``): one object, as
    :func:`probe.record` and :func:`probe.sweep` take it."""
    from probe.record import RecordSettings

    fields = {"steps": args.steps, "guidance_scale": args.guidance, "kinds": tuple(args.kinds), "layers": args.layers,
              "heads": _heads(args.heads)}
    if hasattr(args, "self_store"):
        fields.update(self_keys=args.self_keys, self_queries=_points(args.self_query), self_store=args.self_store)
    return RecordSettings(**fields)


def _heads(value: str):
    """``mean``, ``all`` or comma-separated indices (``0,3``); anything else is left for the check to explain."""
    parts = value.split(",")
    return [int(h) for h in parts] if all(h.strip().isdigit() for h in parts) else value


def _points(values: list[str] | None):
    """``--self-query 0.5,0.25`` pairs as (y, x) floats; anything else is left for the check to explain."""
    if not values:
        return None
    try:
        return [tuple(float(v) for v in value.split(",")) for value in values]
    except ValueError:
        return values


def cmd_info(args) -> None:
    import probe

    print(_summary(probe.open_recording(args.recording, verify=args.verify)))
    if args.verify:
        print("every chunk matches the checksum it was written with")


def cmd_show(args) -> None:
    import probe
    from probe.analysis.maps import recorded_step
    from probe.plots import cross_groups, token_overlay

    tree = probe.open_recording(args.recording)
    step = recorded_step(tree[cross_groups(tree)[0]]["step"].values, args.step)
    fig = token_overlay(tree, args.token, step, sample=args.sample)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


def cmd_demo(args) -> None:
    """Record one prompt on the built-in model, draw its maps, print what was recorded."""
    import probe
    from probe.plots import token_overlay

    model = args.model or _model_default()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt = "a red circle and a blue square"
    tree = probe.record(probe.load(model), prompt, seeds=[0, 1], steps=args.steps, out=out / "demo.zarr")
    print(_summary(tree))
    for word in ("circle", "square"):
        path = out / f"demo_{word}.png"
        save_figure(token_overlay(tree, word, step=-1), path, dpi=120)
        print(f"wrote {path}")


def cmd_train_shapes(args) -> None:
    from dataclasses import fields, replace

    from probe.shapes.model import ShapesConfig
    from probe.shapes.train import DATA_FIELDS, TESTBED, TrainConfig, export, train

    base = TESTBED if args.recipe == "testbed" else TrainConfig()
    given = {k: v for k, v in (("lr", args.lr), ("ema_decay", args.ema_decay)) if v is not None}
    arch_names = {f.name for f in fields(ShapesConfig)}
    settings = dict(_setting(item) for item in args.set)
    if args.resume and (fixed := sorted(k for k in settings if k in arch_names)):
        raise SystemExit(f"--resume keeps the checkpoint's architecture; drop --set {', '.join(fixed)}")
    arch = replace(base.arch, prediction=args.prediction, **{k: v for k, v in settings.items() if k in arch_names})
    cfg = replace(base, arch=arch, threads=args.threads, cooldown_minutes=args.cooldown, **given,
                  **{k: v for k, v in settings.items() if k not in arch_names})
    trainer = train(args.out, args.minutes, resume=args.resume, cfg=cfg, init_from=args.init_from,
                    vae_from=args.vae_from, keep=tuple(k for k in settings if k in DATA_FIELDS))
    if args.export:
        print(f"exported to {export(trainer, args.export)}")


def cmd_edit(args) -> None:
    """Edit a generated (or a given real) image and save source | edited side by side."""
    import numpy as np
    from PIL import Image

    import probe
    from probe.images import to_uint8
    from probe.steer.edit import edit

    pipe = probe.load(args.model)
    image = Image.open(args.image).convert("RGB") if args.image else None
    result = edit(pipe, args.source, args.target, seed=None if image else args.seed, inject=args.inject,
                  inject_steps=args.steps, image=image, steps=args.num_steps, output_type="np")
    pair = np.concatenate([result.source[0] if result.source.ndim == 4 else result.source,
                           result.edited[0] if result.edited.ndim == 4 else result.edited], axis=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(pair)).save(args.out)
    s = result.settings
    print(f"{args.source!r} → {args.target!r}: inject {s.inject} in {len(s.layers)} layers, "
          f"{len(s.steps)} of {s.num_inference_steps} steps; wrote {args.out}")


def _print_headlines(headlines: dict) -> None:
    import pandas as pd

    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.precision", 3):
        for name, table in headlines.items():
            print(f"\n== {name} ==")
            print(table.to_string(index=False) if hasattr(table, "to_string") else table)


def cmd_figures(args) -> None:
    """Every study's figures and tables from fixed seeds (``--quick``: reduced sizes); ``--check``: recompute the
    headlines in ``--out`` from the tables beside them instead, and fail where a number does not reproduce."""
    import probe
    from probe import studies

    if args.check:
        problems = studies.headline_differences(args.out)
        if problems:
            raise SystemExit(f"{len(problems)} headline numbers in {args.out}/ do not reproduce from its tables:\n"
                             + "\n".join(problems))
        print(f"every headline number in {args.out}/ reproduces from its tables")
        return
    if args.reanalyse:
        from probe.studies.report import reanalyse

        done = reanalyse(args.out)
        print(f"headlines of {', '.join(done)} and {args.out}/README.md written again from the per-image tables")
        return
    headlines = studies.run_all(probe.load(args.model), quick=args.quick, out=args.out)
    _print_headlines(headlines)
    print(f"\nfigures and tables in {args.out}/")


def _setting(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--set``: the value as a Python literal (``96``, ``"(False,)"``) or else a string."""
    import ast

    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--set takes KEY=VALUE (e.g. n_images=96), got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if re.fullmatch(r"[\w./~:+-]+", value):  # a bare word or path: the string itself
            return key, value
    raise ValueError(f"--set {item!r}: {value!r} is neither a Python literal (96, 0.5, True, (False,), "
                     "{'iou': 0.2}, 'text') nor a plain word; fix the value and quote the whole item, e.g. "
                     "--set \"methods=('none', 'ae')\"")


def _argument(check):
    """An argparse ``type`` from a checking function: its ValueError or OSError becomes argparse's own error (one
    line, exit status 2, before anything loads); argparse would otherwise print only "invalid value"."""
    def parse(value: str):
        try:
            return check(value)
        except (ValueError, OSError) as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parse.__name__ = check.__name__.strip("_")
    return parse


_JUDGE_HELP = ("exact | geneval[:MODEL][@THRESHOLD] | vqa[:MODEL][@THRESHOLD] | clip[:MODEL][@THRESHOLD] | "
               "detector[:MODEL][@THRESHOLD] (MODEL: a local folder or hub id; geneval: DETECTOR,CLIP or a folder "
               "with detector/ and clip/)")


def _judge_spec(value: str) -> str:
    """A ``--judge`` value, checked before any model loads (:func:`probe.judges.parse_judge_spec`)."""
    from probe.judges import parse_judge_spec

    parse_judge_spec(value)
    return value


def _shard(value: str) -> tuple[int, int]:
    """``I/N``: share I (0-based) of N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"give I/N, share I of N counted from 0 (0 ≤ I < N, e.g. 0/4 … 3/4), not {value!r}")
    return int(match[1]), int(match[2])


def _shard_text(value: str) -> str:
    """A study's ``--shard``: ``I/N`` or ``auto`` (checked now, read again where the study runs)."""
    from probe.studies.shards import shard_of

    shard_of(value)
    return value


def _image_out(value: str) -> str:
    """An image path whose extension names a format PIL writes, checked before anything is generated."""
    from PIL import Image

    suffix = Path(value).suffix.lower()
    if suffix not in Image.registered_extensions():
        stem = Path(value).stem if suffix else Path(value).name
        what = f"its extension {suffix!r} is not an image format" if suffix else "it has no file extension"
        raise ValueError(f"cannot write the image to {value!r}: {what}; give a name such as {stem}.png (or .jpg, "
                         ".webp …)")
    return value


def _megabytes(value: str) -> float:
    """A positive size in MB: 0 would have meant no limit at all, a negative or NaN size none either."""
    try:
        mb = float(value)
    except ValueError:
        mb = math.nan
    if not mb > 0:
        raise ValueError(f"give a positive size in MB (e.g. 500), not {value!r}; leave --max-mb out for no limit")
    return mb


def _takes(study, keyword: str) -> bool:
    """Does the study function take ``keyword`` (``sets`` for --prompts, ``judge`` for --judge)?"""
    import inspect

    return keyword in inspect.signature(study.run).parameters


def _names(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def cmd_study(args) -> None:
    """Run one registered study: by its own command line where it has one, else through ``run_all``."""
    import probe
    from probe import studies
    from probe.studies.registry import get_study, registered_studies
    from probe.studies.report import check_settings

    study = get_study(args.name)
    if study.main is not None:  # a study with commands of its own (probe study intervention run e1 …)
        code = study.main(args.args)
        if code:
            raise SystemExit(code)
        return
    options = args
    settings = dict(_setting(item) for item in options.set)
    if options.registered:  # the design its registration fixed before the run; --set may repeat it, not change it
        from probe.studies.registration import registration_path, settings_for_run

        try:
            settings = settings_for_run(study.name, study.run, settings, options.out)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"probe study {study.name} --registered: {err}") from None
        if _takes(study, "registration"):  # a study that checks its registration itself (its power calculation)
            settings["registration"] = str(registration_path(study.name, options.out))
    settings = check_settings(study.name, settings)  # before the model loads
    if options.prompts:
        if not _takes(study, "sets"):
            takers = [s.name for s in registered_studies(in_run_all=True) if _takes(s, "sets")]
            raise SystemExit(f"--prompts applies to the {_names(takers)} studies; the {study.name} study draws the "
                             "shapes world's scenes")
        from probe.prompts import check_prompt_sets

        settings["sets"] = tuple(check_prompt_sets(options.prompts))  # a missing or empty file: before the model loads
    if options.dry:  # the cost before anything loads (the judge's model included)
        _print_plan(study, settings, options.seconds_per_image)
        return
    if options.judge:
        from probe.judges import judge_from_spec

        if not _takes(study, "judge"):
            raise SystemExit(f"the {study.name} study judges with the shapes world's rules; --judge is for the others")
        settings["judge"] = judge_from_spec(options.judge, device=options.device)
    model = options.model or _model_default()
    if options.shard or options.calibrate or options.processes > 1 or options.merge is not None:
        if not _split_study(study, settings, options, model):
            return  # a part of the study: the analysis runs on the merged table
    headlines = studies.run_all(probe.load(model, device=options.device), quick=options.quick, out=options.out,
                                only=[study.name], sizes={study.name: settings})
    _print_headlines(headlines)


def _print_plan(study, settings: dict, seconds_per_image: float) -> None:
    """``--dry``: what a guided study will make and how long it takes at ``seconds_per_image``."""
    from probe.studies import shards
    from probe.studies.guidance import study_plan_of

    if not shards.splits(study):
        raise SystemExit(f"--dry plans the guided studies (guidance, self_cross); the {study.name} study runs in "
                         "minutes")
    plan = study_plan_of(study.run, settings, seconds_per_image)
    print(plan.to_string(index=False, justify="left"))
    if plan.attrs["pairs"] < plan.attrs["asked"]:
        print(f"the design asks for {plan.attrs['asked']} (prompt, seed) pairs per arm, the prompt sets hold "
              f"{plan.attrs['pairs']}: add prompts (--prompts A B, a file) or seeds (--set seeds_per_prompt=N)")
    print(f"at {seconds_per_image:g} s per image (--seconds-per-image; time a --quick run of yours to measure it); "
          f"--processes N or --shard I/N divides the hours over N GPUs")


def _split_study(study, settings: dict, options, model: str) -> bool:
    """``--calibrate`` / ``--shard I/N`` (one part, False: nothing more to run), ``--processes N`` (the calibration
    here, N shards at once, their merge) and ``--merge DIR…`` (the shards' tables into ``--out``): True where the
    study is then run in ``--out``, which makes no image and analyses the whole."""
    import probe
    from probe.studies import shards
    from probe.studies.registry import registered_studies
    from probe.studies.report import study_keywords

    if not shards.splits(study):
        takers = [s.name for s in registered_studies(in_run_all=True) if shards.splits(s)]
        raise SystemExit(f"--shard, --calibrate, --processes and --merge split the {_names(takers)} studies (their "
                         f"rows are per image); the {study.name} study runs on one process")
    chosen = [flag for flag, on in (("--shard", options.shard), ("--calibrate", options.calibrate),
                                    ("--processes", options.processes > 1), ("--merge", options.merge is not None))
              if on]
    if len(chosen) > 1:
        raise SystemExit(f"give one of {', '.join(chosen)}: --processes N calibrates, runs N shards and merges them")
    keywords = study_keywords(options.quick, options.out, True, settings)
    if options.merge is not None:
        shards.merge_study(study.name, options.merge or [options.out], options.out)
        return True
    pipe = probe.load(model, device=options.device)
    if options.calibrate or options.processes > 1:  # once, before the shards: every shard reads its pilot images
        part = study.run(pipe, calibrate_only=True, **keywords)
        print(f"calibration of the {study.name} study: {len(part.rows)} rows; its pilot images in {part.path}")
        if options.calibrate:
            return False
        argv = shards.without_option(options.argv, "--processes")
        if shards.run_processes(["-m", "probe.cli", *argv], options.processes):
            raise SystemExit(f"some shards of the {study.name} study failed; run the same command again to resume")
        shards.merge_study(study.name, [options.out], options.out)
        return True
    shard = shards.shard_of(options.shard)
    part = study.run(pipe, shard=shard, **keywords)
    print(f"shard {shard[0]}/{shard[1]} of the {study.name} study: {len(part.rows)} rows in {part.path} (merge the "
          f"shards with probe study {study.name} --merge DIR…)")
    return False


def cmd_evaluate_shapes(args) -> None:
    import json

    import probe
    from probe.shapes import evaluate

    if args.pilot and args.card:
        raise SystemExit("--card writes the model card from the full evaluation; --pilot is the short read: "
                         "pass one of them")
    pipe = probe.load(args.model)
    if args.pilot:
        metrics = evaluate.pilot(pipe)
    else:
        reference = probe.load(args.reference) if args.reference else None
        metrics = evaluate.evaluate_model(pipe, quick=args.quick, reference=reference)
    if args.control:  # a pilot is read with the control too: the control is what a design can break
        metrics["positive_control"] = evaluate.positive_control(pipe, args.control, out=args.control_out,
                                                                seeds_per_prompt=args.control_seeds,
                                                                step_size=args.control_step)
    print(json.dumps(metrics, indent=1))
    if args.card:
        folder = Path(args.model if Path(args.model).is_dir() else probe.models.BUILTIN[args.model])
        training = json.loads((folder / "training.json").read_text())
        write_text(folder / "metrics.json", json.dumps(metrics, indent=1))
        evaluate.sample_grid(pipe, folder / "samples.png", steps=metrics["steps"])
        write_text(folder / "README.md", evaluate.write_card(folder, metrics, training))
        print(f"wrote the model card {folder / 'README.md'}")


def cmd_sweep(args) -> None:
    """Run or resume a sweep; ``--processes N`` splits it across N processes under ``accelerate launch``."""
    from probe.record import sweep as sweeps

    kwargs = dict(model=args.model, prompts=args.prompt, seeds=args.seed, methods=args.method, out=args.out,
                  targets=args.target, subjects=args.subjects, settings=_record_settings(args),
                  edit_steps=args.edit_steps, height=args.height, width=args.width)
    sweeps.items(args.prompt, args.seed, args.method, targets=args.target, subjects=args.subjects)  # errors first
    if args.processes > 1 and not sweeps.launched():
        raise SystemExit(sweeps.launch(args.processes, threads=args.threads, **kwargs))
    shard = args.shard  # (I, N), checked by _shard
    print(sweeps.sweep(**kwargs, shard=shard, device=args.device, threads=args.threads or sweeps.THREADS).summary())


def cmd_judge_agreement(args) -> None:
    from probe.judge_agreement import judge_folder
    from probe.judges import judge_from_spec
    from probe.writes import write_csv

    rows, table = judge_folder(judge_from_spec(args.judge, device=args.device), args.images, args.truth)
    print(table.to_string(index=False))
    for frame, path in ((table, args.out), (rows, args.rows)):
        if path:
            print(f"wrote {write_csv(frame, path)}")


def _add_record(sub) -> None:
    r = sub.add_parser("record", help="generate and record attention maps")
    r.add_argument("--model", default=None, help="built-in name (shapes, tiny, tiny-xl), folder or hub id")
    r.add_argument("--prompt", nargs="+", required=True)
    r.add_argument("--seed", nargs="+", type=int, default=[0])
    r.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's own)")
    r.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own)")
    r.add_argument("--kinds", nargs="+", default=["cross", "self"],
                   choices=["cross", "self", "text_image", "text_text"],
                   help="image queries on text (cross) or image (self) keys; on SD3 / FLUX also text queries on "
                        "image (text_image) or text (text_text) keys")
    r.add_argument("--layers", nargs="+", default=None, help="names, globs, re:patterns or resolutions")
    r.add_argument("--heads", default="mean", help="'mean', 'all' or indices such as 0,3")
    r.add_argument("--self-keys", type=int, default=None, metavar="SIDE",
                   help="sum self-attention keys onto a SIDE×SIDE grid (affordable maps at FLUX sizes)")
    r.add_argument("--self-store", default="maps", choices=["maps", "qk"],
                   help="qk: keep self-attention's q and k (joint attention: of every token; maps made on read "
                        "by probe.analysis.lazy.maps_from_qk)")
    r.add_argument("--self-query", action="append", default=None, metavar="Y,X",
                   help="record self-attention of this query point only (fractions of the image; repeatable)")
    r.add_argument("--scheduler", default=None, help="ddim, euler, euler-a, heun, dpm++, dpm++-karras, unipc … "
                   "or a diffusers scheduler class name (default: the model's own)")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--max-mb", type=_argument(_megabytes), default=None,
                   help="refuse runs whose estimate exceeds this")
    r.add_argument("--device", default=None)
    r.add_argument("--out", required=True, help="a .zarr or .nc path")
    r.add_argument("--force", action="store_true", help="replace a file or folder at --out that is not a recording")
    r.set_defaults(func=cmd_record)


def _add_info(sub) -> None:
    i = sub.add_parser("info", help="groups, sizes and prompts of a recording")
    i.add_argument("recording")
    i.add_argument("--verify", action="store_true", help="read every chunk and check its checksum")
    i.set_defaults(func=cmd_info)


def _add_show(sub) -> None:
    s = sub.add_parser("show", help="heat-map overlay of one word per layer resolution")
    s.add_argument("recording")
    s.add_argument("--token", required=True, help="a word of the prompt (cat#2: its second occurrence; on SD3 the "
                   "mean of its CLIP and T5 copies)")
    s.add_argument("--step", type=int, default=-1, help="a recorded step; negative counts from the last recorded")
    s.add_argument("--sample", type=int, default=0)
    s.add_argument("--dpi", type=int, default=120)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_show)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="record the built-in model and draw its maps")
    d.add_argument("--model", default=None)
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)


def _add_train_shapes(sub) -> None:
    t = sub.add_parser("train-shapes", help="train the built-in shapes model")
    t.add_argument("--out", required=True, help="training folder (checkpoints)")
    t.add_argument("--minutes", type=float, required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--init-from", default=None, help="start from an exported model folder (data/models/shapes)")
    t.add_argument("--vae-from", default=None, help="take this exported model's autoencoder instead of training one")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    t.add_argument("--cooldown", type=float, default=0.0,
                   help="decay the learning rate linearly to 10%% over the run's last minutes")
    t.add_argument("--export", default=None, help="write the EMA model as a diffusers folder here")
    t.add_argument("--prediction", default="v_prediction", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (a new or warm-started run; --resume keeps the checkpoint's); "
                        "v-prediction is what the built-in model ships with (see its card)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default 1e-3)")
    t.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the exported weights (default 0.995)")
    t.add_argument("--recipe", default="testbed", choices=["testbed", "v1"],
                   help="testbed: the shipped model's recipe; v1: the first built-in model's")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig or ShapesConfig field, e.g. --set grounding_weight=0")
    t.set_defaults(func=cmd_train_shapes)


def _add_edit(sub) -> None:
    ed = sub.add_parser("edit", help="tuning-free editing by attention injection (FPE)")
    ed.add_argument("--model", default=None)
    ed.add_argument("--source", required=True, help="source prompt")
    ed.add_argument("--target", required=True, help="target prompt")
    ed.add_argument("--image", default=None, help="a real source image (inverted with DDIM)")
    ed.add_argument("--inject", default="self", choices=["self", "cross", "none"])
    ed.add_argument("--steps", type=float, default=0.8, help="fraction of steps injected from the start")
    ed.add_argument("--num-steps", type=int, default=50)
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--out", required=True, type=_argument(_image_out), help="PNG with source | edited")
    ed.set_defaults(func=cmd_edit)


def _add_figures(sub) -> None:
    f = sub.add_parser("figures", help="regenerate every figure and table of the studies")
    f.add_argument("--model", default=None)
    f.add_argument("--quick", action="store_true", help="reduced sizes (minutes on a CPU)")
    f.add_argument("--out", default="figures")
    f.add_argument("--check", action="store_true",
                   help="make no image: recompute every headline from the per-image tables in --out and compare")
    f.add_argument("--reanalyse", action="store_true",
                   help="make no image: write every headline and the index again from the per-image tables in --out "
                        "with today's analysis (after a change of analysis, not of images)")
    f.set_defaults(func=cmd_figures)


def _add_study(sub) -> None:
    """``probe study NAME …``: one sub-command per registered study, its options checked as the command line is read
    (before any model loads); a study with commands of its own (the intervention study) takes the rest as they are."""
    from probe.studies.registry import registered_studies

    studies = registered_studies()
    width = max(len(study.name) for study in studies)
    listing = "\n".join(f"  {study.name:<{width}}  {study.title}" + ("" if study.in_run_all else " (its own commands)")
                         for study in studies)
    st = sub.add_parser("study", help="run one study", description=f"Run one study:\n{listing}",
                        epilog="probe study NAME --help: that study's options or commands",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    names = st.add_subparsers(dest="name", required=True, metavar="NAME")
    for study in studies:
        if study.main is not None:
            own = names.add_parser(study.name, aliases=list(study.aliases), help=study.title, add_help=False,
                                   prefix_chars="\0")
            own.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the study's own commands")
        else:
            own = names.add_parser(study.name, aliases=list(study.aliases), help=study.title,
                                   description=study.title, parents=[_study_options(study)])
        own.set_defaults(func=cmd_study, name=study.name)  # the name, not the alias typed


def _study_options(study) -> argparse.ArgumentParser:
    """The options of a study that ``probe figures`` runs (``probe study NAME [options]``)."""
    st = argparse.ArgumentParser(add_help=False)
    st.add_argument("--model", default=None, help="built-in name, a local diffusers folder or a hub id")
    st.add_argument("--prompts", nargs="+", default=None, metavar="SET",
                    help="prompt sets (animals, animals_objects, objects, SSD-2, SSD-3, shapes-2 …, or a .txt file)")
    st.add_argument("--judge", default=None, type=_argument(_judge_spec), help=_JUDGE_HELP)
    st.add_argument("--device", default=None, help="cuda, cpu … (default: the pipeline's own)")
    st.add_argument("--quick", action="store_true")
    st.add_argument("--out", default="figures")
    st.add_argument("--shard", default=None, metavar="I/N", type=_argument(_shard_text),
                    help="make only shard I of N's images (array jobs; auto: RANK/WORLD_SIZE of a launcher); the "
                         "calibration must be made first (--calibrate)")
    st.add_argument("--calibrate", action="store_true", help="only the step-size calibration (once, before shards)")
    st.add_argument("--processes", type=int, default=1, metavar="N",
                    help="calibrate, run N shards at once (one GPU each where there are GPUs), merge, analyse")
    st.add_argument("--merge", nargs="*", default=None, metavar="DIR",
                    help="merge the shards' tables found in DIR… (default: --out) into --out, then analyse")
    st.add_argument("--dry", action="store_true", help="print what the study will make and its hours; run nothing")
    st.add_argument("--seconds-per-image", type=float, default=20.0, metavar="S",
                    help="--dry's time per guided image (default 20: Stable Diffusion 1.5, 50 steps, one GPU)")
    st.add_argument("--registered", action="store_true",
                    help="run at the design OUT/NAME_registration.md fixed before the run (its answer is read only "
                         "from such a run)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a keyword of the study function, e.g. n_images=96, steps=25, "
                         "methods=\"('none','ae','iou')\", initno=\"(False,)\" (repeatable)")
    return st


def _add_evaluate_shapes(sub) -> None:
    e = sub.add_parser("evaluate-shapes", help="measure the built-in model with its judge")
    e.add_argument("--model", default="shapes", help="built-in name or folder")
    e.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    e.add_argument("--card", action="store_true", help="write metrics.json, samples.png and README.md beside it")
    e.add_argument("--reference", default=None, help="a model timed side by side with this one (the speed target)")
    e.add_argument("--pilot", action="store_true", help="the short read of a training run: teacher-forced "
                   "localisation and unguided missing / mixing")
    e.add_argument("--control", type=int, default=0, metavar="PAIRS",
                   help="also the Attend-and-Excite positive control on this many (prompt, seed) pairs (300 for the "
                        "card; ~1 s per unguided and ~3.5 s per guided image on a laptop CPU)")
    e.add_argument("--control-out", default=None, help="folder for the control's per-image rows (resumable)")
    e.add_argument("--control-step", type=float, default=None, metavar="SIZE",
                   help="A&E's step size in the control (default: the one that lowers missing most on pilot prompts)")
    e.add_argument("--control-seeds", type=int, default=1, metavar="N",
                   help="seeds per prompt in the control (1: every pair a different prompt, the narrowest interval)")
    e.set_defaults(func=cmd_evaluate_shapes)


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="prompts × seeds × methods into one store, split across processes, resumable")
    sw.add_argument("--model", default=None, help="built-in name, folder or hub id")
    sw.add_argument("--prompt", nargs="+", required=True)
    sw.add_argument("--seed", nargs="+", type=int, default=[0])
    sw.add_argument("--method", nargs="+", default=["record"],
                    help="record, guide:<objective> (none, ae, iou, …) or edit:<inject> (self, cross, none)")
    sw.add_argument("--target", nargs="+", default=None, help="edit methods: one target prompt per --prompt")
    sw.add_argument("--subjects", nargs="+", default=None,
                    help="guide methods: comma-separated words per --prompt (default: the prompt's nouns)")
    sw.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's own)")
    sw.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the pipeline's own)")
    sw.add_argument("--kinds", nargs="+", default=["cross", "self"], choices=["cross", "self"])
    sw.add_argument("--layers", nargs="+", default=None, help="names, globs, re:patterns or resolutions")
    sw.add_argument("--heads", default="mean", help="'mean' or 'all'")
    sw.add_argument("--edit-steps", type=float, default=0.8, help="edit methods: fraction of steps injected")
    sw.add_argument("--height", type=int, default=None)
    sw.add_argument("--width", type=int, default=None)
    sw.add_argument("--processes", type=int, default=1, help="split across this many processes (accelerate launch)")
    sw.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1, whatever the "
                    "number of processes: the same store from any number)")
    sw.add_argument("--shard", default=None, type=_argument(_shard), metavar="I/N",
                    help="run share I of N (0 ≤ I < N) without a process group")
    sw.add_argument("--device", default=None)
    sw.add_argument("--out", required=True, help="output folder (maps.zarr, rows/, done/); run again to resume")
    sw.set_defaults(func=cmd_sweep)


def _add_judge_agreement(sub) -> None:
    ja = sub.add_parser("judge-agreement", help="a judge's per-subject agreement with known truth (accuracy, kappa, "
                        "confusion counts)")
    ja.add_argument("--judge", required=True, type=_argument(_judge_spec), help=_JUDGE_HELP)
    ja.add_argument("--images", required=True, help="folder of the images the truth names")
    ja.add_argument("--truth", required=True, help="CSV: image, prompt, subject, status (present / mixed / missing) "
                    "[, category], one row per image and subject in the prompt's order")
    ja.add_argument("--out", default=None, help="write the table to this CSV")
    ja.add_argument("--rows", default=None, help="write the per-subject truth and verdicts to this CSV")
    ja.add_argument("--device", default=None, help="cuda, cpu … (default: cuda when there is one)")
    ja.set_defaults(func=cmd_judge_agreement)


def parser() -> argparse.ArgumentParser:
    """The ``probe`` command line: one builder per sub-command."""
    p = argparse.ArgumentParser(prog="probe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_record, _add_info, _add_show, _add_demo, _add_train_shapes, _add_edit, _add_figures, _add_study,
                _add_evaluate_shapes, _add_sweep, _add_judge_agreement):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from probe.writes import OutputBusy

    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a study's shards are started with
    if getattr(args, "model", "unset") is None:
        args.model = _model_default()
    try:
        args.func(args)
    except (ValueError, OSError, MemoryError, KeyError, OutputBusy, RuntimeError) as err:  # the user's: one line
        if isinstance(err, RuntimeError) and not isinstance(err, OutputBusy) and "decompression" not in str(err):
            raise
        damaged = "checksum" in str(err) or "decompression" in str(err)  # a chunk read back is not what was written
        hint = (" (a chunk of the recording changed after it was written: `probe info --verify RECORDING` names "
                "each damaged chunk)") if damaged else ""
        print(f"probe {args.command}: {err}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
