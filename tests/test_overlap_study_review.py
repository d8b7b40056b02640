"""The overlap study after its audit, each fix checked against an independent computation (scikit-learn, pandas):
failures compared with all-present images only, cause read at an early step, distinct prompts, the logistic AUC over
fold seeds, and the committed table's audited numbers where that table is the audited one."""

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import probe.studies.overlap as overlap
from probe.analysis.probes import LinearProbe
from probe.shapes.world import COLOURS, SHAPES
from probe.studies.overlap import (
    ALL_METRICS,
    METRICS,
    OVERLAP_SEED,
    failure_association,
    overlap_headline,
    overlap_prompts,
)

COMMITTED = Path(__file__).parents[1] / "figures" / "overlap_metrics.csv.gz"


def _images(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, step): an exact copy (same prompt, same seed) is the same image."""
    return table.drop_duplicates(["prompt", "seed", "step"])


def _versus_all_present(frame: pd.DataFrame, outcome: str) -> pd.DataFrame:
    """The images with ``outcome`` and those with every subject present (none missing, none mixed)."""
    return frame[frame[outcome] | ~(frame.missing | frame.mixed)]


@pytest.fixture(scope="module")
def committed():
    table = pd.read_csv(COMMITTED)
    steps = sorted(table.step.unique())
    early = min(steps, key=lambda s: abs(s - round(10 / 50 * (max(steps) + 1))))
    return table[table.step.isin([early, max(steps)])], early, max(steps)


@pytest.fixture(scope="module")
def association(committed):
    return failure_association(committed[0])


def test_each_failure_is_compared_with_all_present_images_only(association, committed):
    table, early, last = committed
    for outcome, metric, step in itertools.product(("missing", "mixed"), METRICS, (early, last)):
        compared = _versus_all_present(_images(table[table.step == step]), outcome)
        row = association.query("outcome == @outcome and metric == @metric and step == @step").iloc[0]
        assert row.auc == pytest.approx(roc_auc_score(compared[outcome], compared[metric]))
        assert (row.n, row.n_cases) == (len(compared), compared[outcome].sum())
        assert row.n_controls == len(compared) - compared[outcome].sum()


def test_planted_mixing_separates_only_against_all_present_images():
    """Missing images share the mixed images' high overlap: against every other image the signal of mixing is
    diluted to chance, against the all-present images it is perfect."""
    kinds = np.repeat(["present", "missing", "mixed"], 20)
    frame = pd.DataFrame({"prompt": np.arange(60), "seed": 0, "step": 0, "timestep": 1.0,
                          "missing": kinds == "missing", "mixed": kinds == "mixed",
                          "signal": np.where(kinds == "present", 0.0, 1.0) + np.arange(60) % 20 / 100})
    row = failure_association(frame, names=["signal"], n_boot=50).query("outcome == 'mixed' and metric == 'signal'")
    assert row.auc.item() == pytest.approx(1.0) and row.n.item() == 40
    assert roc_auc_score(frame.mixed, frame.signal) < 0.8  # what the old comparison group gave


def test_a_copied_image_counts_once(committed):
    first = committed[0].iloc[0]
    copy = committed[0][(committed[0].prompt == first.prompt) & (committed[0].seed == first.seed)]
    table = pd.concat([committed[0], copy], ignore_index=True)  # one image twice, as the audited table held them
    distinct = _images(table)
    assert len(distinct) == len(committed[0]) < len(table)
    once = failure_association(distinct, n_boot=50, fold_seeds=2)
    twice = failure_association(table, n_boot=50, fold_seeds=2)
    pd.testing.assert_frame_equal(once, twice)


def test_the_logistic_auc_is_the_mean_over_fold_seeds(association, committed):
    table, early, _ = committed
    compared = _versus_all_present(_images(table[table.step == early]), "mixed")
    X, y, groups = compared[list(METRICS)].to_numpy(float), compared.mixed.to_numpy(), compared.prompt.to_numpy()
    folds = min(5, compared[y].prompt.nunique(), compared[~y].prompt.nunique())
    settings = LinearProbe()
    aucs = []
    for seed in range(20):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=settings.C, max_iter=settings.max_iter))
        split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        scores = cross_val_predict(model, X, y, cv=split, groups=groups, method="predict_proba")[:, 1]
        aucs.append(roc_auc_score(y, scores))
    a = association
    row = a[(a.outcome == "mixed") & (a.metric == ALL_METRICS) & (a.step == early)].iloc[0]
    assert row.fold_seeds == 20 and np.ptp(aucs) > 0.01  # one seed's value would be an arbitrary pick
    assert row.auc == pytest.approx(np.mean(aucs))
    assert row.auc_sd == pytest.approx(np.std(aucs, ddof=1))
    assert (row.auc_min, row.auc_max) == pytest.approx((min(aucs), max(aucs)))
    assert row.ci_low <= row.auc <= row.ci_high


def test_the_headline_reads_cause_early_and_the_last_step_beside_it(association, committed):
    _, early, last = committed
    headline = overlap_headline(association)
    assert headline.iloc[0].step == early and headline.iloc[0].primary
    assert set(headline[headline.primary].step) == {early}
    beside = headline[~headline.primary]
    assert set(beside.step) == {last} and set(beside.read) == {"outcome read-out, not cause"}
    assert len(headline) == 2 * 2 * (len(METRICS) + 1)
    for row in headline.itertuples():
        match = association.query("outcome == @row.outcome and metric == @row.metric and step == @row.step")
        assert row.auc == match.auc.item() and row.ci_low == match.ci_low.item()
    answer = overlap.overlap_answer(headline)
    assert answer.startswith(f"Read at step {early} of {last + 1}") and "outcome read-out, not cause" in answer
    assert "by construction" in answer and "fold seeds" in answer
    assert overlap.overlap_answer(_read_back(headline)) == answer  # as the report reads it from its CSV


def _read_back(table: pd.DataFrame) -> pd.DataFrame:
    from io import StringIO

    return pd.read_csv(StringIO(table.to_csv(index=False)))


def test_headline_steps_take_the_nearest_early_step_a_quick_table_has():
    assert overlap.headline_steps(range(50)) == (10, 49)
    assert overlap.headline_steps([8, 25, 41, 49]) == (8, 49)
    assert overlap.headline_steps([0, 1, 2]) == (1, 2)


def test_prompts_are_drawn_without_replacement():
    every = len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES) * (len(SHAPES) - 1)
    assert len(set(overlap_prompts(100))) == 100
    prompts, seeds = overlap.overlap_design(400, 4)
    pairs = [(p, s) for p in prompts for s in seeds]
    assert len(pairs) == 400 and len(set(pairs)) == 400 and len(set(prompts)) == 100
    rng = np.random.default_rng(OVERLAP_SEED)  # the old draw: each prompt drawn afresh, with replacement
    old = [" and ".join(f"a {c} {s}" for c, s in zip(rng.choice(list(COLOURS), 2, replace=False),
                                                     rng.choice(list(SHAPES), 2, replace=False)))
           for _ in range(100)]
    assert len(set(old)) < 100
    assert len(set(overlap_prompts(every))) == every
    with pytest.raises(ValueError, match=f"only {every} distinct"):
        overlap_prompts(every + 1)
    with pytest.raises(ValueError, match=f"only {every} distinct"):
        overlap.overlap_design(4 * every + 1, 4)


def test_the_docstring_names_the_multiplicity():
    assert "Holm" in overlap.__doc__ and "p-value" in overlap.__doc__


def test_the_family_interval_is_bonferroni_over_one_outcomes_statistics_at_one_step():
    """The registered family: each outcome's AUCs at the primary step; its interval is the 1 − 0.05/k percentile
    interval of the same resamples (k: the statistics and the joint score), wider than the 95% one, and an AUC
    stands apart from chance only when it excludes 0.5."""
    rng = np.random.default_rng(0)
    n = 80
    missing = np.arange(n) < 40
    frame = pd.DataFrame({"prompt": np.arange(n) // 2, "seed": np.arange(n) % 2, "step": 10, "timestep": 799.0,
                          "missing": missing, "mixed": False,
                          "strong": missing + rng.normal(0, 0.3, n), "none": rng.normal(0, 1, n)})
    table = failure_association(frame, outcomes=("missing",), names=["strong", "none"], n_boot=300, fold_seeds=2)
    for row in table.itertuples():
        scores = frame[row.metric].to_numpy() if row.metric != "all (logistic)" else None
        if scores is None:
            continue
        expected = overlap.auc_interval(missing, scores, frame.prompt.to_numpy(), 300, (0.95, 0.95, 1 - 0.05 / 3))
        assert (row.auc, row.ci_low, row.ci_high, row.ci_low_family, row.ci_high_family) == pytest.approx(
            (expected[0], expected[1], expected[2], expected[5], expected[6]))
        assert row.ci_low_family <= row.ci_low and row.ci_high_family >= row.ci_high
    headline = overlap.overlap_headline(table)
    apart = dict(zip(headline.metric, headline.apart_from_chance))
    assert apart["strong"] and not apart["none"]
    text = overlap.family_text(headline)
    assert "Missing against all present: " in text and "strong " in text and "none " not in text.split("Missing")[1]
