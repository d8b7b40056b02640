"""The recording-overhead benchmarks on two versions of the code in one run: a git revision (``--before``, checked
out to a temporary worktree) and the working tree, alternated round by round, so both meet the same machine load.
Each round runs ``record_overhead.py --only time`` and ``dit_record_overhead.py`` once per version; the table gives
each case's median ratio (recorded / plain) per version and their difference.

    python benchmarks/before_after.py --before d75a895 --rounds 2 --out benchmarks/before_after.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name → (script, its arguments, how to read (case, ratio) rows from its JSON)
    "unet": ("record_overhead.py", ["--only", "time"],
             lambda d: [(f"SD1.5 ({r['case']})", r["median_ratio"]) for r in d["timing"]]),
    "dit": ("dit_record_overhead.py", [],
            lambda d: [(f"{r['family'].upper()} ({r['case']})", r["ratio"]) for r in d]),
}


def run_once(tree: Path, name: str, pairs: int, steps: int, threads: int) -> list[tuple[str, float]]:
    """One benchmark on the code in ``tree`` (its ``probe`` first on the path), in a fresh process."""
    script, extra, read = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(ROOT / "benchmarks" / script), *extra, "--pairs", str(pairs), "--steps",
                   str(steps), "--threads", str(threads), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run(command, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
        return read(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision to compare the working tree with")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (before, after) per benchmark")
    p.add_argument("--pairs", type=int, default=3, help="plain/recorded pairs per benchmark run")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=sorted(RUNS), help="one benchmark (default both)")
    p.add_argument("--out", type=Path, help="also write the table here (.md)")
    args = p.parse_args(argv)
    ratios: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for name in [args.only] if args.only else list(RUNS):
                for round_ in range(args.rounds):
                    order = [("before", before), ("after", ROOT)][:: 1 if round_ % 2 == 0 else -1]
                    for version, tree in order:
                        for case, ratio in run_once(tree, name, args.pairs, args.steps, args.threads):
                            ratios.setdefault((case, version), []).append(ratio)
                            print(f"{name} round {round_ + 1} {version}: {case} {ratio:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    cases = list(dict.fromkeys(case for case, _ in ratios))
    lines = [f"| case | before ({args.before}) | after (working tree) | after − before |", "|---|---|---|---|"]
    for case in cases:
        if (case, "before") not in ratios or (case, "after") not in ratios:  # a family one version does not run
            continue
        b, a = statistics.median(ratios[case, "before"]), statistics.median(ratios[case, "after"])
        lines.append(f"| {case} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
