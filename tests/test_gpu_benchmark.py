"""The GPU benchmark's dry run (tiny layer counts, 32 px, 2 steps on the CPU) keeps it from rotting between the runs
on a GPU: every stage runs, its JSON holds each arm's timings, and each ratio is median(arm) / median(baseline) of
the timings the JSON itself holds."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
AMD = importlib.util.find_spec("attention_map_diffusers") is not None  # a benchmark-only package


def _module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_benchmark", module)
    spec.loader.exec_module(module)
    return module


gb = _module()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    result = gb.main(["--dry", "--rounds", str(ROUNDS), "--out", str(out)])
    return result, (out / "gpu_benchmark.md").read_text()


def test_every_stage_runs_and_says_what_it_ran(dry):
    result, _ = dry
    assert result["config"]["dry"] is True
    assert (result["device"], result["config"]["steps"], result["config"]["rounds"]) == ("cpu", 2, ROUNDS)
    assert [(s["stage"], s["model"]) for s in result["stages"]] == [
        ("record", "sd15"), ("ae", "sd15"), ("amd", "sd15"), ("record", "sdxl"), ("record", "sd3"), ("record", "flux")]
    for stage in result["stages"]:
        if stage["stage"] == "amd" and not AMD:
            assert "attention-map-diffusers is not installed" in stage["skipped"]
            continue
        assert "error" not in stage and "skipped" not in stage, stage
        assert stage["notes"] and stage["build_s"] >= 0 and stage["steps"] == 2
        for arm in stage["arms"].values():
            assert len(arm["seconds"]) == ROUNDS and all(t > 0 for t in arm["seconds"])
            assert arm["peak_gib"] is None  # no CUDA: no device memory to read
            assert arm["what"]


def test_each_model_records_every_arm_its_family_has(dry):
    result, _ = dry
    records = {s["model"]: s for s in result["stages"] if s["stage"] == "record"}
    for name in ("sd15", "sdxl", "sd3", "flux"):  # joint attention keeps q and every key too
        assert set(records[name]["arms"]) == {"plain", "cross", "cross+self", "qk"} and not records[name]["not_run"]
    for name in ("sd3", "flux"):
        assert records[name]["arms"]["cross+self"]["kwargs"]["self_keys"] == gb.SELF_KEYS
    for stage in records.values():
        assert stage["pixels"] == gb.DRY_PIXELS
        arms = stage["arms"]
        assert 0 < arms["cross"]["recording_mb"] < arms["cross+self"]["recording_mb"]
        for name, arm in arms.items():
            if name != "plain":  # recording does not change the image
                assert arm["max_pixel_diff"] <= 1, (stage["model"], name)
    # each pipeline ran at its own guidance scale (diffusers' signature defaults), in both arms
    assert [records[m]["guidance_scale"] for m in ("sd15", "sdxl", "sd3", "flux")] == [7.5, 5.0, 7.0, 3.5]


def test_ratios_are_the_medians_of_the_stored_timings(dry):
    result, md = dry
    for stage in result["stages"]:
        if "arms" not in stage:  # the amd stage where its package is missing (said above)
            continue
        arms, base = stage["arms"], stage["baseline"]
        assert set(stage["ratios"]) == set(arms) - {base}
        for arm, ratio in stage["ratios"].items():
            expected = statistics.median(arms[arm]["seconds"]) / statistics.median(arms[base]["seconds"])
            assert ratio == pytest.approx(expected, rel=1e-12)
            assert arms[arm]["median_s"] == statistics.median(arms[arm]["seconds"])
            label = stage["model"] + gb.LABELS.get(stage["stage"], "")
            assert f"| {label} | {arm} |" in md and f"**{ratio:.3f}**" in md


def test_attend_and_excite_compute_the_same_guided_generation(dry):
    result, _ = dry
    ae = next(s for s in result["stages"] if s["stage"] == "ae")
    assert set(ae["arms"]) == {"diffusers", "probe"} and ae["baseline"] == "diffusers"
    assert ae["max_latent_diff"] < 1e-3  # same method, same schedule: float noise only


@pytest.mark.skipif(not AMD, reason="attention-map-diffusers is not installed (a benchmark-only package)")
def test_probe_and_attention_map_diffusers_record_the_same_maps(dry):
    result, _ = dry
    amd = next(s for s in result["stages"] if s["stage"] == "amd")
    assert set(amd["arms"]) == {"plain", "probe", "exact", "fast"} and amd["baseline"] in ("exact", "fast")
    assert all(d < 1e-3 for d in amd["max_map_diff"].values())  # float16 storage against float32 maps
    assert set(amd["ratios"]) == {"plain", "probe", "exact", "fast"} - {amd["baseline"]}


def test_median_ratio_by_hand():
    arms = {"plain": {"seconds": [2.0, 10.0, 2.0]}, "rec": {"seconds": [1.0, 5.0, 3.0]}}
    assert gb.median_ratio(arms, "rec", "plain") == 1.5  # medians 3 and 2, not the median of pairwise ratios (0.5)


def test_a_stage_past_the_budget_or_failing_leaves_a_row_that_says_so(monkeypatch):
    cfg = gb.parse(["--dry", "--budget", "-1", "--only", "sd15", "flux"])
    written = []
    stages = gb.run_stages(cfg, written.append)
    assert [s["model"] for s in stages] == ["sd15", "flux"] and all("not run" in s["skipped"] for s in stages)
    assert len(written) == 2 and "| sd15 | — | not run" in gb.table(stages)

    def broken(name, cfg):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gb, "record_stage", broken)
    cfg = gb.parse(["--dry", "--only", "sd3", "flux"])
    stages = gb.run_stages(cfg, lambda stages: None)
    assert [s["error"] for s in stages] == ["RuntimeError: CUDA out of memory"] * 2


def test_only_the_wheels_the_machine_lacks_at_their_version_are_installed(tmp_path, capsys):
    for name in ("diffusers-0.42.1-py3-none-any.whl", "zipp-4.1.2-py3-none-any.whl",
                 "xarray-2026.9.0-py3-none-any.whl"):
        (tmp_path / name).write_text("")
    image = {"diffusers": None, "zipp": "4.1.2", "xarray": "2025.1.0"}.get
    assert [w.name for w in gb.wheels_needed(tmp_path, image)] == ["diffusers-0.42.1-py3-none-any.whl",
                                                                   "xarray-2026.9.0-py3-none-any.whl"]
    assert gb.main(["--wheels-needed", str(tmp_path)]) is None  # this interpreter's own versions decide
    printed = capsys.readouterr().out.split()
    assert all(Path(p).parent == tmp_path for p in printed)


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel holding one module ``name``."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_gpu_sh_installs_the_missing_wheels_apart_and_runs_the_benchmark(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "probe_gpu_check", "1.0")
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "GPU_SITE": str(tmp_path / "site"),
           "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry", "--only", "sd15", "--rounds", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "installing into" in done.stdout and (tmp_path / "site" / "probe_gpu_check.py").is_file()
    assert not (tmp_path / "site" / "torch").exists()  # --no-deps: the interpreter's own torch is used
    result = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())
    assert [s["model"] for s in result["stages"]] == ["sd15"] and "arms" in result["stages"][0]
