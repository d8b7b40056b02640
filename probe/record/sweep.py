"""Sweeps: every (prompt, seed, method) item of a study, split across processes, into one zarr store.

Why: a study of thousands of generations outgrows one process and one sitting. A sweep lays its store out up front
with the whole item dimension, so every process writes only its own items' chunks (``to_zarr(region=...)``, one
sample per chunk: regions never overlap), and a completion marker written after an item's data is on disk makes a
stopped sweep resumable: run the same sweep again and only the items without a marker are computed. A process that
is killed loses at most the item it was computing.

Items are ``prompts × seeds × methods`` in that nesting order (item ``i``: ``sample = i`` in the store). Methods:

- ``"record"``: the plain pipeline, recorded as :func:`probe.record.record` records it;
- ``"guide:<objective>"``: :func:`probe.steer.guide.generate` with an objective of :data:`probe.steer.guide.OBJECTIVES`
  (``"guide:none"``: the guide's code path with nothing guided); the subjects are the prompt's nouns unless given;
- ``"edit:<inject>"``: :func:`probe.steer.edit.edit` of the prompt into its target (``self``, ``cross`` or ``none``);
the
  item's maps and image are the edited (target) row, its ``prompt`` coordinate is the target, ``source`` the prompt.

A bare objective (``"ae"``, ``"none"``) means ``guide:…``; ``"guide"`` is ``guide:ae`` and ``"edit"`` ``edit:self``.

The output folder::

    maps.zarr/              probe.record's layout, one sample per item, coordinates source, method, prompt, seed
    rows/000012.parquet     the item's table row (method diagnostics, seconds, rank); :func:`table` merges them
    done/000012.json        the completion marker, written last: a SHA-256 of each of the item's chunk files
    sweep.json              what was asked, and when the store was laid out
    log.txt                 start / done lines of every process (diagnostics)

Processes: the items are dealt to the processes method by method, in turn (:func:`deal`), so each process gets
its share of every method however many methods there are (``accelerate.PartialState()`` says which process this
is), one GPU each where there are GPUs. ``probe sweep --processes N`` runs
``accelerate launch --multi_gpu --num_processes N``; on a machine without GPUs that launcher still starts N
processes (torch.distributed.run) and the sweep asks accelerate for CPU processes, which join a gloo group.
(``accelerate launch --cpu`` starts one process unless MPI is set up with ``--mpirun_hostfile``.) Several nodes:
run accelerate's launcher on each with ``--num_machines``, ``--machine_rank`` and ``--main_process_ip`` over a shared
folder. ``shard=(index, count)`` runs one share without a process group (array jobs of a cluster scheduler).
One sweep of a folder at a time: a lock on the folder refuses a second launch (or a second single-process sweep)
while any process of the first is alive, and the workers of a launch die with their launcher (a killed launcher
leaves no process writing). The shards of an array job share the folder, one process per shard.

The same items give the same store, bit for bit, whatever the number of processes: each process runs torch with
:data:`THREADS` threads under ``probe sweep`` and :func:`launch` unless told otherwise (CPU reductions depend on
the thread count; :func:`sweep` called directly leaves torch's setting unless given ``threads``). A resumed sweep checks
each finished item's chunks against its marker and computes again the items whose chunks were lost or changed.
``PROBE_SWEEP_FAULT=N`` (or ``N@RANK``) makes a process exit abruptly at its N-th write: the fault-injection tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from probe.checks import room_for
from probe.images import to_uint8
from probe.models import generation, load
from probe.record import Plan, Recorder, RecordSettings, plan, zarr_encoding
from probe.record.schema import batch_datasets
from probe.tap import Tap
from probe.writes import locked

MAPS, ROWS, DONE, SPEC, LOG, LAUNCH = "maps.zarr", "rows", "done", "sweep.json", "log.txt", "launch.json"
FAULT_ENV, FAULT_EXIT = "PROBE_SWEEP_FAULT", 86
LAYOUT_STALE_SECONDS = 600.0  # a leftover layout folder older than this is a killed process's, removed
THREADS = 1  # torch threads per process of a launched or command-line sweep: one store whatever the process count
LAUNCHED_ENV = "PROBE_SWEEP_LAUNCHED"  # set by launch for its workers: the launcher holds the folder's lock


class SweepMismatch(ValueError):
    """The output folder holds the store of another sweep."""


# -- items -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One generation of a sweep: its index (the store's ``sample``), prompt, seed and method."""

    index: int
    prompt: str
    seed: int
    method: str  # canonical: "record", "guide:<objective>", "edit:<inject>"
    target: str = ""  # edit: the prompt the image is edited into
    subjects: tuple[str, ...] = ()  # guide: the subject words

    @property
    def kind(self) -> str:
        return self.method.partition(":")[0]

    @property
    def variant(self) -> str:
        return self.method.partition(":")[2]

    @property
    def recorded_prompt(self) -> str:
        """The prompt whose maps and image the item stores (an edit's target)."""
        return self.target if self.kind == "edit" else self.prompt


def parse_method(spec: str) -> str:
    """The canonical name of a method (``"ae"`` → ``"guide:ae"``); an unknown one is an error that lists them."""
    from probe.steer.edit import INJECTS
    from probe.steer.guide import OBJECTIVES

    objectives = ["none", *OBJECTIVES]
    text = str(spec).strip()
    kind, colon, variant = text.partition(":")
    if not colon and text in objectives:
        kind, variant = "guide", text
    if kind == "record" and not variant:
        return "record"
    if kind == "guide" and (variant or "ae") in objectives:
        return f"guide:{variant or 'ae'}"
    if kind == "edit" and (variant or "self") in INJECTS:
        return f"edit:{variant or 'self'}"
    raise ValueError(f"unknown method {spec!r}: give 'record', 'guide:<objective>' (objectives: "
                     f"{', '.join(objectives)}) or 'edit:<inject>' (inject: {', '.join(INJECTS)})")


def _per_prompt(name: str, given, prompts: list[str]) -> dict[str, object]:
    """A per-prompt setting given as a mapping or as a list aligned with the prompts."""
    if given is None:
        return {}
    if isinstance(given, Mapping):
        unknown = [p for p in given if p not in prompts]
        if unknown:
            raise ValueError(f"{name} names prompts that are not in the sweep: {unknown}; the prompts are {prompts}")
        return dict(given)
    given = list(given)
    if len(given) != len(prompts):
        raise ValueError(f"{name}: give one per prompt ({len(prompts)} prompts, {len(given)} {name}) or a mapping "
                         "{prompt: value}")
    return dict(zip(prompts, given))


def _unique(name: str, values: list) -> list:
    repeated = list(dict.fromkeys(v for v in values if values.count(v) > 1))
    if repeated:
        raise ValueError(f"{name} {repeated} given more than once; every item of a sweep must be distinct")
    if not values:
        raise ValueError(f"give at least one of {name}")
    return values


def items(prompts, seeds, methods=("record",), *, targets=None, subjects=None) -> list[Item]:
    """The sweep's items, prompts × seeds × methods, checked: unknown methods, repeats and missing targets are errors.

    ``targets``: an edit's target prompt per prompt (a mapping or a list aligned with ``prompts``), needed by every
    ``edit:*`` method. ``subjects``: the guided words per prompt (default: the prompt's nouns, see
    :func:`probe.prompts.subjects_of`).
    """
    from probe.prompts import subjects_of

    prompts = _unique("prompts", [prompts] if isinstance(prompts, str) else list(prompts))
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"prompts must be non-empty strings, got {bad}")
    try:
        given = [int(s) for s in ([seeds] if np.isscalar(seeds) else seeds)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"seeds must be integers, got {seeds!r}") from err
    seeds = _unique("seeds", given)
    methods = _unique("methods", [parse_method(m) for m in ([methods] if isinstance(methods, str) else methods)])
    target_of = {p: str(t) for p, t in _per_prompt("targets", targets, prompts).items()}
    words_of = {p: ([w for w in s.split(",") if w] if isinstance(s, str) else list(s))
                for p, s in _per_prompt("subjects", subjects, prompts).items()}
    if any(m.startswith("edit:") for m in methods):
        missing = [p for p in prompts if not target_of.get(p)]
        if missing:
            raise ValueError(f"the edit methods need a target prompt for every prompt; none for {missing}. Give "
                             "targets={prompt: target} (command line: --target, one per --prompt)")
    out = []
    for prompt in prompts:
        for seed in seeds:
            for method in methods:
                words: tuple[str, ...] = ()
                if method.startswith("guide:"):
                    words = tuple(words_of[prompt]) if prompt in words_of else tuple(subjects_of(prompt))
                target = target_of.get(prompt, "") if method.startswith("edit:") else ""
                out.append(Item(len(out), prompt, seed, method, target, words))
    return out


def _check_items(pipe, todo: list[Item]) -> None:
    """What only the model can tell: guided words in the prompt, token-aligned prompts for cross injection."""
    from probe.prompts import subject_indices, text_keys_tokenizer
    from probe.steer.edit import cross_key_mask

    tokenizer = text_keys_tokenizer(pipe)
    seen = set()
    for item in todo:
        key = (item.method, item.prompt)
        if key in seen:
            continue
        seen.add(key)
        try:
            if item.kind == "guide":
                subject_indices(tokenizer, item.prompt, list(item.subjects))
            if item.method == "edit:cross":
                cross_key_mask(pipe, item.prompt, item.target, "all")
        except ValueError as err:
            raise ValueError(f"item {item.index} ({item.method}, {item.prompt!r}): {err}") from err


# -- the store -------------------------------------------------------------------------------------------------------


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else repr(v)))


@dataclass
class _Context:
    """Everything an item needs that is the same for every item."""

    pipe: object
    plan: Plan  # the sweep's: groups, steps, n_tokens of every recorded prompt
    layouts: dict[str, tuple[list[str], list[int], list[str]]]  # recorded prompt → tokens, positions, encoders
    steps: int
    guidance_scale: float
    height: int | None
    width: int | None
    edit_steps: object
    schedule: object
    timesteps: list[float]
    items: list[Item]
    spec: dict
    attrs: dict = field(default_factory=dict)

    def item_plan(self, prompts: list[str], seed: int) -> Plan:
        tokens, positions, encoders = zip(*(self.layouts[p] for p in prompts))
        return replace(self.plan, samples=[(p, seed) for p in prompts], tokens=list(tokens),
                       positions=list(positions), encoders=list(encoders))

    def group_dims(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Store group → (variable, its dims), the recording's schema."""
        out = {}
        for group in self.plan.groups:
            out[group] = ("attn", self.plan.dims(group))
        out["images"] = ("image", ("sample", "iy", "ix", "channel"))
        return out

    def layout(self) -> dict[str, xr.Dataset]:
        """The store's groups over every item, maps as lazy zeros (only metadata and coordinates get written)."""
        import dask.array as da

        n = len(self.items)
        full = self.item_plan([it.recorded_prompt for it in self.items], 0)
        full = replace(full, samples=[(it.recorded_prompt, it.seed) for it in self.items])
        arrays = {g: da.zeros((n, *self.plan.group_shape(g)), chunks=(1, *self.plan.group_shape(g)),
                              dtype=np.float16) for g in self.plan.groups}
        h, w = self.plan.image_hw
        images = da.zeros((n, h, w, 3), chunks=(1, h, w, 3), dtype=np.uint8)
        groups = batch_datasets(full, slice(0, n), arrays, images, self.timesteps)
        extra = {"source": ("sample", np.array([it.prompt for it in self.items], dtype=object)),
                 "method": ("sample", np.array([it.method for it in self.items], dtype=object))}
        return {g: ds.assign_coords(extra) for g, ds in groups.items()}


def _attrs(pipe, ctx: _Context) -> dict:
    """The recording's root attributes (no creation time: the store depends on the items alone) and the spec."""
    import diffusers
    import transformers

    import probe

    p = ctx.plan
    return {
        "model": str(pipe.config.get("_name_or_path") or type(pipe).__name__),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": ctx.steps,
        "guidance_scale": ctx.guidance_scale,
        "heads": p.heads if isinstance(p.heads, str) else list(p.heads),
        "height": p.image_hw[0],
        "width": p.image_hw[1],
        "negative_prompt": "",
        "probe_version": probe.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": str(torch.__version__),
        "sweep": json.dumps(ctx.spec, sort_keys=True),
    }


def _stored_spec(store: Path) -> dict | None:
    import zarr

    try:
        text = zarr.open_group(str(store), mode="r").attrs.get("sweep")
    except Exception:  # not a zarr group at all
        return None
    return json.loads(text) if isinstance(text, str) else None


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_spec(store: Path, spec: dict) -> None:
    stored = _stored_spec(store)
    if stored is None:
        raise SweepMismatch(f"{store} exists but is not a sweep's store (no 'sweep' attribute). Give another out "
                            "folder, or delete it to start a sweep there.")
    if stored == spec:
        return
    names = sorted(set(stored) | set(spec), key=lambda k: (k not in ("prompts", "seeds", "methods"), k))
    differ = [f"{k}: the store has {_short(stored.get(k))}, this sweep {_short(spec.get(k))}"
              for k in names if stored.get(k) != spec.get(k)]
    raise SweepMismatch(
        f"{store.parent} was laid out for a different sweep ({'; '.join(differ)}). To resume it, run it with the "
        "same prompts, seeds, methods and settings; for a new sweep give another out folder, or delete "
        f"{store.parent} to start this one over there. (A sweep's items are fixed when its store is laid out: "
        "more seeds or prompts make a new sweep.)"
    )


class _Faults:
    """``PROBE_SWEEP_FAULT=N[@RANK]``: exit abruptly at this process's N-th write (fault-injection tests)."""

    def __init__(self, rank: int):
        text = os.environ.get(FAULT_ENV, "").strip()
        count, _, only = text.partition("@")
        self.left = int(count) if count and (not only or int(only) == rank) else None

    def point(self) -> None:
        if self.left is None:
            return
        self.left -= 1
        if self.left <= 0:
            os._exit(FAULT_EXIT)


def _lay_out(out: Path, ctx: _Context, faults: _Faults) -> None:
    """Create the store if it is not there (in a side folder, renamed into place: never half laid out), else check
    that it is this sweep's."""
    store = out / MAPS
    _remove_stale_layouts(out)
    if not store.exists():
        groups = ctx.layout()
        room_for(store, sum(int(v.nbytes) for ds in groups.values() for v in ds.data_vars.values()))
        tmp = out / f"{MAPS}.layout-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            xr.Dataset(attrs=ctx.attrs).to_zarr(tmp, mode="w", consolidated=False)
            for group, ds in groups.items():
                ds.to_zarr(tmp, group=group, mode="a", compute=False, consolidated=False, encoding=zarr_encoding(ds),
                           write_empty_chunks=True)
            faults.point()
            try:
                os.rename(tmp, store)
                _write_json(out / SPEC, {**ctx.spec, "laid_out": _now(), "host": socket.gethostname()})
            except OSError:
                if not store.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _check_spec(store, ctx.spec)


def _remove_stale_layouts(out: Path) -> None:
    """Side folders of layouts whose process is gone (this host), or old ones (others): a killed layout's."""
    host = socket.gethostname()
    for stale in out.glob(f"{MAPS}.layout-*"):
        name_host, _, pid = stale.name.removeprefix(f"{MAPS}.layout-").rpartition("-")[0].rpartition("-")
        gone = name_host == host and pid.isdigit() and not _alive(int(pid))
        try:
            old = time.time() - stale.stat().st_mtime > LAYOUT_STALE_SECONDS
        except FileNotFoundError:
            continue
        if gone or old:
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _write_json(path: Path, value, durable: bool = False) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(value, f, sort_keys=True, indent=1)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _name(index: int) -> str:
    return f"{index:06d}"


def _chunk_dirs(store: Path, group_dims: dict, index: int) -> list[Path]:
    """The folders that hold item ``index``'s chunks (zarr 3's ``c/<i>/…`` keys; one sample per chunk)."""
    return [store / group / var / "c" / str(index) for group, (var, _) in group_dims.items()]


def _item_files(store: Path, group_dims: dict, index: int) -> dict[str, Path]:
    found = {}
    for folder in _chunk_dirs(store, group_dims, index):
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.name.endswith(".partial"):
                    found[path.relative_to(store).as_posix()] = path
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- running items ---------------------------------------------------------------------------------------------------

# the fields of probe.studies.guided.NO_GUIDANCE_SCHEDULE, set on the sweep's own schedule
NO_GUIDANCE_SCHEDULE_FIELDS = {"alter_fraction": 0.0, "thresholds": {}}


def _run(ctx: _Context, item: Item) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Generate one item: its maps (group → (1, …) float16), image (1, H, W, 3) uint8 and table extras."""
    pipe, device = ctx.pipe, ctx.pipe._execution_device
    size = {"height": ctx.height, "width": ctx.width}
    if item.kind == "edit":
        from probe.steer.edit import edit

        recorder = Recorder(ctx.item_plan([item.prompt, item.target], item.seed), slice(0, 2), device, ctx.steps)
        result = edit(pipe, item.prompt, item.target, seed=item.seed, inject=item.variant, inject_steps=ctx.edit_steps,
                      steps=ctx.steps, guidance_scale=ctx.guidance_scale, after=[recorder],
                      output_type="np", **size)
        maps = {g: a[1:2] for g, a in recorder.to_host().items()}
        s = result.settings
        return maps, to_uint8(np.asarray(result.edited)[None]), {"injected_layers": len(s.layers),
                                                                   "injected_steps": len(s.steps)}
    recorder = Recorder(ctx.item_plan([item.prompt], item.seed), slice(0, 1), device, ctx.steps)
    if item.kind == "guide":
        from probe.steer.guide import Schedule, generate

        # the schedule the sweep recorded in its spec (Schedule() unless given), never a model folder's defaults:
        # a resumed sweep must run what its folder says it ran
        schedule = (replace(ctx.schedule or Schedule(), **NO_GUIDANCE_SCHEDULE_FIELDS) if item.variant == "none"
                    else ctx.schedule or Schedule())
        objective = "ae" if item.variant == "none" else item.variant
        result = generate(pipe, item.prompt, subjects=list(item.subjects), objective=objective, seed=item.seed,
                          schedule=schedule, steps=ctx.steps, guidance_scale=ctx.guidance_scale, output_type="np",
                          progress=False, consumers=[recorder], **size)
        history = result.history
        start, end = result.objective_span
        extra = {"subjects": ",".join(item.subjects), "guided_steps": len(history), "loss_start": start,
                 "loss_end": end}
        return recorder.to_host(), to_uint8(np.asarray(result.images)), extra
    with Tap(pipe, [recorder], **size):
        result = pipe(prompt=[item.prompt], generator=[torch.Generator(device).manual_seed(item.seed)],
                      output_type="np", **generation(pipe, ctx.steps, ctx.guidance_scale, caller="sweep")
                      .pipeline_kwargs(), **{k: v for k, v in size.items() if v is not None})
    return recorder.to_host(), to_uint8(result.images), {}


def _write(out: Path, ctx: _Context, item: Item, maps: dict[str, np.ndarray], image: np.ndarray, row: dict,
           faults: _Faults, durable: bool) -> None:
    """The item's region of every group, its row, then its marker (with the chunks' digests): in that order."""
    store = out / MAPS
    region = {"sample": slice(item.index, item.index + 1)}
    for group, (var, dims) in ctx.group_dims().items():
        data = image if group == "images" else maps[group]
        xr.Dataset({var: (dims, data)}).to_zarr(store, group=group, region=region, consolidated=False,
                                                write_empty_chunks=True)
        faults.point()
    files = _item_files(store, ctx.group_dims(), item.index)
    if durable:
        for path in files.values():
            _fsync(path)
    rows = out / ROWS
    part = rows / f"{_name(item.index)}.parquet"
    tmp = part.with_name(part.name + ".partial")
    pd.DataFrame([row]).to_parquet(tmp, index=False)
    if durable:
        _fsync(tmp)
    os.replace(tmp, part)
    faults.point()
    _write_json(out / DONE / f"{_name(item.index)}.json",
                {"item": item.index, "chunks": {k: _digest(p) for k, p in files.items()}}, durable=durable)
    faults.point()


def _log(out: Path, rank: int, world: int, event: str, index: int) -> None:
    line = f"{_now()} {socket.gethostname()} pid={os.getpid()} rank={rank}/{world} {event} {index}\n"
    with open(out / LOG, "a") as f:
        f.write(line)


def done(out: str | Path) -> list[int]:
    """The items of the sweep in ``out`` that are finished (their marker is written)."""
    folder = Path(out) / DONE
    return sorted(int(p.stem) for p in folder.glob("*.json")) if folder.is_dir() else []


def deal(todo: Sequence[Item], processes: int) -> list[int]:
    """The process of each item: each method's items in turn, the turn carried on from one method to the next, so
    every process gets a near-equal share of every method (``i % processes`` would give one process every guided
    item of a two-method sweep of two processes)."""
    turn, ranks = 0, [0] * len(todo)
    for method in dict.fromkeys(it.method for it in todo):
        for it in todo:
            if it.method == method:
                ranks[it.index], turn = turn % processes, turn + 1
    return ranks


def _intact(out: Path, index: int) -> bool:
    """Whether a finished item's chunks and row are still the ones its marker names."""
    try:
        marker = json.loads((out / DONE / f"{_name(index)}.json").read_text())
    except (OSError, ValueError):
        return False
    store = out / MAPS
    return (out / ROWS / f"{_name(index)}.parquet").is_file() and all(
        (store / rel).is_file() and _digest(store / rel) == digest for rel, digest in marker["chunks"].items())


@dataclass
class SweepRun:
    """What one process did: the items it computed and those it found done, of ``n_items``."""

    out: Path
    n_items: int
    rank: int
    processes: int
    computed: list[int]
    skipped: list[int]
    seconds: float

    def summary(self) -> str:
        finished = len(done(self.out))
        return (f"process {self.rank} of {self.processes}: computed {len(self.computed)} items, "
                f"{len(self.skipped)} were done already; {finished} of {self.n_items} items done in {self.out}")


def _process_share(shard) -> tuple[int, int, object]:
    """(index, count, state): this process's place among the sweep's processes."""
    if shard is not None:
        if len(shard) != 2 or not 0 <= int(shard[0]) < int(shard[1]):
            raise ValueError(f"shard takes (index, count) with 0 ≤ index < count, e.g. (0, 4) (command line: "
                             f"--shard 0/4); got {tuple(shard)}")
        return int(shard[0]), int(shard[1]), None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def _as_schedule(schedule):
    """A :class:`probe.steer.guide.Schedule` from itself, None or its fields (as JSON gives them back)."""
    from probe.steer.guide import Schedule

    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    fields = dict(schedule)
    if "thresholds" in fields:
        fields["thresholds"] = {int(step): float(v) for step, v in fields["thresholds"].items()}
    if "scale_range" in fields:
        fields["scale_range"] = tuple(fields["scale_range"])
    return Schedule(**fields)


def sweep(
    model,
    prompts,
    *,
    seeds,
    methods=("record",),
    out: str | Path,
    targets=None,
    subjects=None,
    settings: RecordSettings | None = None,
    height: int | None = None,
    width: int | None = None,
    edit_steps=0.8,
    schedule=None,
    shard: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
    durable: bool = True,
    progress: bool = True,
    threads: int | None = None,
    **fields,
) -> SweepRun:
    """Run this process's share of the sweep prompts × seeds × methods into ``out`` (resuming a stopped one).

    Recording settings are :func:`probe.record.record`'s: ``settings`` (a :class:`probe.record.RecordSettings`) or
    its fields as keywords (``steps``, ``guidance_scale``, ``kinds``, ``layers``, ``heads``, ``keep_steps``);
    ``edit_steps`` is :func:`probe.steer.edit.edit`'s ``steps`` and ``schedule`` a :class:`probe.steer.guide.Schedule`
    (or
    its fields as a dict) for the guided methods. ``shard=(index, count)`` runs one share without a process group;
    otherwise the share is ``accelerate.PartialState()``'s. ``durable``: fsync each item's files before its marker.
    ``threads``: torch threads while the sweep runs (None: leave torch's setting).
    """
    chosen = _sweep_settings(settings, fields)
    out = Path(out)
    if out.exists() and not out.is_dir() or out.is_symlink():
        raise ValueError(f"out={out} is a file or a symbolic link; a sweep writes a folder: give a folder's path")
    out.mkdir(parents=True, exist_ok=True)
    rank, world, state = _process_share(shard)
    lock = (locked(out / "sweep", shared=True, what=f"the sweep in {out}") if os.environ.get(LAUNCHED_ENV)
            or world > 1 and shard is None else _shard_lock(out, shard))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with lock:
            return _sweep(model, prompts, out=out, rank=rank, world=world, state=state, seeds=seeds, methods=methods,
                          targets=targets, subjects=subjects, settings=chosen, height=height, width=width,
                          edit_steps=edit_steps, schedule=schedule, device=device, durable=durable,
                          progress=progress)
    finally:
        torch.set_num_threads(previous)


def _sweep_settings(settings: RecordSettings | None, fields: dict) -> RecordSettings:
    """The recording settings of a sweep: every item is recorded as :func:`probe.record.record` would, with the
    settings a sweep's shared store can hold (maps of every query and key, the prompt's own tokens)."""
    chosen = RecordSettings.only(fields, settings, "sweep")
    plain = RecordSettings()
    odd = [name for name in ("keep_padding", "self_keys", "self_queries", "self_store")
           if getattr(chosen, name) != getattr(plain, name)]
    if odd:
        raise ValueError(f"a sweep records full maps of the prompt's tokens; {', '.join(odd)} is for probe.record")
    return chosen


@contextmanager
def _shard_lock(out: Path, shard: tuple[int, int] | None):
    """A single process holds the folder alone; a shard shares it with the other shards but holds its own share."""
    if shard is None:
        with locked(out / "sweep", what=f"the sweep in {out}"):
            yield
        return
    with locked(out / "sweep", shared=True, what=f"the sweep in {out}"), \
            locked(out / f"shard-{shard[0]}-of-{shard[1]}", what=f"shard {shard[0]}/{shard[1]} of the sweep in {out}"):
        yield


def _still_finished(out: Path, mine: list) -> set[int]:
    """The items of ``mine`` finished in ``out`` whose chunks and rows are as written; the others' markers are
    removed (with a warning naming them), so they are computed again."""
    finished = set(done(out))
    lost = [it.index for it in mine if it.index in finished and not _intact(out, it.index)]
    if lost:
        warnings.warn(f"{out}: the chunks or rows of finished items {lost} changed or were lost since they were "
                      "written; they are computed again", stacklevel=3)
        for index in lost:
            (out / DONE / f"{_name(index)}.json").unlink(missing_ok=True)
    return finished - set(lost)


def _sweep(model, prompts, *, out: Path, rank: int, world: int, state, seeds, methods, targets, subjects,
           settings: RecordSettings, height, width, edit_steps, schedule, device, durable, progress) -> SweepRun:
    from probe.steer.guide import Schedule

    steps, guidance_scale, kinds = settings.steps, settings.guidance_scale, settings.kinds
    layers, heads, keep_steps = settings.layers, settings.heads, settings.keep_steps
    started = time.perf_counter()
    todo = items(prompts, seeds, methods, targets=targets, subjects=subjects)
    schedule = _as_schedule(schedule)
    if device is None and state is not None and state.device.type != "cpu":
        device = state.device
    pipe = load(model, device=device)
    run = generation(pipe, steps, guidance_scale, caller="sweep")  # the model's own where not chosen, as record
    steps, guidance_scale = run.steps, run.guidance_scale
    settings = replace(settings, steps=steps, guidance_scale=guidance_scale)
    _check_items(pipe, todo)
    texts = list(dict.fromkeys(p for it in todo for p in (it.recorded_prompt, it.prompt)))
    sweep_plan = plan(pipe, texts, seeds=[0], settings=settings, height=height, width=width)
    layouts = {p: (sweep_plan.tokens[i], sweep_plan.positions[i], sweep_plan.encoders[i])
               for i, p in enumerate(texts)}
    from probe.fingerprint import weights_id
    from probe.steer.pipelines import set_timesteps

    timesteps = [float(t) for t in set_timesteps(pipe, steps, *sweep_plan.image_hw)]
    uses = {it.kind for it in todo}
    spec = _jsonable({
        "items": len(todo), "prompts": list(dict.fromkeys(it.prompt for it in todo)),
        "seeds": list(dict.fromkeys(it.seed for it in todo)), "methods": list(dict.fromkeys(it.method for it in todo)),
        "targets": {it.prompt: it.target for it in todo if it.target},
        "subjects": {it.prompt: list(it.subjects) for it in todo if it.subjects},
        "weights": weights_id(pipe), "steps": steps, "guidance_scale": guidance_scale, "kinds": list(kinds),
        "layers": layers, "heads": heads, "keep_steps": keep_steps, "image_size": list(sweep_plan.image_hw),
        "edit_steps": edit_steps if "edit" in uses else None,
        "schedule": asdict(schedule or Schedule()) if "guide" in uses else None,
    })
    ctx = _Context(pipe, sweep_plan, layouts, steps, guidance_scale, height, width, edit_steps, schedule,
                   timesteps, todo, spec)
    ctx.attrs = _attrs(pipe, ctx)
    for folder in (out, out / ROWS, out / DONE):
        folder.mkdir(parents=True, exist_ok=True)
    faults = _Faults(rank)
    if state is not None and state.num_processes > 1:
        with state.main_process_first():
            _lay_out(out, ctx, faults)
    else:
        _lay_out(out, ctx, faults)

    ranks = deal(todo, world)
    mine = [it for it in todo if ranks[it.index] == rank]
    finished = _still_finished(out, mine)
    computed, skipped = [], [it.index for it in mine if it.index in finished]
    bar = tqdm(total=len(mine), initial=len(skipped), desc=f"sweep {rank}/{world}", unit="item",
               disable=not progress, position=rank if world > 1 else None)
    store = out / MAPS
    try:
        for item in mine:
            if item.index in finished:
                continue
            for folder in _chunk_dirs(store, ctx.group_dims(), item.index):
                shutil.rmtree(folder, ignore_errors=True)  # a killed attempt's chunks and partial files
            _log(out, rank, world, "start", item.index)
            begin, when = time.perf_counter(), _now()
            maps, image, extra = _run(ctx, item)
            row = {"item": item.index, "source": item.prompt, "prompt": item.recorded_prompt, "seed": item.seed,
                   "method": item.method, "rank": rank, "processes": world, "host": socket.gethostname(),
                   "threads": torch.get_num_threads(), "started": when, "seconds": time.perf_counter() - begin,
                   **extra}
            _write(out, ctx, item, maps, image, row, faults, durable)
            _log(out, rank, world, "done", item.index)
            computed.append(item.index)
            bar.update()
    finally:
        bar.close()
    return SweepRun(out, len(todo), rank, world, computed, skipped, time.perf_counter() - started)


# -- reading a sweep -------------------------------------------------------------------------------------------------


def open_sweep(out: str | Path, finished_only: bool = True) -> xr.DataTree:
    """The sweep's store, lazily (dask, one sample per chunk); by default only the finished items."""
    from probe.record import open_recording

    store = Path(out) / MAPS
    if not store.exists():
        raise FileNotFoundError(f"no sweep in {out} (no {MAPS}); run probe sweep with --out {out} first")
    tree = open_recording(store)
    if not finished_only:
        return tree
    keep = np.asarray(done(out), dtype=int)
    return tree.map_over_datasets(lambda ds: ds.isel(sample=keep) if "sample" in ds.dims else ds)


def table(out: str | Path) -> pd.DataFrame:
    """One row per finished item (its part files merged, in item order)."""
    finished = done(out)
    parts = [pd.read_parquet(Path(out) / ROWS / f"{_name(i)}.parquet") for i in finished]
    if not parts:
        return pd.DataFrame(columns=["item", "source", "prompt", "seed", "method"])
    return pd.concat(parts, ignore_index=True).sort_values("item", ignore_index=True)


def verify(out: str | Path) -> list[str]:
    """Problems with the finished items' chunks (empty when every chunk file is the one its marker names)."""
    store, problems = Path(out) / MAPS, []
    for index in done(out):
        marker = json.loads((Path(out) / DONE / f"{_name(index)}.json").read_text())
        for rel, digest in marker["chunks"].items():
            path = store / rel
            if not path.is_file():
                problems.append(f"item {index}: chunk {rel} is missing")
            elif _digest(path) != digest:
                problems.append(f"item {index}: chunk {rel} differs from what was written")
        if not (Path(out) / ROWS / f"{_name(index)}.parquet").is_file():
            problems.append(f"item {index}: its table row is missing")
    return problems


# -- launching -------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, spec_path: str | Path, threads: int | None = None,
                   port: int | None = None) -> list[str]:
    """The command that runs a sweep written to ``spec_path`` in ``processes`` processes.

    One process: ``python -m probe._sweep_worker SPEC``. More: ``accelerate launch --multi_gpu --num_processes N``,
    which on a machine without GPUs still starts N processes (``--cpu`` would start one); each runs ``threads``
    torch threads (default :data:`THREADS`, as a single process does: one store whatever the process count).
    """
    worker = ["-m", "probe._sweep_worker", str(spec_path)]
    if processes <= 1:
        return [sys.executable, *worker]
    threads = threads or THREADS
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(threads), "--main_process_port", str(port or _free_port()),
            *worker]


def launch(processes: int, *, out: str | Path, threads: int | None = None, env: Mapping[str, str] | None = None,
           **kwargs) -> int:
    """Run :func:`sweep` (``model`` a name or folder, settings as JSON) in ``processes`` processes; the exit status.

    The arguments are written to ``out/launch.json`` for the workers, so a launch can be repeated by hand. The
    launcher holds the folder's lock while its workers run (a second launch is refused with
    :class:`probe.writes.OutputBusy`), and the workers die with it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(kwargs.get("model"), (str, os.PathLike)):
        raise ValueError("launch runs new processes: give model as a name or a folder, not a pipeline object")
    threads = threads or THREADS
    with locked(out / "sweep", what=f"the sweep in {out}") as lock:
        settings = kwargs.pop("settings", None)  # as its fields: the workers read JSON
        fields = {} if settings is None else {n: getattr(settings, n) for n in RecordSettings.names()}
        spec = _jsonable({**fields, **kwargs, "out": str(out), "threads": threads})
        _write_json(out / LAUNCH, spec)
        environment = {**os.environ, **(env or {}), LAUNCHED_ENV: "1", "OMP_NUM_THREADS": str(threads)}
        lock.share()  # the workers share it; another launch still cannot take it
        return subprocess.run(launch_command(processes, out / LAUNCH, threads), env=environment,
                              preexec_fn=die_with_parent).returncode


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``): a launcher killed
    with SIGKILL cannot stop its workers itself, and torch's launcher starts them in sessions of their own."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def launched() -> bool:
    """Whether this process was started by a distributed launcher (accelerate, torchrun)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: Sequence[str] | None = None) -> int:
    """One worker of a launched sweep: its arguments are the JSON file :func:`launch` wrote."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m probe._sweep_worker SPEC.json (written by probe.record.sweep.launch)", file=sys.stderr)
        return 2
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the launcher died before the request was made
        return 1
    spec = json.loads(Path(args[0]).read_text())
    run = sweep(spec.pop("model"), spec.pop("prompts"), **spec)
    print(run.summary(), flush=True)
    return 0

