"""A study split over processes and machines: shard ``I`` of ``N`` makes the rows of every ``N``-th unit into a table
of its own (``<table>_shard<I>of<N>.csv``), resumable like the whole study's; the shards' tables merge into one
process's table, from which the study's analysis runs as if one process had made every row.

``--shard I/N`` serves array jobs (Slurm), ``--shard auto`` a launcher's ranks (``accelerate launch``, ``torchrun``:
``RANK``, ``WORLD_SIZE``), ``--processes N`` runs N shards at once on one machine (one GPU each where there are GPUs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

Shard = tuple[int, int]  # (index, count)


def shard_of(text: str | None) -> Shard | None:
    """``--shard``: ``I/N``, or ``auto`` for the rank and world size a launcher gives (``accelerate launch``,
    ``torchrun``: ``RANK`` and ``WORLD_SIZE``); None for the whole study."""
    if text is None:
        return None
    if text == "auto":
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            raise ValueError("--shard auto reads RANK and WORLD_SIZE, which this process was not given: launch it "
                             "with accelerate launch or torchrun, or give --shard I/N")
        text = f"{rank}/{world}"
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not int(index) < int(count):
        raise ValueError(f"--shard takes I/N with 0 ≤ I < N (e.g. 0/4) or auto, not {text!r}")
    return int(index), int(count)


def in_shard(unit: int, shard: Shard | None) -> bool:
    """Whether unit number ``unit`` (in the study's order) is made by ``shard`` (every unit without one)."""
    return shard is None or unit % shard[1] == shard[0]


def shard_path(path: str | Path | None, shard: Shard | None) -> Path | None:
    """Where ``shard`` keeps the rows of the table at ``path`` (the table itself without a shard)."""
    if path is None or shard is None:
        return None if path is None else Path(path)
    path = Path(path)
    return path.with_name(f"{path.stem}_shard{shard[0]}of{shard[1]}{path.suffix}")


def shard_tables(table: str, folders: Sequence[str | Path]) -> list[Path]:
    """Every shard table of ``table`` in ``folders``, checked to be one complete split: one count N, shards 0 … N−1
    each once (a missing shard or two splits mixed is an error that names them)."""
    pattern = re.compile(rf"{re.escape(table)}_shard(\d+)of(\d+)\.csv")
    found: dict[tuple[int, int], Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob(f"{table}_shard*of*.csv")):
            match = pattern.fullmatch(path.name)
            if match is None:
                continue
            key = (int(match.group(1)), int(match.group(2)))
            if key in found and found[key].resolve() != path.resolve():
                raise ValueError(f"shard {key[0]}/{key[1]} of {table} is in two places: {found[key]} and {path}")
            found[key] = path
    if not found:
        raise FileNotFoundError(f"no shard tables {table}_shard<I>of<N>.csv in {', '.join(map(str, folders))}")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise ValueError(f"{table}: shards of different splits ({', '.join(f'of {n}' for n in counts)}); merge one")
    missing = sorted(set(range(counts[0])) - {i for i, _ in found})
    if missing:
        raise ValueError(f"{table}: shards {missing} of {counts[0]} are missing; run them (or copy their tables here)")
    return [found[(i, counts[0])] for i in range(counts[0])]


def merge_rows(paths: Sequence[Path], key: Sequence[str]) -> pd.DataFrame:
    """The shards' rows as one table; a row that two shards made (the same ``key``) is an error."""
    frame = pd.concat([pd.read_csv(p, dtype={"settings_id": str}) for p in paths], ignore_index=True)
    if frame.duplicated(list(key)).any():
        raise ValueError(f"the shards overlap: {int(frame.duplicated(list(key)).sum())} rows occur twice")
    return frame


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt V`` or ``--opt=V``): a command line its shards rerun."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(f"{option}="):
            kept.append(token)
    return kept


def run_processes(command: Sequence[str], processes: int) -> int:
    """Run ``python command… --shard I/N`` for I = 0 … N−1 at once, the CPU's threads shared between them and, where
    there are GPUs, one GPU each in turn; wait for all. Returns 0, or 1 (naming the failed shards) if any failed."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // processes)
    gpus = torch.cuda.device_count()
    children = []
    for i in range(processes):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # threads that do not fight over the cores
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        children.append(subprocess.Popen([sys.executable, *command, "--shard", f"{i}/{processes}"], env=env))
    failed = [i for i, child in enumerate(children) if child.wait() != 0]
    if failed:
        print(f"shards {failed} of {processes} failed; run the same command again to resume them", file=sys.stderr)
        return 1
    return 0


ROW_KEY = ("prompt", "seed", "method", "initno")  # one image of a guided study
PILOT_KEY = (*ROW_KEY, "step_size")  # one image of its step-size pilot (one per candidate step)


def splits(study) -> bool:
    """Whether ``study`` (a :class:`~probe.studies.registry.Study`) can be split: its function takes ``shard`` and
    ``calibrate_only`` (its rows are per image, made by :func:`~probe.studies.guided.guided_rows`)."""
    import inspect

    params = inspect.signature(study.run).parameters if study.run is not None else {}
    return "shard" in params and "calibrate_only" in params


def _union(paths: Sequence[Path], key: Sequence[str], into: Path) -> int:
    """``into`` rewritten as the rows it held plus every row of ``paths`` whose key it did not hold; the rows."""
    from probe.studies.common import TABLE_FLOAT_FORMAT, step_key
    from probe.writes import write_csv

    frames = [pd.read_csv(p, dtype={"settings_id": str}) for p in ([into] if into.is_file() else []) + list(paths)]
    frame = pd.concat(frames, ignore_index=True)
    keys = frame[list(key)].astype(str)
    if "step_size" in key:  # a step read back from a table equals the one it was made at
        keys["step_size"] = frame.step_size.map(step_key)
    frame = frame[~keys.duplicated()]
    write_csv(frame, into, float_format=TABLE_FLOAT_FORMAT)
    return len(frame)


def merge_study(name: str, folders: Sequence[str | Path], out: str | Path) -> Path:
    """The shards of study ``name`` found in ``folders`` (one complete split, :func:`shard_tables`) merged into
    ``out/<name>_images.csv`` beside the rows it already holds, and their step-size pilot's images into
    ``out/<name>_pilot_images.csv``, so that the study run in ``out`` makes no image and analyses the whole. Two
    shards that made the same image is an error."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = shard_tables(f"{name}_images", folders)
    merge_rows(parts, ROW_KEY)  # refuse overlapping shards before anything is written
    pilots = [p for p in (Path(f) / f"{name}_pilot_images.csv" for f in folders)
              if p.is_file() and p.resolve() != (out / p.name).resolve()]
    if pilots:
        _union(pilots, PILOT_KEY, out / f"{name}_pilot_images.csv")
    rows = _union(parts, ROW_KEY, out / f"{name}_images.csv")
    print(f"merged {len(parts)} shards of the {name} study: {rows} rows in {out / f'{name}_images.csv'}")
    return out / f"{name}_images.csv"
