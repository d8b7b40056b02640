"""The study registry: a study registered in one place is run, indexed, checked and reached from the command line."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import probe.studies as studies
from probe.cli import main, parser
from probe.studies import intervention, report
from probe.studies.registry import Study, UnknownStudy, get_study, register, registered_studies, unregister


def toy_study(pipe, n: int = 4, quick: bool = False, out=None, progress: bool = True, steps: int = 50):
    """Rows 0 … n−1 (n − 1 when ``quick``), made without the model."""
    return SimpleNamespace(rows=pd.DataFrame({"value": [float(v) for v in range(n - quick)]}))


def toy_headline(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"n": [len(rows)], "mean_value": [rows.value.mean()]})


TOY = Study(name="toy", title="Toy: the mean of the first whole numbers", run=toy_study,
            tables=lambda result: {"toy_rows": result.rows}, headline=lambda result: toy_headline(result.rows),
            source="toy_rows", recompute=lambda rows, n_boot: toy_headline(rows),
            answer=lambda headline: f"The mean of {headline.n[0]} numbers is {headline.mean_value[0]:.2f}.",
            aliases=("toy-study",))


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def test_the_registry_holds_every_study_in_its_order():
    assert report.STUDIES == ("probe", "overlap", "editing", "guidance", "self_cross")  # what run_all runs
    assert studies.STUDIES == report.STUDIES
    assert [s.name for s in registered_studies(in_run_all=False)] == ["intervention"]
    assert report.STUDY_FIGURES == {"probe": ("probe_accuracy",), "overlap": ("overlap_auc", "overlap_examples"),
                                    "editing": ("edit_success",),
                                    "guidance": ("guidance_missing", "guidance_overlap_vs_missing"),
                                    "self_cross": ("self_cross_mixing",), "intervention": ()}
    assert {name: source for name, (source, _) in report.HEADLINE_SOURCES.items()} == {
        "probe": "probe_accuracy", "overlap": "overlap_metrics", "editing": "edit_results",
        "guidance": "guidance_images", "self_cross": "self_cross_images"}
    assert report.STUDY_FUNCTIONS["guidance"] is studies.guidance_study
    assert get_study("edit") is get_study("editing") and get_study("self-cross").name == "self_cross"
    assert get_study("intervention").main is intervention.main
    assert get_study("intervention").differences is intervention.differences


def test_a_registered_study_is_run_indexed_checked_and_listed(toy, tiny, tmp_path, capsys):
    assert report.STUDIES[-1] == "toy" and report.STUDY_TITLES["toy"] == TOY.title
    assert parser().parse_args(["study", "toy-study"]).name == "toy"
    with pytest.raises(SystemExit):
        parser().parse_args(["study", "--help"])
    assert re.search(rf"\n  toy +{TOY.title}\n", capsys.readouterr().out)  # one line of the study listing

    headlines = report.run_all(tiny, out=tmp_path, only=["toy"], sizes={"toy": {"n": 5}}, progress=False)
    assert list(headlines) == ["toy", "timing"]
    assert headlines["toy"].to_dict("list") == {"n": [5], "mean_value": [2.0]}  # (0 + 1 + 2 + 3 + 4) / 5
    assert pd.read_csv(tmp_path / "toy_rows.csv").value.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    index = (tmp_path / "README.md").read_text()
    assert f"## {TOY.title}" in index  # no registration fixed its size: the sentence is shown, not as an answer
    assert ("**Not answered:** no registration (toy_registration.md) fixed this study's design before it ran, so "
            "its tables are exploratory. What the table shows, read as exploration: The mean of 5 numbers is 2.00."
            ) in index
    assert "probe study toy --out" in index and "--set n=5" in index
    assert report.headline_differences(tmp_path) == []
    pd.DataFrame({"value": [0.0, 1.0, 2.0, 3.0, 9.5]}).to_csv(tmp_path / "toy_rows.csv", index=False)
    assert report.headline_differences(tmp_path) == [f"toy row 0 mean_value: kept {np.int64(2)!r}, recomputed "
                                                     f"{np.float64(3.1)!r}"]  # (0 + 1 + 2 + 3 + 9.5) / 5

    assert main(["study", "toy", "--model", "tiny", "--quick", "--out", str(tmp_path), "--set", "n=3"]) == 0
    assert pd.read_csv(tmp_path / "headline_toy.csv").to_dict("list") == {"n": [2], "mean_value": [0.5]}
    assert "== toy ==" in capsys.readouterr().out
    assert main(["study", "toy", "--out", str(tmp_path), "--set", "m=3"]) == 2  # not a keyword of toy_study
    assert "toy_study has no keyword 'm'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--prompts applies to the guidance and self_cross studies; the toy"):
        main(["study", "toy", "--prompts", "animals"])
    with pytest.raises(SystemExit, match="the toy study judges with the shapes world's rules"):
        main(["study", "toy", "--judge", "exact"])


def test_unregistered_names_are_refused_with_the_known_ones(toy, capsys):
    unregister("toy")
    try:
        assert "toy" not in report.STUDIES
        with pytest.raises(UnknownStudy, match="unknown study 'toy'; known: probe, overlap, editing, guidance, "
                                               "self_cross, intervention$"):
            get_study("toy")
        with pytest.raises(ValueError, match=r"unknown studies \['toy'\]; known: \['probe', 'overlap'"):
            report.run_all("tiny", sizes={"toy": {}})
        with pytest.raises(ValueError, match="intervention is run by its own commands: probe study intervention"):
            report.run_all("tiny", only=["intervention"])
        with pytest.raises(ValueError, match="not run by run_all"):
            report.check_settings("intervention", {"n": 1})
        with pytest.raises(SystemExit):
            main(["study", "toy"])
        assert "invalid choice: 'toy'" in capsys.readouterr().err
    finally:
        register(TOY)  # for the fixture to remove


def test_names_taken_and_incomplete_studies_are_refused():
    with pytest.raises(ValueError, match="study name 'edit' is taken by the study 'editing' of probe.studies.editing"):
        register(Study(name="edit", title="another", run=toy_study, tables=dict, headline=toy_headline))
    with pytest.raises(ValueError, match="give run, tables and headline"):
        Study(name="half", title="no tables", run=toy_study)
    with pytest.raises(ValueError, match="give both source"):
        Study(name="half", title="no recompute", run=toy_study, tables=dict, headline=toy_headline, source="rows")
    with pytest.raises(ValueError, match="give main"):
        Study(name="half", title="no command", in_run_all=False)


def test_a_study_with_its_own_commands_is_reached_from_probe_study(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["study", "intervention", "analyse", "e1", "--help"])
    assert stop.value.code == 0
    assert "usage: probe study intervention" in capsys.readouterr().out
    calls = []
    family = pd.DataFrame({"comparison": ["dose 0.05 - dose 0.3"], "difference": [0.036]})
    monkeypatch.setattr(intervention, "analyse", lambda e, out, registered=None: calls.append((e, out))
                        or {"family": family, "answer": "An answer."})
    assert main(["study", "intervention", "analyse", "e2", "--out", str(tmp_path)]) == 0
    assert calls == [("e2", str(tmp_path))]
    printed = capsys.readouterr().out
    assert "dose 0.05 - dose 0.3" in printed and "0.036" in printed and "An answer." in printed
    with pytest.raises(SystemExit) as stop:
        main(["study", "intervention", "analyse", "e9"])  # not a registered experiment
    assert stop.value.code == 2 and "invalid choice: 'e9'" in capsys.readouterr().err


def test_a_study_s_own_differences_are_part_of_the_check(tmp_path):
    pd.DataFrame(columns=["study", "seconds", "quick"]).to_csv(tmp_path / "timing.csv", index=False)
    register(Study(name="checked", title="a check of its own", in_run_all=False, main=lambda argv: 0,
                   differences=lambda out, rtol, atol: [f"checked: {Path(out).name} rtol {rtol:g}"]))
    try:
        assert report.headline_differences(tmp_path, rtol=0.5) == [f"checked: {tmp_path.name} rtol 0.5"]
    finally:
        unregister("checked")
    assert report.headline_differences(tmp_path) == []  # the intervention study's tables are not here: nothing


def test_python_m_runs_the_intervention_command_line_once():
    done = subprocess.run([sys.executable, "-m", "probe.studies.intervention", "--help"], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0 and "{run,analyse,pilot}" in done.stdout and "e2b" in done.stdout
    assert "RuntimeWarning" not in done.stderr  # the package is imported once, not again as __main__
