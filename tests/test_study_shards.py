"""A study split over shards and processes makes the table one process makes: the same rows and headline on the
built-in model; a killed shard resumes without making any of its rows again."""

import numpy as np
import pandas as pd
import pytest

import probe.studies.guided as guided
from probe.cli import main
from probe.studies import shards
from probe.studies.common import ImageRows

STUDY = ["study", "guidance", "--model", "shapes", "--quick", "--set", "steps=3"]  # none / ae / iou, 4 pairs
TIMES = ("seconds", "seconds_per_image", "settings_id")  # what two runs of the same images differ in


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = (t.drop(columns=[c for c in TIMES if c in t]).reset_index(drop=True) for t in (a, b))
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        if pd.api.types.is_float_dtype(a[column]) and pd.api.types.is_float_dtype(b[column]):
            np.testing.assert_allclose(a[column], b[column], rtol=1e-4, atol=1e-6, err_msg=column)
        else:
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), column


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main([*STUDY, "--out", str(out)]) == 0
    return out


def test_shard_arguments_and_tables():
    assert shards.shard_of("1/3") == (1, 3) and shards.shard_of(None) is None
    with pytest.raises(ValueError, match="0 ≤ I < N"):
        shards.shard_of("3/3")
    assert [k for k in range(7) if shards.in_shard(k, (1, 3))] == [1, 4]
    assert shards.shard_path("a/b_images.csv", (1, 3)).as_posix() == "a/b_images_shard1of3.csv"


def test_two_shards_merged_equal_one_process(one_process, tmp_path, capsys):
    assert main([*STUDY, "--out", str(tmp_path), "--shard", "0/2"]) == 2  # no calibration yet: nothing is made
    assert "calibration runs once before the shards" in capsys.readouterr().err
    assert not (tmp_path / "guidance_images_shard0of2.csv").exists()
    assert main([*STUDY, "--out", str(tmp_path), "--calibrate"]) == 0
    for i in range(2):
        assert main([*STUDY, "--out", str(tmp_path), "--shard", f"{i}/2"]) == 0
    parts = [pd.read_csv(tmp_path / f"guidance_images_shard{i}of2.csv") for i in range(2)]
    assert not set(zip(parts[0].prompt, parts[0].seed)) & set(zip(parts[1].prompt, parts[1].seed))
    assert len(parts[0]) + len(parts[1]) == len(pd.read_csv(one_process / "guidance_images.csv"))
    merged = tmp_path / "merged"
    assert main([*STUDY, "--out", str(merged), "--merge", str(tmp_path)]) == 0
    assert "images already in" in capsys.readouterr().out  # the analysis made no image
    for table in ("guidance_images", "headline_guidance", "guidance_step_sizes"):
        _same_table(pd.read_csv(merged / f"{table}.csv"), pd.read_csv(one_process / f"{table}.csv"))


def test_two_processes_equal_one_process(tmp_path):
    """Both runs in fresh processes, as a user starts them (the launching process is one of the shards' peers)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, []), (two, ["--processes", "2"])):
        done = subprocess.run([sys.executable, "-m", "probe.cli", *STUDY, "--out", str(out), *extra], env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in two.glob("guidance_images_shard*")) == [
        "guidance_images_shard0of2.csv", "guidance_images_shard1of2.csv"]
    for table in ("guidance_images", "headline_guidance"):
        _same_table(pd.read_csv(two / f"{table}.csv"), pd.read_csv(one / f"{table}.csv"))


def test_a_killed_shard_resumes_without_making_a_row_again(one_process, tmp_path, monkeypatch):
    assert main([*STUDY, "--out", str(tmp_path), "--calibrate"]) == 0
    made: list = []
    real = guided.generate

    def dies_after_two(pipe, prompt, **kwargs):
        if len(made) == 2:
            raise KeyboardInterrupt  # the process is stopped here
        made.append((prompt, kwargs["seed"], kwargs["objective"]))
        return real(pipe, prompt, **kwargs)

    monkeypatch.setattr(ImageRows, "FLUSH_SECONDS", 0.0)  # every row is on disk as soon as it is made
    monkeypatch.setattr(guided, "generate", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        main([*STUDY, "--out", str(tmp_path), "--shard", "1/2"])
    kept = pd.read_csv(tmp_path / "guidance_images_shard1of2.csv")
    assert len(kept) == 2
    monkeypatch.setattr(guided, "generate", real)
    again: list = []
    monkeypatch.setattr(guided, "generate", lambda pipe, prompt, **kw: again.append((prompt, kw["seed"])) or real(
        pipe, prompt, **kw))
    assert main([*STUDY, "--out", str(tmp_path), "--shard", "1/2"]) == 0
    done = pd.read_csv(tmp_path / "guidance_images_shard1of2.csv")
    assert not done.duplicated(["prompt", "seed", "method", "initno"]).any()
    assert len(again) == len(done) - 2  # only the rows the killed shard had not made
    whole = pd.read_csv(one_process / "guidance_images.csv")
    expected = whole[[shards.in_shard(k, (1, 2)) for k in whole.groupby(["prompt", "seed"], sort=False).ngroup()]]
    _same_table(done.sort_values(["prompt", "seed", "method"]), expected.sort_values(["prompt", "seed", "method"]))


def test_studies_that_do_not_split_and_two_kinds_of_split_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="split the guidance and self_cross studies"):
        main(["study", "probe", "--quick", "--out", str(tmp_path), "--shard", "0/2"])
    with pytest.raises(SystemExit, match="give one of --shard, --calibrate"):
        main([*STUDY, "--out", str(tmp_path), "--shard", "0/2", "--calibrate"])
    with pytest.raises(FileNotFoundError, match="no shard tables guidance_images_shard"):
        shards.merge_study("guidance", [tmp_path], tmp_path / "x")
    (tmp_path / "guidance_images_shard1of2.csv").write_text("prompt,seed,method,initno\n")
    with pytest.raises(ValueError, match=r"shards \[0\] of 2 are missing"):
        shards.merge_study("guidance", [tmp_path], tmp_path / "x")


def test_dry_prints_the_plan_before_anything_loads(capsys):
    """--dry: each arm's images, the step-size pilot's expected images and the hours, from the study's own design
    (no model, no judge loaded: a judge spec whose model cannot be fetched is not touched)."""
    from probe.prompts import prompt_set
    from probe.studies.guided import STEP_CANDIDATES, TYPICAL_SD, pilot_size

    assert main(["study", "guidance", "--prompts", "animals", "--judge", "geneval", "--set", "initno=(False,)",
                 "--set", "seeds_per_prompt=2", "--seconds-per-image", "9", "--dry"]) == 0
    out = capsys.readouterr().out
    pairs = len(prompt_set("animals")) * 2  # every prompt of the set: the design asks for more
    assert f"the prompt sets hold {pairs}:" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for arm in ("none", "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i"):
        assert lines[arm][1:] == [str(pairs), f"{round(pairs * 9 / 3600, 1)}"]
    assert lines["total"][1] == str(8 * pairs)  # no pilot: no prompt beyond the study's

    plan = shards_plan("figures/guidance_registration.md")
    ae = pilot_size(TYPICAL_SD["missing_vs_none"], 0.10)  # the registration's min_effects
    overlap = pilot_size(TYPICAL_SD["iou_t10_vs_none"], 0.02)
    assert plan.images.tolist() == [780] * 8 + [ae * len(STEP_CANDIDATES), overlap * len(STEP_CANDIDATES) * 6, ae,
                                                8 * 780 + ae * 5 + overlap * 30 + ae]


def shards_plan(registration: str):
    from probe.studies.guidance import guidance_study, study_plan_of

    return study_plan_of(guidance_study, {"registration": registration}, 1.0)


def test_a_shard_reads_the_calibration_without_writing_it(tmp_path):
    """Shards started together read the pilot's table at once: none may rewrite it (one would find it locked)."""
    from probe.writes import locked

    assert main([*STUDY, "--out", str(tmp_path), "--calibrate"]) == 0
    pilot = tmp_path / "guidance_pilot_images.csv"
    before = pilot.read_bytes()
    with locked(pilot):  # a peer shard holds it now
        assert main([*STUDY, "--out", str(tmp_path), "--shard", "0/2"]) == 0
    assert pilot.read_bytes() == before


def test_the_images_table_keeps_its_own_runs_rows_and_a_later_run_takes_the_others_back(tmp_path, capsys):
    """Two runs of one study in one folder with other seeds: the table holds the last run's rows alone (its headline
    is recomputed from them as written), the first run's wait beside it, and running the first again makes no image."""
    from probe.studies.common import cell_differences
    from probe.studies.report import recompute_headlines

    first, second = [*STUDY, "--out", str(tmp_path)], [*STUDY, "--out", str(tmp_path), "--set", "seed_offset=500"]
    assert main(first) == 0
    rows_first = pd.read_csv(tmp_path / "guidance_images.csv")
    assert main(second) == 0
    table = pd.read_csv(tmp_path / "guidance_images.csv")
    assert set(table.seed) == {s + 500 for s in rows_first.seed} and len(table) == len(rows_first)
    aside = list(tmp_path.glob("guidance_images.settings-*.csv"))
    assert len(aside) == 1
    _same_table(pd.read_csv(aside[0]), rows_first)
    kept = pd.read_csv(tmp_path / "headline_guidance.csv")
    assert not cell_differences("guidance", kept, recompute_headlines(tmp_path)["guidance"])  # as --check does
    capsys.readouterr()
    assert main(first) == 0
    assert f"{len(rows_first)} of {len(rows_first)} images already in" in capsys.readouterr().out
    _same_table(pd.read_csv(tmp_path / "guidance_images.csv"), rows_first)
