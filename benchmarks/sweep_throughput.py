"""Sweep throughput: the same items in 1 and in 2 processes (``accelerate launch``), side by side in one run.

Each configuration is a fresh launch into its own folder (``probe.record.sweep.launch``), so its wall time includes
starting Python, importing torch and loading the model in every process. Reported per configuration: items per
second end to end (items / launch wall time) and while computing (items / the span from the first item's start to
the last item's end, read from the sweep's table), and the ratio 2 processes / 1 process of both. The two stores
are compared bit for bit (same threads per process, so they must be equal). ``--pairs K`` alternates K pairs and
reports the median ratios.

    python benchmarks/sweep_throughput.py                                  # built-in model, 32 items, 20 steps
    python benchmarks/sweep_throughput.py --model tiny --prompts 2 --seeds 4 --steps 4      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from probe.prompts import shapes_prompts
from probe.record import sweep as sweeps

ROOT = Path(__file__).resolve().parents[1]


def run_once(processes: int, threads: int, out: Path, settings: dict) -> dict:
    """One launch; its wall time, the span of its item computations and what each process computed."""
    start = time.perf_counter()
    code = sweeps.launch(processes, threads=threads, out=out,
                         env={"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}, **settings)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the {processes}-process launch failed (exit {code})")
    rows = sweeps.table(out)
    begin = pd.to_datetime(rows["started"])
    end = begin + pd.to_timedelta(rows["seconds"], unit="s")
    span = (end.max() - begin.min()).total_seconds()
    n = len(rows)
    return {"processes": processes, "threads": threads, "items": n, "wall_s": wall, "compute_span_s": span,
            "items_per_s": n / wall, "items_per_s_computing": n / span,
            "seconds_per_item": float(rows["seconds"].median()), "per_rank": rows.groupby("rank").size().to_dict()}


def same_store(a: Path, b: Path) -> bool:
    files = [sorted(p.relative_to(d / sweeps.MAPS) for p in (d / sweeps.MAPS).rglob("*") if p.is_file())
             for d in (a, b)]
    return files[0] == files[1] and all((a / sweeps.MAPS / f).read_bytes() == (b / sweeps.MAPS / f).read_bytes()
                                        for f in files[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--prompts", type=int, default=4, help="two-object prompts of the built-in world")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["record"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kinds", nargs="+", default=["cross", "self"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (both configurations)")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--keep", default=None, help="keep the sweeps in this folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    settings = {"model": args.model, "prompts": shapes_prompts(2, args.prompts), "seeds": list(range(args.seeds)),
                "methods": args.methods, "steps": args.steps, "kinds": args.kinds, "progress": False}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sweep-throughput-"))
    results = []
    for pair in range(args.pairs):
        runs = {}
        for processes in ((1, 2) if pair % 2 == 0 else (2, 1)):
            out = work / f"pair{pair}-{processes}proc"
            runs[processes] = run_once(processes, args.threads, out, settings)
            print(json.dumps(runs[processes]), flush=True)
        equal = same_store(work / f"pair{pair}-1proc", work / f"pair{pair}-2proc")
        results.append({"one": runs[1], "two": runs[2], "stores_equal": equal,
                        "ratio": runs[2]["items_per_s"] / runs[1]["items_per_s"],
                        "ratio_computing": runs[2]["items_per_s_computing"] / runs[1]["items_per_s_computing"]})
    ratio = statistics.median(r["ratio"] for r in results)
    computing = statistics.median(r["ratio_computing"] for r in results)
    one, two = results[0]["one"], results[0]["two"]
    print(f"\n{one['items']} items ({args.model}, {args.steps} steps, {' '.join(args.methods)}; "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs)")
    print("| processes | wall s | items/s end to end | items/s computing | s/item (median) |")
    print("|---|---|---|---|---|")
    for run in (one, two):
        print(f"| {run['processes']} | {run['wall_s']:.1f} | {run['items_per_s']:.3f} | "
              f"{run['items_per_s_computing']:.3f} | {run['seconds_per_item']:.2f} |")
    print(f"throughput 2 / 1 processes: {ratio:.2f} end to end, {computing:.2f} while computing "
          f"(median of {len(results)} pair(s)); stores equal bit for bit: "
          f"{all(r['stores_equal'] for r in results)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": {**settings, "threads": args.threads},
                                              "pairs": results, "ratio": ratio, "ratio_computing": computing,
                                              "cpus": os.cpu_count()}, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(r["stores_equal"] for r in results) else 1)


if __name__ == "__main__":
    main()
