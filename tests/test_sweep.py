"""Sweeps: items, errors, equality with probe.record, two processes against one, and killed sweeps resumed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import probe
from probe.analysis import lazy
from probe.cli import main
from probe.record import sweep as sweeps

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle and a blue square", "a cat and a dog"]
TARGETS = ["a blue circle and a blue square", "a cat and a cat"]
SETTINGS = dict(model="tiny", prompts=PROMPTS, seeds=[0, 1], methods=["record", "guide:ae", "edit:self"],
                targets=TARGETS, steps=2)  # 12 items, 32 px, cross + self maps
CLI = ["--model", "tiny", "--prompt", *PROMPTS, "--seed", "0", "1", "--method", "record", "ae", "edit:self",
       "--target", *TARGETS, "--steps", "2"]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop(sweeps.FAULT_ENV, None)
    env.update(extra)
    return env


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _assert_same_store(a: Path, b: Path) -> None:
    fa, fb = _files(a / sweeps.MAPS), _files(b / sweeps.MAPS)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    different = [k for k in fa if fa[k] != fb[k]]
    assert not different, different
    assert any("/attn/c/" in k for k in fa)  # chunks were compared, not only metadata


def _events(out: Path) -> list[tuple[str, int]]:
    lines = (out / sweeps.LOG).read_text().splitlines()
    return [(line.split()[-2], int(line.split()[-1])) for line in lines]


def test_items_are_prompts_by_seeds_by_methods():
    found = sweeps.items(["a cat and a dog"], [3, 4], ["record", "ae", "none", "edit"], targets=["a cat and a cat"])
    assert [(it.index, it.seed, it.method) for it in found] == [
        (0, 3, "record"), (1, 3, "guide:ae"), (2, 3, "guide:none"), (3, 3, "edit:self"),
        (4, 4, "record"), (5, 4, "guide:ae"), (6, 4, "guide:none"), (7, 4, "edit:self")]
    assert found[1].subjects == ("cat", "dog") and found[3].recorded_prompt == "a cat and a cat"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(methods=["record", "bogus"]), "unknown method 'bogus'.*guide:<objective>.*edit:<inject>"),
    (dict(methods=["guide:sharpen"]), "unknown method 'guide:sharpen'.*objectives: none, ae"),
    (dict(methods=["edit:swap"]), "inject: self, cross, none"),
    (dict(methods=["edit"]), "need a target prompt for every prompt.*--target"),
    (dict(methods=["edit"], targets=["only one"]), "one per prompt"),
    (dict(targets={"a horse": "a cow"}), "not in the sweep"),
    (dict(seeds=[0, 0]), r"seeds \[0\] given more than once"),
    (dict(seeds=[]), "at least one of seeds"),
    (dict(prompts=[""]), "non-empty strings"),
])
def test_bad_item_specifications_say_what_is_wrong(kwargs, message):
    args = {"prompts": ["a cat and a dog", "a red circle"], "seeds": [0], "methods": ["record"], **kwargs}
    with pytest.raises(ValueError, match=message):
        sweeps.items(args.pop("prompts"), args.pop("seeds"), args.pop("methods"), **args)


def test_cli_reports_a_bad_method(tmp_path, capsys):
    assert main(["sweep", "--model", "tiny", "--prompt", "a cat", "--method", "bogus", "--out", str(tmp_path)]) == 2
    assert "probe sweep: unknown method 'bogus'" in capsys.readouterr().err


def test_errors_that_need_the_model(tmp_path, tiny):
    small = dict(steps=2, kinds=("cross",), shard=(0, 1), progress=False)
    with pytest.raises(ValueError, match=r"shard takes \(index, count\) with 0 ≤ index < count.*--shard 0/4"):
        sweeps.sweep(tiny, ["a cat"], seeds=[0], out=tmp_path / "x", **{**small, "shard": (2, 2)})
    with pytest.raises(ValueError, match="item 0 .*'horse' is not a word of the prompt"):
        sweeps.sweep(tiny, ["a cat and a dog"], seeds=[0], methods=["ae"], subjects=[["horse"]],
                     out=tmp_path / "a", **small)
    with pytest.raises(ValueError, match="aligns the prompts token by token"):
        sweeps.sweep(tiny, ["a cat and a dog"], seeds=[0], methods=["edit:cross"], targets=["a cat"],
                     out=tmp_path / "b", **small)
    sweeps.sweep(tiny, ["a cat and a dog"], seeds=[0], out=tmp_path / "c", **small)
    with pytest.raises(sweeps.SweepMismatch, match=r"laid out for a different sweep \(seeds: the store has \[0\], "
                       r"this sweep \[0, 1\];.*same prompts, seeds, methods.*another out folder"):
        sweeps.sweep(tiny, ["a cat and a dog"], seeds=[0, 1], out=tmp_path / "c", **small)
    with pytest.raises(sweeps.SweepMismatch, match="prompts: the store has"):
        sweeps.sweep(tiny, ["a cat and a bird"], seeds=[0], out=tmp_path / "c", **small)
    probe.record(tiny, "a cat", seeds=0, steps=2, kinds=("cross",), out=tmp_path / "d" / "maps.zarr", progress=False)
    with pytest.raises(sweeps.SweepMismatch, match="not a sweep's store"):
        sweeps.sweep(tiny, ["a cat"], seeds=[0], out=tmp_path / "d", **small)


def test_record_items_are_what_record_records(tmp_path, tiny):
    """Each item is probe.record's sample; the token axis is the sweep's longest prompt (NaN beyond a prompt)."""
    prompts = ["a cat", "a red circle and a blue square"]
    run = sweeps.sweep(tiny, prompts, seeds=[0, 5], out=tmp_path / "s", steps=2, shard=(0, 1), progress=False)
    assert run.computed == [0, 1, 2, 3] and sweeps.verify(tmp_path / "s") == []
    tree = sweeps.open_sweep(tmp_path / "s")
    for item in sweeps.items(prompts, [0, 5]):
        alone = probe.record(tiny, item.prompt, seeds=item.seed, steps=2, progress=False)
        for group in ("cross/res16", "cross/res8", "self/res16", "images"):
            var = "image" if group == "images" else "attn"
            mine = tree[group][var].isel(sample=item.index).values
            theirs = alone[group][var].isel(sample=0).values
            if group.startswith("cross"):
                assert np.isnan(mine[..., theirs.shape[-1]:]).all()
                mine = mine[..., : theirs.shape[-1]]
            np.testing.assert_array_equal(mine, theirs)
        assert tree["cross/res16"]["token_text"].isel(sample=item.index).values[0] == "<|startoftext|>"
    rows = sweeps.table(tmp_path / "s")
    assert list(rows["item"]) == [0, 1, 2, 3] and list(rows["seed"]) == [0, 5, 0, 5]
    stats = lazy.overlap(tmp_path / "s", step=-1, compute=True)  # the sweep's store, analysed lazily
    assert list(stats["method"].values) == ["record"] * 4 and np.isfinite(stats["soft_iou"].values[2:]).all()
    again = sweeps.sweep(tiny, prompts, seeds=[0, 5], out=tmp_path / "s", steps=2, shard=(0, 1), progress=False)
    assert again.computed == [] and again.skipped == [0, 1, 2, 3]


def test_two_processes_write_the_one_process_store_bit_for_bit(tmp_path):
    """accelerate launch, 2 CPU processes (gloo); one dies mid-item, the launch is repeated, the store is the same."""
    one = subprocess.run([sys.executable, "-m", "probe.cli", "sweep", *CLI, "--out", str(tmp_path / "one")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    killed = subprocess.run([sys.executable, "-m", "probe.cli", "sweep", *CLI, "--processes", "2", "--threads", "1",
                             "--out", str(tmp_path / "two")], env=_env(**{sweeps.FAULT_ENV: "10@1"}),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and len(sweeps.done(tmp_path / "two")) < 12
    again = subprocess.run([sys.executable, "-m", "probe.cli", "sweep", *CLI, "--processes", "2", "--threads", "1",
                            "--out", str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "process 0 of 2" in again.stdout and "process 1 of 2" in again.stdout
    _assert_same_store(tmp_path / "one", tmp_path / "two")
    assert sweeps.verify(tmp_path / "two") == []
    rows = sweeps.table(tmp_path / "two")
    assert list(rows["item"]) == list(range(12)) and set(rows["processes"]) == {2}
    dealt = sweeps.deal(sweeps.items(PROMPTS, [0, 1], ["record", "ae", "edit:self"], targets=TARGETS), 2)
    assert list(rows["rank"]) == dealt
    assert [dealt[i::3].count(0) for i in range(3)] == [2, 2, 2]  # each process has half of every method


KILLER = textwrap.dedent("""
    import json, os, random, signal, sys, time, traceback
    from probe.analysis import lazy
    from probe.record import sweep as sweeps

    cfg = json.loads(sys.argv[1])
    rng = random.Random(cfg["seed"])

    def start(out, shard, fault):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if fault:
                    os.environ[sweeps.FAULT_ENV] = str(fault)
                sweeps.sweep(out=out, shard=shard, progress=False, **cfg["kwargs"])
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        return pid

    def wait(pid):
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert wait(start(cfg["reference"], (0, 1), None)) == 0
    kills, rounds = [], 0
    while len(kills) < cfg["kills"]:
        rounds += 1
        assert rounds <= 4 * cfg["kills"], "the sweep finished before it was killed often enough"
        children = {}
        for shard in ((0, 2), (1, 2)):
            how = rng.choice(["exit", "exit", "sigkill"])
            # an item is 7 writes: an exit comes within one more item; a SIGKILL comes at a random time, with the
            # same exit as its backstop, so that a round finishes at most one item per worker however fast the
            # machine: with this seed the ten rounds' faults at writes 8–9 finish at most 6 of the 12 items
            fault = rng.randint(1, 9)
            children[start(cfg["out"], shard, fault)] = how
        victims = [pid for pid, how in children.items() if how == "sigkill"]
        if victims:
            time.sleep(rng.uniform(0.05, 1.0))
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        for pid, how in children.items():
            code = wait(pid)
            assert code in (0, sweeps.FAULT_EXIT, -signal.SIGKILL), (how, code)
            if code != 0:
                kills.append({"how": how, "code": code, "done": len(sweeps.done(cfg["out"]))})
    done_before = len(sweeps.done(cfg["out"]))
    finals = [start(cfg["out"], shard, None) for shard in ((0, 2), (1, 2))]
    assert [wait(pid) for pid in finals] == [0, 0]
    print(json.dumps({"kills": kills, "rounds": rounds, "done_before_final": done_before}))
""")


def test_killed_sweeps_resume_to_the_uninterrupted_store(tmp_path):
    """≥ 20 abrupt deaths (exits at random writes, SIGKILL at random times, each bounded by an exit within one more
    item, so the progress between kills does not depend on the machine's speed) of two workers, then a resume: every
    item exactly once, never recomputed once done, and the store equal bit for bit to an uninterrupted run's."""
    kwargs = {**SETTINGS, "schedule": {"max_refinement": 2}}
    model, prompts = kwargs.pop("model"), kwargs.pop("prompts")
    cfg = {"seed": 21, "kills": 20, "reference": str(tmp_path / "ref"), "out": str(tmp_path / "out"),
           "kwargs": {"model": model, "prompts": prompts, **kwargs}}
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg)], env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kills = report["kills"]
    print(json.dumps({"kills": len(kills), "by": {h: sum(k["how"] == h for k in kills) for h in ("exit", "sigkill")},
                      "rounds": report["rounds"], "done_before_final": report["done_before_final"]}))
    assert len(kills) >= 20 and {k["how"] for k in kills} == {"exit", "sigkill"}
    assert 0 < report["done_before_final"] < 12  # the kills left finished and unfinished items
    out = tmp_path / "out"
    _assert_same_store(tmp_path / "ref", out)
    assert sweeps.verify(out) == [] and sweeps.done(out) == list(range(12))
    rows = sweeps.table(out)
    assert list(rows["item"]) == list(range(12))
    finished: set[int] = set()
    for event, item in _events(out):
        assert not (event == "start" and item in finished), f"item {item} was computed again after it was done"
        if event == "done":
            finished.add(item)
    assert not list(out.glob("maps.zarr.layout-*")) and not list((out / "maps.zarr").rglob("*.partial"))
