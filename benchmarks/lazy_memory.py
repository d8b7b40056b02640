"""Peak memory of the out-of-core analysis (``probe.analysis.lazy.overlap_table``) at several store sizes, each in a
fresh
process under an address-space limit or, with ``--cgroup MB``, in a fresh memory cgroup of that size.

Stores: ``probe.analysis.lazy.synthetic_store`` with the layout of a tiny-model recording (cross + self maps at 16² and
8²,
``--steps`` steps), ``--samples`` samples each. Each analysis runs in its own process: imports and a warm-up on a
2-sample store first, then ``RLIMIT_AS`` = that process's address space + ``--headroom`` MB (torch, dask and zarr
map ~3 GB that do not depend on the data, so the limit is set above them), VmHWM reset, the analysis, and an eager
load of the store's 16² self maps under the same limit for contrast (it must fail when the store is larger).

    python benchmarks/lazy_memory.py                         # 48, 192 and 768 samples (0.17, 0.7, 2.8 GB)
    python benchmarks/lazy_memory.py --samples 48 192 --runs 3
    python benchmarks/lazy_memory.py --cgroup 700 --samples 192 960   # resident memory (RSS + page cache) ≤ 700 MB

Under ``--cgroup`` the whole process (imports included) is charged against the limit, page cache too (which the
kernel reclaims), and the eager contrast is ended by the cgroup's OOM killer instead of a MemoryError.
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
from probe.analysis import lazy

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
ANALYSE = textwrap.dedent("""
    import json, resource, sys
    import xarray as xr
    from probe.analysis import lazy

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    warm, path, headroom, workers, peak_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    lazy.overlap_table(warm, workers=workers)
    base = status("VmSize")
    if headroom:
        resource.setrlimit(resource.RLIMIT_AS, (base + headroom, base + headroom))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    rows = len(lazy.overlap_table(path, workers=workers))
    report = {"base_vm": base, "rss_before": before, "peak_rss": status("VmHWM"), "peak_vm": status("VmPeak"),
              "rows": rows}
    if peak_file:  # the cgroup's peak charge (RSS and page cache) up to here, before the eager contrast
        report["cgroup_peak"] = int(open(peak_file).read())
    print(json.dumps(report), flush=True)
    try:
        xr.open_zarr(path, group="self/res16", consolidated=False)["attn"].load()
        print(json.dumps({"eager": "loaded"}))
    except MemoryError:
        print(json.dumps({"eager": "MemoryError"}))
""")


def memory_cgroup(limit_mb: int, name: str) -> tuple[Path, str]:
    """A fresh child of this process's memory cgroup (v1 or v2) limited to ``limit_mb``; (its folder, the file
    holding its peak usage)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "memory" in line.split(":", 2)[1].split(",")]
    if v1:
        group = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") / name
        limits, peak = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"], "memory.max_usage_in_bytes"
    else:
        own = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        group = Path("/sys/fs/cgroup") / own.lstrip("/") / name
        limits, peak = ["memory.max", "memory.swap.max"], "memory.peak"
    group.mkdir()
    for limit in limits:
        if (group / limit).exists():
            (group / limit).write_text(str(limit_mb * MB) if "swap.max" not in limit else "0")
    return group, peak


def analyse(warm: Path, store: Path, headroom: int, workers: int, cgroup: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    group, join, peak_file = None, None, ""
    if cgroup:
        group, peak_name = memory_cgroup(cgroup, f"lazy-memory-{os.getpid()}-{store.stem}")
        peak_file = str(group / peak_name)

        def join():  # in the child, before it execs: every byte it maps is charged to the group
            (group / "cgroup.procs").write_text(str(os.getpid()))
    try:
        done = subprocess.run([sys.executable, "-c", ANALYSE, str(warm), str(store),
                               str(0 if cgroup else headroom * MB), str(workers), peak_file],
                              env=env, capture_output=True, text=True, preexec_fn=join)
        lines = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"the analysis of {store} failed:\n{done.stderr[-3000:]}")
        report = lines[0]
        report["eager"] = lines[1]["eager"] if len(lines) > 1 else (
            "OOM-killed" if done.returncode == -9 else f"exit {done.returncode}")
        return report
    finally:
        if group is not None:
            group.rmdir()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", type=int, default=[48, 192, 768])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--headroom", type=int, default=160, help="MB of address space above the warmed-up process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--cgroup", type=int, default=None, metavar="MB",
                   help="run each analysis in a fresh memory cgroup of this many MB instead of under RLIMIT_AS")
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
            runs = [analyse(warm, store, args.headroom, args.workers, args.cgroup) for _ in range(args.runs)]
            used = [(r["peak_rss"] - r["rss_before"]) / MB for r in runs]
            peak = [r["peak_rss"] / MB for r in runs]
            print(f"| {size / MB:,.0f} MB | {n} | {size / MB / (args.cgroup or args.headroom):.1f} | "
                  f"{min(used):.0f}–{max(used):.0f} MB | {min(peak):.0f}–{max(peak):.0f} MB | "
                  f"{', '.join(sorted({r['eager'] for r in runs}))} |"
                  + (f" cgroup peak {max(r['cgroup_peak'] for r in runs) / MB:.0f} MB" if args.cgroup else ""),
                  flush=True)
            results.append({"samples": n, "bytes": size, "runs": runs})
            store_files = list(store.rglob("*"))
            for f in sorted(store_files, reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
