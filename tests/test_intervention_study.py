"""The intervention study's units, outcomes, shards and statistics, against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import linregress

from probe.studies import intervention as iv


def test_units_are_distinct_object_sets_in_both_orders_and_the_pilot_is_apart():
    pilot = iv.draw_units(iv.PILOT_SETS, 1)
    study = iv.draw_units(30, 2, skip=iv.PILOT_SETS)
    assert set(pilot.set_id).isdisjoint(study.set_id)
    assert study.set_id.nunique() == 30 and len(study) == 30 * 2 * 2
    assert not study.duplicated(["prompt", "seed"]).any() and study.seed.is_unique
    for _, one in study.groupby("set_id"):
        a, b = sorted(set(one.prompt))
        assert set(a.split(" and ")) == set(b.split(" and ")) and a != b  # both word orders of one set
    assert len(iv.object_sets()) == 6 * 5 * 6  # colour pairs (ordered) × shape pairs
    with pytest.raises(ValueError, match="fewer than"):
        iv.draw_units(200, 1, skip=iv.PILOT_SETS)


def test_one_category_per_image():
    assert iv.category({"missing": True, "mixed": True}) == "missing"
    assert iv.category({"missing": False, "mixed": True}) == "mixed"
    assert iv.category({"missing": False, "mixed": False}) == "all_present"


def _judge(image, prompt):
    """A stand-in judge for the random tiny model: a subject is present where its half of the image is bright."""
    halves = np.asarray(image)[:, : image.shape[1] // 2], np.asarray(image)[:, image.shape[1] // 2 :]
    return [SimpleNamespace(status="present" if half.mean() > 120 else "missing", detection=None) for half in halves]


def test_two_shards_merged_equal_one_process(tmp_path, tiny):
    units = iv.draw_units(2, 1)
    arms = iv.e1_arms((0.1, 0.3))
    kwargs = dict(experiment="e1", steps=2, judge=_judge, progress=False)
    one = iv.run(tiny, units, arms, store=tmp_path / "one.csv", **kwargs)
    shards = [iv.run(tiny, units, arms, store=tmp_path / f"shard{i}.csv", shard=(i, 2), **kwargs) for i in range(2)]
    merged = iv.merge(shards)
    drop = ["seconds", "settings_id"]
    pd.testing.assert_frame_equal(merged.drop(columns=drop), one.drop(columns=drop), check_dtype=False)
    assert list(one.method[:4]) == ["none", "sham", "dose 0.1", "dose 0.3"]
    none, sham = one[one.method == "none"], one[one.method == "sham"]
    assert (none.iou_before.to_numpy() == sham.iou_after.to_numpy()).all()  # the sham moved nothing
    with pytest.raises(ValueError, match="overlap"):
        iv.merge([one, shards[0]])
    again = iv.run(tiny, units, arms, store=tmp_path / "one.csv", **kwargs)  # resumed: every row reused
    pd.testing.assert_frame_equal(again, one, check_dtype=False, rtol=1e-4)  # stored with six digits


def _rows(rng, n_units=40):
    rows = []
    for unit in range(n_units):
        for arm, dose in (("none", np.nan), ("sham", np.nan), ("dose 0.05", 0.05), ("dose 0.45", 0.45),
                          ("dose 0.15", 0.15), ("dose 0.3", 0.3)):
            iou = (0.3 if np.isnan(dose) else dose) + rng.normal(0, 0.02)
            ok = rng.random() < 0.7 - 0.5 * iou
            rows.append({"unit": unit, "set_id": unit // 4, "method": arm, "dose": dose, "iou_after": iou,
                         "category": "all_present" if ok else rng.choice(["missing", "mixed"])})
    return pd.DataFrame(rows)


def test_trend_and_contrast_match_a_hand_computation():
    rows = _rows(np.random.default_rng(3))
    flagged = rows.assign(all_present=rows.category == "all_present")
    trend = iv.dose_response(flagged, "all_present", n_boot=200)
    slopes = [linregress(u.iou_after, u.all_present.astype(float)).slope * 10
              for _, u in flagged[flagged.dose.notna()].groupby("unit")]
    assert trend["points_per_0.1_iou"] == pytest.approx(np.mean(slopes), rel=1e-9)
    assert trend["ci_low"] < trend["points_per_0.1_iou"] < trend["ci_high"] and trend["n_units"] == 40
    extreme = iv.contrast(flagged, "dose 0.05", "dose 0.45", "all_present", n_boot=200)
    wide = flagged.pivot(index="unit", columns="method", values="all_present").astype(float)
    assert extreme["difference"] == pytest.approx(100 * (wide["dose 0.05"] - wide["dose 0.45"]).mean())
    family = iv.primary_family(rows, n_boot=200)
    primary = family[family.family == "primary"]
    assert len(primary) == 2 and primary.p_holm.notna().all() and family[family.family != "primary"].p_holm.isna().all()
    p = np.sort(primary.p_value.to_numpy())
    assert np.sort(primary.p_holm.to_numpy())[0] == pytest.approx(min(1, 2 * p[0]))


def test_the_registered_design_and_the_refusal_of_a_partial_table():
    units, arms, spec = iv.design("e1")
    assert len(units) == 672 and units.set_id.nunique() == 168 and [a.name for a in arms][:2] == ["none", "sham"]
    assert set(units.set_id).isdisjoint(iv.draw_units(iv.PILOT_SETS, 1).set_id)  # the pilot's sets are not reused
    assert sorted(arms[2].steps(spec["steps"])) == list(range(10))
    e2_units, e2_arms, _ = iv.design("e2")
    assert len(e2_units) == 336 and set(e2_units.seed).isdisjoint(units.seed)
    assert [sorted(a.steps(50))[0] for a in e2_arms[1:]] == [0, 20, 40]
    full = pd.DataFrame([{"prompt": p, "seed": s, "method": a.name, "steps": 50}
                         for p, s in zip(units.prompt, units.seed) for a in arms])
    iv.check_registered(full, "e1")
    with pytest.raises(ValueError, match="no answer is read before the registered size is complete"):
        iv.check_registered(full.iloc[:-1], "e1")
    with pytest.raises(ValueError, match="other settings"):
        iv.check_registered(full.assign(steps=25), "e1")


def test_arm_summary_and_its_figure_on_the_pilot_table():
    from probe import plots

    pilot = pd.read_csv(iv.REGISTRATION.parent / "intervention_pilot_images.csv")
    summary = iv.arm_summary(pilot, n_boot=200)
    assert list(summary.arm) == ["none", "sham", "dose 0.05", "dose 0.15", "dose 0.3", "dose 0.45"]
    for row in summary.itertuples():
        part = pilot[pilot.method == row.arm]
        assert row.all_present_rate == pytest.approx((part.category == "all_present").mean())
        assert row.all_present_rate + row.missing_rate + row.mixed_rate == pytest.approx(1.0)
        assert row.iou_after == pytest.approx(part.iou_after.mean()) and row.n == 24 and row.n_sets == 12
    none, sham = summary.iloc[0], summary.iloc[1]
    assert none.iou_after == sham.iou_after and none.all_present_rate == sham.all_present_rate  # the sham moved nothing
    figure = plots.dose_response(summary)
    lines = [line for line in figure.axes[0].get_lines() if line.get_marker() == "o" and line.get_linestyle() == "-"]
    assert len(lines) == 3  # one dose–response line per outcome, through the four dosed arms
    np.testing.assert_allclose(sorted(lines[0].get_xdata()), sorted(summary.iou_after[2:]))


def test_the_answer_says_what_its_tables_say():
    pilot = pd.read_csv(iv.REGISTRATION.parent / "intervention_pilot_images.csv")
    summary = iv.arm_summary(pilot, n_boot=100)
    good = summary.assign(peak_ratio=1.0, spread_ratio=1.0)

    def family(slope, p, diff=10.0):
        rows = []
        for outcome in iv.CATEGORIES:
            rows += [{"test": "trend over achieved soft IoU (points per 0.1)", "outcome": outcome,
                      "points_per_0.1_iou": slope, "ci_low": slope - 2, "ci_high": slope + 2, "p_holm": p},
                     {"test": "dose 0.05 − dose 0.3 (points)", "outcome": outcome, "difference": diff,
                      "ci_low": diff - 3, "ci_high": diff + 3, "p_holm": p}]
        return pd.DataFrame(rows)

    text = iv.answer(family(-4.0, 0.001), good, 8.0)
    assert "-4.0 points [-6.0, -2.0] per 0.1 more soft IoU" in text and "the direction paper 003 claims" in text
    assert "more overlap alone meant fewer images with every subject present" in text
    assert "against paper 003" in iv.answer(family(+4.0, 0.001, -10.0), good, 8.0)
    null = iv.answer(family(-1.0, 0.4), good, 8.0)
    assert "no effect of overlap alone was found" in null and "8.0 points" in null and "not confirmed" in null
    bad = iv.answer(family(-4.0, 0.001), summary.assign(peak_ratio=0.8, spread_ratio=1.0), 8.0)
    assert "manipulation check failed" in bad and "paper 003" not in bad


def test_analyse_merges_the_shards_and_refuses_them_until_complete(tmp_path):
    units, arms, _ = iv.design("e2")
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"experiment": "e2", "steps": 50, "unit": k, "set_id": u.set_id, "prompt": u.prompt,
                          "seed": u.seed, "method": a.name, "dose": a.dose if isinstance(a.dose, float) else np.nan,
                          "category": rng.choice(iv.CATEGORIES), "iou_before": 0.15, "iou_after": 0.1,
                          "reachable": 1.0, "peak_ratio": 1.0, "spread_ratio": 1.0, "peak_ratio_worst": 0.0,
                          "spread_ratio_worst": 0.0}
                         for k, u in enumerate(units.itertuples()) for a in arms])
    shards = [rows[rows.unit % 2 == i] for i in range(2)]
    shards[0].iloc[:-1].to_csv(tmp_path / "intervention_e2_images_shard0of2.csv", index=False)
    shards[1].to_csv(tmp_path / "intervention_e2_images_shard1of2.csv", index=False)
    with pytest.raises(ValueError, match="1343 of the 1344 registered"):
        iv.analyse("e2", tmp_path, n_boot=50)
    shards[0].to_csv(tmp_path / "intervention_e2_images_shard0of2.csv", index=False)
    found = iv.analyse("e2", tmp_path, n_boot=50)
    pd.testing.assert_frame_equal(found["rows"].reset_index(drop=True), rows, check_dtype=False)
    primary = found["family"][found["family"].family == "primary"]
    assert len(primary) == 3 and primary.p_holm.notna().all()
    wide = rows.assign(ok=rows.category == "all_present").pivot(index="unit", columns="method", values="ok")
    assert primary.difference.iloc[0] == pytest.approx(100 * (wide["early 0.05"].astype(float)
                                                              - wide["none"].astype(float)).mean())
    assert (tmp_path / "intervention_e2_images.csv").exists() and (tmp_path / "intervention_e2_family.csv").exists()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_the_study_runs_on_joint_attention_families(tmp_path, name):
    import probe

    pipe = probe.load(name)
    rows = iv.run(pipe, iv.draw_units(1, 1), iv.e1_arms((0.1,)), experiment="e1", steps=2, judge=_judge,
                  store=tmp_path / "rows.csv", progress=False)
    assert list(rows.method) == ["none", "sham", "dose 0.1"] * 2 and rows.calls.min() > 0
    none, sham, dosed = (rows[rows.method == m] for m in ("none", "sham", "dose 0.1"))
    np.testing.assert_array_equal(none.iou_after.to_numpy(), sham.iou_after.to_numpy())
    assert (sham.mass_ratio_worst == 0).all() and (dosed.mass_ratio_worst < 1e-3).all()
    assert (dosed.iou_after - 0.1).abs().lt((dosed.iou_before - 0.1).abs() + 1e-6).all()  # moved toward the dose


def test_the_mediated_share_is_slope_times_overlap_change_over_effect():
    e1 = _rows(np.random.default_rng(5))
    rng = np.random.default_rng(6)
    guidance = pd.DataFrame([{"set": "shapes-2", "initno": False, "prompt": f"p{i}", "seed": s, "method": m,
                              "all_present": rng.random() < (0.8 if m == "ae" else 0.3),
                              "soft_iou_t10": rng.normal(0.12 if m == "ae" else 0.15, 0.02)}
                             for i in range(30) for s in range(2) for m in ("none", "ae")])
    found = iv.mediated_share(e1, iv.guidance_pairs(guidance), n_boot=100)
    slope = np.mean([linregress(u.iou_after, (u.category == "all_present").astype(float)).slope * 100
                     for _, u in e1[e1.dose.notna()].groupby("unit")])
    wide = guidance.assign(all_present=guidance.all_present.astype(float)).pivot_table(
        index=["prompt", "seed"], columns="method", values=["all_present", "soft_iou_t10"])
    effect = ((wide["all_present"]["ae"] - wide["all_present"]["none"]) * 100).mean()
    change = (wide["soft_iou_t10"]["ae"] - wide["soft_iou_t10"]["none"]).mean()
    assert found["share"] == pytest.approx(slope * change / effect)
    assert found["ci_low"] <= found["share"] <= found["ci_high"]


def test_figures_check_recomputes_the_analysed_tables(tmp_path):
    pilot = pd.read_csv(iv.REGISTRATION.parent / "intervention_pilot_images.csv")
    rows = pilot.replace({"method": {"dose 0.15": "dose 0.1", "dose 0.45": "dose 0.2"}})  # e1's arm names
    rows = rows[rows.method.isin(["none", "sham", "dose 0.05", "dose 0.1", "dose 0.2"])]
    rows = pd.concat([rows, rows[rows.method == "dose 0.2"].assign(method="dose 0.3")])
    rows.to_csv(tmp_path / "intervention_e1_images.csv", index=False)
    iv.arm_summary(rows).to_csv(tmp_path / "intervention_e1_summary.csv", index=False, float_format="%.6g")
    family = iv.primary_family(rows)
    family.to_csv(tmp_path / "intervention_e1_family.csv", index=False, float_format="%.6g")
    assert iv.differences(tmp_path) == []
    family.assign(difference=family.difference + 1).to_csv(tmp_path / "intervention_e1_family.csv", index=False)
    problems = iv.differences(tmp_path)
    assert problems and all("family" in p and "difference" in p for p in problems)


def test_the_answer_names_what_was_not_registered():
    pilot = pd.read_csv(iv.REGISTRATION.parent / "intervention_pilot_images.csv")
    summary = iv.arm_summary(pilot, n_boot=100).assign(peak_ratio=1.0, spread_ratio=1.0)
    family = iv.primary_family(pilot.replace({"method": {"dose 0.45": "dose 0.3"}}), n_boot=100)
    loose = family[family.family == iv.EXPLORATORY]
    assert list(loose.comparison) == ["dose 0.05 − none", "dose 0.3 − none"] and loose.p_holm.isna().all()
    text = iv.answer(family, summary, 8.0)
    first = loose.iloc[0]
    assert (f"Not registered, so exploratory: against no intervention, all present changed at dose 0.05 "
            f"{first.difference:+.1f} points [{first.ci_low:+.1f}, {first.ci_high:+.1f}]") in text


def test_the_timing_answer_says_where_the_move_was_a_pull_and_the_check_failed():
    summary = pd.DataFrame([
        {"arm": "none", "dose": np.nan, "iou_before": 0.15, "iou_after": 0.15, "peak_ratio": 1.0, "spread_ratio": 1.0,
         "all_present_rate": 0.4},
        {"arm": "early 0.05", "dose": 0.05, "iou_before": 0.15, "iou_after": 0.07, "peak_ratio": 1.0,
         "spread_ratio": 1.0, "all_present_rate": 0.45},
        {"arm": "late 0.05", "dose": 0.05, "iou_before": 0.02, "iou_after": 0.05, "peak_ratio": 1.0,
         "spread_ratio": 1.08, "all_present_rate": 0.4}])
    family = pd.DataFrame([
        {"family": "primary", "comparison": "early 0.05 − none", "difference": 5.0, "ci_low": 2.0, "ci_high": 8.0,
         "p_holm": 0.01},
        {"family": "primary", "comparison": "late 0.05 − none", "difference": 0.0, "ci_low": -1.0, "ci_high": 1.0,
         "p_holm": 1.0}])
    text = iv.timing_answer(family, summary)
    assert "early +5.0 points [+2.0, +8.0] (Holm p = 0.01); late +0.0 points [-1.0, +1.0]" in text
    assert "In late 0.05 (natural soft IoU 0.020) the maps already overlapped less than the dose" in text
    assert "late 0.05: mean spread ratio 1.080" in text and "Clear: early 0.05 − none." in text
