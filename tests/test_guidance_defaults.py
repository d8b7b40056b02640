"""A model folder's calibrated guidance defaults (``probe.json``): read, applied by ``generate`` when the caller gives
no schedule, said once, and overridden by a caller's schedule."""

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

import probe
from probe.models import model_defaults, model_folder
from probe.steer.guide import Schedule, generate, model_schedule

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SUBJECTS = "a cat and a dog", ["cat", "dog"]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    probe.load("tiny").save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved_tiny, tmp_path) -> Path:
    """A fresh copy of the saved tiny pipeline, so each test writes its own probe.json."""
    return Path(shutil.copytree(saved_tiny, tmp_path / "model"))


def _write(folder: Path, guidance: dict) -> Path:
    (folder / "probe.json").write_text(json.dumps({"guidance": guidance}))
    return folder


def _guided(pipe, **kwargs):
    return generate(pipe, PROMPT, subjects=SUBJECTS, seed=0, steps=2, progress=False, output_type="latent", **kwargs)


def _notes(caught) -> list[str]:
    return [str(w.message) for w in caught if "probe.json" in str(w.message)]


def test_the_built_in_model_ships_its_calibrated_a_and_e_step():
    defaults = model_defaults(probe.load("shapes"))
    assert defaults["guidance"]["ae"]["scale_factor"] == 1.0
    assert model_defaults("shapes") == defaults
    # every value is the calibration table's choice for that objective, and names it as its source
    table = pd.read_csv(ROOT / "data" / "models" / "shapes" / "guidance_step_sizes.csv")
    chosen = table[table.chosen.astype(str) == "True"].set_index("method").scale_factor
    for name, entry in defaults["guidance"].items():
        assert entry["scale_factor"] == chosen[name] and "guidance_step_sizes.csv" in entry["source"]
    # the registered study's wider pilot, by hand: A&E's shipped step leaves the most images with every subject present
    pilot = pd.read_csv(ROOT / "figures" / "guidance_pilot_images.csv")
    pilot = pilot[pilot.method == "ae"]
    all_present = (~pilot.missing.astype(bool) & ~pilot.mixed.astype(bool)).groupby(pilot.step_size).mean()
    assert all_present.idxmax() == 1.0 and len(pilot[pilot.step_size == 1.0]) == 306
    assert f"step 1 gave the most images with every subject present ({all_present[1.0]:.1%}" in \
        defaults["guidance"]["ae"]["source"]
    schedule, note = model_schedule("shapes", "ae")
    assert schedule == Schedule(scale_factor=1.0)
    assert note.startswith("guidance: ae at scale_factor 1.0 from ") and "probe.json" in note
    assert note.endswith("; pass schedule= to override")


def test_generate_runs_at_the_folder_step_and_says_so(folder):
    pipe = probe.load(_write(folder, {"ae": {"scale_factor": 0.5, "source": "a pilot of mine"}}))
    assert model_folder(pipe) == folder
    with pytest.warns(UserWarning, match=r"^guidance: ae at scale_factor 0\.5 from .*probe\.json \(a pilot of mine\); "
                                         r"pass schedule= to override$"):
        result = _guided(pipe)
    assert result.history.step_size.iloc[0] == pytest.approx(0.5)  # step 0: scale_factor · sqrt(1)


def test_a_callers_schedule_wins_silently(folder):
    pipe = probe.load(_write(folder, {"ae": {"scale_factor": 0.5}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _guided(pipe, schedule=Schedule(scale_factor=3.0))
    assert not _notes(caught)
    assert result.history.step_size.iloc[0] == pytest.approx(3.0)


def test_a_folder_without_defaults_changes_nothing(folder, tiny):
    pipe = probe.load(folder)
    assert model_defaults(pipe) == {} and model_defaults(tiny) == {} and model_defaults("org/model") == {}
    assert model_schedule(pipe, "ae") == (Schedule(), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _guided(pipe)
    assert not _notes(caught) and not [w for w in caught if str(w.message).startswith("guidance:")]
    assert result.history.step_size.iloc[0] == pytest.approx(Schedule().scale_factor)


def test_sums_take_the_defaults_their_terms_share(folder):
    _write(folder, {"ae": {"scale_factor": 0.5}, "iou": {"scale_factor": 0.5, "thresholds": {"0": 0.1}}})
    assert model_schedule(folder, "iou")[0] == Schedule(scale_factor=0.5, thresholds={0: 0.1})
    schedule, note = model_schedule(folder, {"ae": 1, "iou": 1})  # the terms differ: Schedule(), and why
    assert schedule == Schedule() and "differ" in note and "pass schedule= to choose" in note
    _write(folder, {"ae": {"scale_factor": 0.5}, "iou": {"scale_factor": 0.5}})
    assert model_schedule(folder, "ae+iou")[0] == Schedule(scale_factor=0.5)
    assert model_schedule(folder, {"ae": 1, "kl": 1})[0] == Schedule()  # kl not listed
    _write(folder, {"ae": {"scale_factor": 0.5}, "ae+iou": {"scale_factor": 2.0}})  # a sum's own entry
    assert model_schedule(folder, "ae+iou")[0] == Schedule(scale_factor=2.0)
    assert model_schedule(folder, lambda maps: maps.subjects.sum()) == (Schedule(), None)  # a callable: none


def test_a_broken_probe_json_is_a_clear_error(folder):
    (folder / "probe.json").write_text('{"guidance": {"ae": {"scale_factor": 1.0,}}}')
    pipe = probe.load(folder)
    with pytest.raises(ValueError, match=r"probe\.json is not valid JSON"):
        model_defaults(pipe)
    with pytest.raises(ValueError, match=r"probe\.json is not valid JSON"):
        _guided(pipe)
    (folder / "probe.json").write_text('{"guidance": {"ae": 1.0}}')
    with pytest.raises(ValueError, match=r"probe\.json must hold"):
        model_defaults(pipe)
    _write(folder, {"ae": {"step": 1.0}})
    with pytest.raises(ValueError, match=r"probe\.json: guidance 'ae' sets \['step'\], which are not Schedule fields"):
        model_schedule(pipe, "ae")
    _write(folder, {"ae": {"scale_factor": "big"}})
    with pytest.raises(ValueError, match=r"sets scale_factor to 'big'"):
        model_schedule(pipe, "ae")


def test_a_sweep_runs_the_schedule_it_records_not_the_folders(folder):
    """A sweep's folder says which schedule it ran (its spec), and a resumed sweep must run the same: the model
    folder's probe.json does not reach it."""
    import warnings

    from probe.record import sweep as sweeps

    (folder / "probe.json").write_text(json.dumps({"guidance": {"ae": {"scale_factor": 0.5}}}))
    out = folder.parent / "sweep"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sweeps.sweep(model=str(folder), prompts=["a cat and a dog"], seeds=[0], methods=["guide:ae"], steps=2,
                     out=out, progress=False)
    assert not [w for w in seen if "probe.json" in str(w.message)]
    spec = json.loads((out / sweeps.SPEC).read_text())
    assert spec["schedule"]["scale_factor"] == 20.0
