"""Registrations: a study's design fixed before its run; only a run at that design is answered."""

import json

import pandas as pd
import pytest
from test_registry import TOY, toy_study

from probe.cli import main
from probe.studies import report
from probe.studies.registration import (
    read_registration,
    registered_settings,
    registration_problem,
    same_value,
    settings_for_run,
)
from probe.studies.registry import register, unregister


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def _register(folder, study="toy", **settings) -> None:
    spec = {"study": study, **settings, "power": {"effect": 0.1, "n": 5}}
    (folder / f"{study}_registration.md").write_text("# Toy\n\nWhy and how.\n\n```json\n" + json.dumps(spec)
                                                     + "\n```\n")


def test_a_registration_is_read_and_its_settings_are_the_keywords_it_fixes(tmp_path):
    _register(tmp_path, n=5, steps=20)
    spec = read_registration(tmp_path / "toy_registration.md", "toy")
    assert registered_settings(spec) == {"n": 5, "steps": 20}  # study and power describe the design
    assert registered_settings({"study": "x", "settings": {"a": 1}, "b": 2}) == {"a": 1}
    with pytest.raises(ValueError, match="is not a registration of the guidance study"):
        read_registration(tmp_path / "toy_registration.md", "guidance")
    (tmp_path / "bad_registration.md").write_text("```json\n{not json\n```\n")
    with pytest.raises(ValueError, match="is not JSON"):
        read_registration(tmp_path / "bad_registration.md", "bad")
    (tmp_path / "none_registration.md").write_text("text only\n")
    with pytest.raises(ValueError, match="holds no ```json block"):
        read_registration(tmp_path / "none_registration.md", "none")
    assert same_value([1, [2, 3]], (1, (2, 3))) and not same_value([1, 2], (1, 2, 3))


def test_only_a_run_at_the_registered_design_is_answered(tmp_path):
    assert "no registration (toy_registration.md)" in registration_problem("toy", toy_study, {"n": 5}, tmp_path)
    _register(tmp_path, n=5)
    assert registration_problem("toy", toy_study, {"n": 5}, tmp_path) is None
    assert registration_problem("toy", toy_study, {"n": 5, "steps": 50}, tmp_path) is None  # the default
    assert registration_problem("toy", toy_study, {}, tmp_path) == (
        "the run differs from its registration (toy_registration.md): n=4 (registered 5); an answer is read only "
        "from a run at the registered design")  # toy_study's default n is 4
    assert "quick run" in registration_problem("toy", toy_study, {"n": 5}, tmp_path, quick=True)


def test_settings_for_a_registered_run_may_repeat_but_not_change_the_design(tmp_path):
    with pytest.raises(FileNotFoundError, match="no registration of the toy study"):
        settings_for_run("toy", toy_study, {}, tmp_path)
    _register(tmp_path, n=5)
    assert settings_for_run("toy", toy_study, {"steps": 3}, tmp_path) == {"steps": 3, "n": 5}
    assert settings_for_run("toy", toy_study, {"n": 5}, tmp_path) == {"n": 5}
    with pytest.raises(ValueError, match=r"--set n=6 \(registered 5\) conflicts"):
        settings_for_run("toy", toy_study, {"n": 6}, tmp_path)
    _register(tmp_path, m=5)
    with pytest.raises(ValueError, match=r"toy_study has no keywords \['m'\]"):
        settings_for_run("toy", toy_study, {}, tmp_path)


def test_probe_study_registered_runs_the_registered_design_and_the_index_answers_it(toy, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit, match="probe study toy --registered: no registration of the toy study"):
        main(["study", "toy", "--model", "tiny", "--out", str(tmp_path), "--registered"])
    _register(tmp_path, n=6)
    with pytest.raises(SystemExit, match=r"--set n=7 \(registered 6\) conflicts with"):
        main(["study", "toy", "--model", "tiny", "--out", str(tmp_path), "--registered", "--set", "n=7"])
    assert main(["study", "toy", "--model", "tiny", "--out", str(tmp_path), "--registered"]) == 0
    assert pd.read_csv(tmp_path / "headline_toy.csv").to_dict("list") == {"n": [6], "mean_value": [2.5]}
    index = (tmp_path / "README.md").read_text()
    assert "**Answer.** The mean of 6 numbers is 2.50." in index
    assert f"probe study toy --out {tmp_path} --registered" in index
    assert "Registration (written before its run): [toy_registration.md](toy_registration.md)." in index
    _register(tmp_path, n=8)  # a registration changed after the run: the table is no longer its answer
    report.write_index(tmp_path)
    assert "**Not answered:** the run differs from its registration (toy_registration.md): n=6 (registered 8)" in (
        tmp_path / "README.md").read_text()
