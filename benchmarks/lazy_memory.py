"""Peak memory of the out-of-core analysis (``probe.lazy.overlap_table``) at several store sizes, each in a fresh
process under an address-space limit.

Stores: ``probe.lazy.synthetic_store`` with the layout of a tiny-model recording (cross + self maps at 16² and 8²,
``--steps`` steps), ``--samples`` samples each. Each analysis runs in its own process: imports and a warm-up on a
2-sample store first, then ``RLIMIT_AS`` = that process's address space + ``--headroom`` MB (torch, dask and zarr
map ~3 GB that do not depend on the data, so the limit is set above them), VmHWM reset, the analysis, and an eager
load of the store's 16² self maps under the same limit for contrast (it must fail when the store is larger).

    python benchmarks/lazy_memory.py                         # 48, 192 and 768 samples (0.17, 0.7, 2.8 GB)
    python benchmarks/lazy_memory.py --samples 48 192 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import probe
from probe import lazy

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
ANALYSE = textwrap.dedent("""
    import json, resource, sys
    import xarray as xr
    from probe import lazy

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    warm, path, headroom, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    lazy.overlap_table(warm, workers=workers)
    base = status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (base + headroom, base + headroom))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    rows = len(lazy.overlap_table(path, workers=workers))
    report = {"base_vm": base, "rss_before": before, "peak_rss": status("VmHWM"), "peak_vm": status("VmPeak"),
              "rows": rows}
    try:
        xr.open_zarr(path, group="self/res16", consolidated=False)["attn"].load()
        report["eager"] = "loaded"
    except MemoryError:
        report["eager"] = "MemoryError"
    print(json.dumps(report))
""")


def analyse(warm: Path, store: Path, headroom: int, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", ANALYSE, str(warm), str(store), str(headroom * MB), str(workers)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the analysis of {store} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", type=int, default=[48, 192, 768])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--headroom", type=int, default=160, help="MB of address space above the warmed-up process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    like = probe.record(probe.load("tiny"), ["a red circle and a blue square", "a cat and a dog"], seeds=[0],
                        steps=args.steps, progress=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="lazy-memory-") as work:
        warm = Path(work) / "warm.zarr"
        lazy.synthetic_store(warm, 2, like)
        print("| store on disk | samples | × headroom | analysis peak RSS above its start | process peak RSS | "
              "eager load |")
        print("|---|---|---|---|---|---|")
        for n in args.samples:
            store = Path(work) / f"store{n}.zarr"
            size = lazy.synthetic_store(store, n, like)
            runs = [analyse(warm, store, args.headroom, args.workers) for _ in range(args.runs)]
            used = [(r["peak_rss"] - r["rss_before"]) / MB for r in runs]
            peak = [r["peak_rss"] / MB for r in runs]
            print(f"| {size / MB:,.0f} MB | {n} | {size / MB / args.headroom:.1f} | "
                  f"{min(used):.0f}–{max(used):.0f} MB | {min(peak):.0f}–{max(peak):.0f} MB | "
                  f"{', '.join(sorted({r['eager'] for r in runs}))} |", flush=True)
            results.append({"samples": n, "bytes": size, "runs": runs})
            store_files = list(store.rglob("*"))
            for f in sorted(store_files, reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
