"""The studies on the tiny model with quick sizes: tables with sane values, and figures on disk."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from probe.experiments import (
    ALL_METRICS,
    METRICS,
    PROBE_TARGETS,
    auc_interval,
    missing_association,
    overlap_headline,
    overlap_study,
    position_bin,
    probe_headline,
    probe_study,
)
from probe.probes import COLUMNS
from probe.shapes.world import COLOURS, SHAPES

STEPS = 3


def _alternating_judge(image, prompt):
    """A stand-in judge that calls the second subject missing in about half of the images (by pixel parity), so
    the association has both outcomes even on a random model."""
    second = "missing" if int(image.sum()) % 2 else "present"
    return [SimpleNamespace(status="present", detection=None), SimpleNamespace(status=second, detection=None)]


def _check_intervals(table: pd.DataFrame, value: str) -> None:
    known = table.dropna(subset=[value])
    assert known[value].between(0, 1).all()
    assert (known.ci_low <= known[value] + 1e-12).all() and (known[value] <= known.ci_high + 1e-12).all()


def test_position_bins():
    mask = np.zeros((30, 30), bool)
    mask[0:6, 0:6] = True
    assert position_bin(mask) == "top-left"
    mask[:] = False
    mask[12:18, 24:30] = True
    assert position_bin(mask) == "middle-right"


def test_auc_interval_and_association_on_planted_data():
    rng = np.random.default_rng(0)
    y = np.repeat([False, True], 60)
    scores = y + rng.normal(0, 0.5, y.size)
    auc, low, high = auc_interval(y, scores)
    assert auc == pytest.approx(roc_auc_score(y, scores))
    assert 0.8 < low <= auc <= high <= 1
    assert np.isnan(auc_interval(np.zeros(5, bool), np.arange(5))[0])
    metrics = pd.DataFrame({"step": 0, "timestep": 1.0, "missing": y, "signal": y + rng.normal(0, 0.5, y.size),
                            "noise": rng.normal(size=y.size)})
    table = missing_association(metrics, names=["signal", "noise"], n_boot=200).set_index("metric")
    assert table.loc["signal", "ci_low"] > 0.8 and table.loc["noise", "ci_low"] < 0.5 < table.loc["noise", "ci_high"]
    assert table.loc[ALL_METRICS, "auc"] > 0.8


def test_probe_study_quick(tiny, tmp_path):
    study = probe_study(tiny, steps=STEPS, quick=True, out=tmp_path, progress=False)
    labels, table = study.labels, study.accuracy
    assert len(labels) == len(COLOURS) * len(SHAPES)
    assert set(labels.colour) == set(COLOURS) and set(labels["shape"]) == set(SHAPES)
    assert list(labels.prompt) == [f"a {c} {s}" for c, s in zip(labels.colour, labels["shape"])]
    assert list(table.columns) == COLUMNS and {"colour", "shape"} <= set(table.target) <= set(PROBE_TARGETS)
    assert set(table.kind) == {"cross", "self"} and set(table.step_bin) == {"early", "middle", "late"}
    _check_intervals(table, "accuracy")
    colour = table[table.target == "colour"]
    assert (colour.chance == 1 / len(COLOURS)).all() and (colour.n == len(labels)).all()
    headline = probe_headline(table)
    assert len(headline) == table.groupby(["target", "kind", "feature"]).ngroups
    assert (tmp_path / "probe_accuracy.png").stat().st_size > 0


def test_overlap_study_quick(tiny, tmp_path):
    study = overlap_study(tiny, steps=STEPS, quick=True, out=tmp_path, judge=_alternating_judge, progress=False)
    metrics, table = study.metrics, study.association
    assert len(metrics) == 16 * STEPS and set(METRICS) <= set(metrics.columns)
    assert np.isfinite(metrics[list(METRICS)].to_numpy()).all()
    assert metrics.soft_iou.between(0, 1).all() and metrics.com_distance.between(0, 1).all()
    assert metrics.ae_loss.between(0, 1).all() and (metrics.kl_sym >= 0).all()
    assert 0 < metrics.missing.mean() < 1
    assert set(table.metric) == {*METRICS, ALL_METRICS} and len(table) == (len(METRICS) + 1) * STEPS
    _check_intervals(table, "auc")
    assert table.auc.notna().all()
    for (metric, step), row in table.set_index(["metric", "step"]).iterrows():
        if metric != ALL_METRICS:
            at = metrics[metrics.step == step]
            assert row.auc == pytest.approx(roc_auc_score(at.missing, at[metric]))
            assert row.n_missing == at.missing.sum()
    assert len(overlap_headline(table)) == len(METRICS) + 1
    assert all(e.missing or e.all_present for e in study.examples)
    for name in ("overlap_auc", "overlap_examples"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
