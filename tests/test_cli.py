"""The command line, end to end on the tiny model."""

import numpy as np
import pytest

import probe
from probe.cli import main, parser


def test_record_info_show(tmp_path, capsys):
    out = tmp_path / "rec.zarr"
    assert main(["record", "--model", "tiny", "--prompt", "a cat and a dog", "--seed", "0", "1",
                 "--steps", "3", "--kinds", "cross", "--out", str(out)]) == 0
    tree = probe.open_recording(out)
    assert list(tree["images"]["seed"].values) == [0, 1]
    assert main(["info", str(out)]) == 0
    assert "cross/res16" in capsys.readouterr().out
    png = tmp_path / "dog.png"
    assert main(["show", str(out), "--token", "dog", "--step", "2", "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000
    assert main(["show", str(out), "--token", "horse", "--out", str(png)]) == 2
    assert "tokens are" in capsys.readouterr().err


def test_record_refuses_over_budget(tmp_path, capsys):
    out = tmp_path / "rec.zarr"
    code = main(["record", "--model", "tiny", "--prompt", "a cat", "--steps", "50", "--max-mb", "0.01",
                 "--out", str(out)])
    assert code == 2 and "estimated" in capsys.readouterr().err and not out.exists()


def test_demo_writes_a_recording_and_figures(tmp_path):
    assert main(["demo", "--model", "tiny", "--steps", "3", "--out", str(tmp_path)]) == 0
    tree = probe.open_recording(tmp_path / "demo.zarr")
    assert np.isfinite(tree["cross/res16"]["attn"].isel(token=slice(0, 5)).values).all()
    assert (tmp_path / "demo_circle.png").exists() and (tmp_path / "demo_square.png").exists()


def test_edit_writes_the_pair(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "pair.png"
    assert main(["edit", "--model", "tiny", "--source", "a red circle", "--target", "a blue circle",
                 "--num-steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 32)
    assert "inject self" in capsys.readouterr().out
    assert main(["edit", "--model", "tiny", "--source", "a red circle", "--target", "a blue circle",
                 "--steps", "1.5", "--out", str(out)]) == 2
    assert "fraction" in capsys.readouterr().err


def test_study_runs_one_study(tmp_path, capsys):
    import json

    import pandas as pd

    assert main(["study", "overlap", "--model", "tiny", "--quick", "--out", str(tmp_path),
                 "--set", "n_images=4", "--set", "steps=3"]) == 0
    assert (tmp_path / "headline_overlap.csv").exists() and not (tmp_path / "headline_probe.csv").exists()
    assert "== overlap ==" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "overlap_metrics.csv.gz").groupby(["prompt", "seed"])) == 4
    assert main(["study", "probe", "--model", "tiny", "--quick", "--out", str(tmp_path), "--set", "steps=2"]) == 0
    timing = pd.read_csv(tmp_path / "timing.csv")
    assert list(timing.study) == ["probe", "overlap"]  # earlier rows kept
    assert json.loads(timing.settings[1]) == {"n_images": 4, "steps": 3}
    assert main(["study", "probe", "--model", "tiny", "--out", str(tmp_path), "--set", "steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert parser().parse_args(["study", "edit"]).name == "editing"
    assert parser().parse_args(["study", "self-cross"]).name == "self_cross"


def test_evaluate_shapes_refuses_a_card_from_a_pilot_read():
    with pytest.raises(SystemExit, match="pass one of them"):
        main(["evaluate-shapes", "--model", "tiny", "--pilot", "--card"])
