"""The intervention study's second registration: E2b's relative doses per window and E3's factorial of A&E and an
overlap term, against hand computations on synthetic tables and a run on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from probe.analysis.overlap import soft_iou
from probe.analysis.stats import holm
from probe.studies import intervention as iv
from probe.studies.intervention import factorial as fx
from probe.tap import Call, Consumer


def _e2b_rows(rng, n_units=30, effect=-0.3):
    rows = []
    for unit in range(n_units):
        for arm in iv.e2b_arms():
            p = 0.5 + (effect if arm.name == "early x2" else 0.0)
            rows.append({"unit": unit, "set_id": unit // 2, "method": arm.name, "dose": arm.dose,
                         "category": "all_present" if rng.random() < p else rng.choice(["missing", "mixed"])})
    return pd.DataFrame(rows)


def test_e2b_family_is_each_window_against_none_with_holm_over_the_windows():
    rows = _e2b_rows(np.random.default_rng(0))
    assert list(dict.fromkeys(rows.method)) == ["none", "early x2", "middle x2", "late x2"]
    family = iv.family_of("e2b", rows, n_boot=200) if "e2b" in iv.registration()["experiments"] else \
        iv.timing_family(rows, n_boot=200)
    primary = family[family.family == "primary"]
    assert list(primary.comparison) == ["early x2 − none", "middle x2 − none", "late x2 − none"]
    wide = rows.assign(ok=(rows.category == "all_present").astype(float)).pivot(index="unit", columns="method",
                                                                                 values="ok")
    for r in primary.itertuples():
        arm = r.comparison.split(" − ")[0]
        assert r.difference == pytest.approx(100 * (wide[arm] - wide["none"]).mean())
    np.testing.assert_allclose(primary.p_holm, holm(primary.p_value.to_numpy()))


def _e2b_summary(after):
    rows = [{"arm": "none", "dose": np.nan, "iou_before": 0.15, "iou_after": 0.15, "peak_ratio": 1.0,
             "spread_ratio": 1.0}]
    for window, before in (("early", 0.15), ("middle", 0.013), ("late", 0.013)):
        rows.append({"arm": f"{window} x2", "dose": 2.0, "iou_before": before, "iou_after": after(before),
                     "iou_ratio": after(before) / before, "reached": 0.9, "peak_ratio": 1.0, "spread_ratio": 1.02})
    return pd.DataFrame(rows)


def test_e2b_manipulation_check_wants_each_move_in_the_direction_of_its_factor():
    assert iv.relative_manipulation(_e2b_summary(lambda b: 2 * b)) == []
    failed = iv.relative_manipulation(_e2b_summary(lambda b: b if b < 0.1 else 2 * b))
    assert failed == ["middle x2 did not raise the soft IoU (0.013 → 0.013)",
                      "late x2 did not raise the soft IoU (0.013 → 0.013)"]
    wide = _e2b_summary(lambda b: 2 * b).assign(spread_ratio=[1.0, 1.0, 1.06, 1.0])
    assert iv.relative_manipulation(wide) == ["middle x2: mean spread ratio 1.060"]


def test_e2b_answer_names_every_window_and_what_the_size_rules_out():
    rows = _e2b_rows(np.random.default_rng(1))
    family = iv.timing_family(rows, n_boot=200)
    summary = _e2b_summary(lambda b: 2 * b)
    text = iv.relative_timing_answer(family, summary, 9.1)
    for r in family[family.family == "primary"].itertuples():
        arm = r.comparison.split(" − ")[0]
        assert f"{arm} {r.difference:+.1f} points [{r.ci_low:+.1f}, {r.ci_high:+.1f}]" in text
    assert "soft IoU 0.013 → 0.026" in text and "middle x2 ×2.00 per call, dose reached in 90% of calls" in text
    assert "E1's slope" not in text
    predicted = iv.relative_timing_answer(family, summary, 9.1, e1_slope=-2.3)
    assert "E1's slope (-2.3 points per 0.1 soft IoU) predicts early x2 -3.4, middle x2 -0.3" in predicted
    early = family[(family.family == "primary") & (family.comparison == "early x2 − none")].iloc[0]
    assert ("Clear: early x2 − none" in text) == (early.p_holm < 0.05)


def _e3_rows(rng, n_units=40):
    rows = []
    for unit in range(n_units):
        for arm, p, iou in (("none", 0.3, 0.16), ("ae", 0.5, 0.13), ("iou", 0.35, 0.14), ("ae+iou", 0.5, 0.11)):
            category = "all_present" if rng.random() < p else rng.choice(["missing", "mixed"])
            if arm == "ae+iou":  # the overlap term adds nothing to A&E: the same outcome, unit by unit
                category = rows[-2]["category"]
            rows.append({"unit": unit, "set_id": unit // 4, "method": arm, "iou_early": iou + rng.normal(0, 0.01),
                         "category": category})
    return pd.DataFrame(rows)


def test_e3_family_matches_a_hand_computation():
    rows = _e3_rows(np.random.default_rng(1))
    family = fx.factorial_family(rows, n_boot=200)
    ok = rows.assign(ok=(rows.category == "all_present").astype(float)).pivot(index="unit", columns="method",
                                                                               values="ok")
    iou = rows.pivot(index="unit", columns="method", values="iou_early")
    primary = family[family.family == "primary"].set_index("comparison")
    assert list(primary.index) == ["ae+iou − ae", "iou − none"]
    assert primary.difference["ae+iou − ae"] == pytest.approx(100 * (ok["ae+iou"] - ok["ae"]).mean())
    np.testing.assert_allclose(primary.p_holm, holm(primary.p_value.to_numpy()))
    both = family[(family.test == "interaction (points)") & (family.outcome == "all_present")].iloc[0]
    hand = 100 * ((ok["ae+iou"] - ok["ae"]) - (ok["iou"] - ok["none"])).mean()
    assert both.difference == pytest.approx(hand)
    moved = family[family.family == "manipulation check"].set_index("comparison")
    assert moved.difference["iou − none"] == pytest.approx((iou["iou"] - iou["none"]).mean())  # soft IoU, not points
    assert family[family.family != "primary"].p_holm.isna().all()


def test_e3_answer_reads_the_control_and_the_check_before_a_null():
    rows = _e3_rows(np.random.default_rng(2))
    family = fx.factorial_family(rows, n_boot=200)
    text = fx.factorial_answer(family, 9.0)
    control = family[(family.family == "positive control") & (family.outcome == "all_present")].iloc[0]
    assert f"Positive control: A&E against none changed all present by {control.difference:+.1f} points" in text
    assert "lowered the subjects' early soft IoU" in text
    added = family[(family.family == "primary") & (family.comparison == "ae+iou − ae")].iloc[0]
    assert f"Adding the overlap term to A&E changed all present by {added.difference:+.1f} points" in text
    assert "9.0 points" in text and "not confirmed" in text  # A&E + iou = A&E here: a null the design can state
    unmoved = rows.assign(iou_early=np.where(rows.method.str.contains("iou"), rows.iou_early + 0.05, rows.iou_early))
    text = fx.factorial_answer(fx.factorial_family(unmoved, n_boot=200), 9.0)
    assert "did not clearly lower" in text and "not read as evidence against paper 003" in text
    share = {"share": 0.02, "ci_low": 0.01, "ci_high": 0.05, "slope_points_per_iou": -23.0, "ae_iou_change": -0.013,
             "ae_effect_points": 12.8}
    said = fx.factorial_answer(family, 9.0, share, e1_without_floor=True)
    assert ("Through overlap runs 2% [1%, 5%] of A&E's effect on all present here (E1's slope -2.3 points per 0.1 "
            "soft IoU × A&E's change of early soft IoU -0.013 ÷ A&E's effect +12.8 points); E1's images were judged "
            "before the judge's confidence floor, E3's with it.") in said


def test_mediated_share_from_the_factorial_pairs():
    e1 = pd.DataFrame([{"unit": u, "set_id": u // 2, "dose": d, "iou_after": d,
                        "category": "all_present" if (u + int(d * 100)) % 3 else "missing"}
                       for u in range(20) for d in (0.05, 0.1, 0.2, 0.3)])
    e3 = _e3_rows(np.random.default_rng(3))
    pairs = fx.factorial_pairs(e3)
    found = iv.mediated_share(e1, pairs, n_boot=200)
    slope = np.mean([np.polyfit(u.iou_after, (u.category == "all_present").astype(float), 1)[0] * 100
                     for _, u in e1.groupby("unit")])
    wide = e3.assign(ok=(e3.category == "all_present").astype(float)).pivot(index="unit", columns="method")
    effect = ((wide["ok"]["ae"] - wide["ok"]["none"]) * 100).mean()
    change = (wide["iou_early"]["ae"] - wide["iou_early"]["none"]).mean()
    assert found["share"] == pytest.approx(slope * change / effect)
    assert found["ci_low"] <= found["share"] <= found["ci_high"]


class _Maps(Consumer):
    """The subjects' head-mean maps of each real-pass call at the given layers and steps (independent of the study)."""

    def __init__(self, keys, steps, columns):
        self.keys, self.steps, self.columns, self.iou = set(keys), set(steps), columns, []

    def wants(self, call: Call) -> bool:
        return call.pass_ in ("cfg", "cond") and call.layer.key in self.keys and call.step in self.steps

    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        block = call.conditional(probs)[0].float()
        maps = [block[:, :, list(c)].sum(-1).mean(0).reshape(call.layer.grid) for c in self.columns]
        self.iou.append(float(soft_iou(*maps)))


def _judge(image, prompt):
    half = np.asarray(image).shape[1] // 2
    return [SimpleNamespace(status="present" if np.asarray(image)[:, s].mean() > 120 else "missing", detection=None)
            for s in (slice(None, half), slice(half, None))]


def test_the_factorial_runner_measures_early_overlap_as_e1_does_and_shards_merge(tmp_path, tiny, monkeypatch):
    from probe.prompts import subject_keys

    units = iv.draw_units(2, 1)
    kwargs = dict(step_size=1.0, steps=5, judge=_judge, progress=False)
    one = fx.run_factorial(tiny, units, iv.e3_arms(), store=tmp_path / "one.csv", **kwargs)
    assert list(one.method[:4]) == ["none", "ae", "iou", "ae+iou"] and one.step_size.isna().sum() == 4
    shards = [fx.run_factorial(tiny, units, iv.e3_arms(), store=tmp_path / f"s{i}.csv", shard=(i, 2), **kwargs)
              for i in range(2)]
    pd.testing.assert_frame_equal(iv.merge(shards).drop(columns=["seconds", "settings_id"]),
                                  one.drop(columns=["seconds", "settings_id"]), check_dtype=False)
    # the first unit's unguided image again, with an independent consumer beside the study's measuring one
    unit = units.iloc[0]
    columns, _ = subject_keys(tiny, unit.prompt, list(unit.subjects))
    layers = iv.intervened_layers(tiny)
    seen = _Maps([la.key for la in layers], iv.e3_arms()[0].steps(5), columns)
    from probe.steer import guide

    original = guide.generate

    def with_capture(*args, consumers=(), **kw):
        return original(*args, consumers=[*consumers, seen], **kw)

    monkeypatch.setattr(fx, "generate", with_capture)
    again = fx.run_factorial(tiny, units.iloc[:1], iv.e3_arms()[:1], store=None, **kwargs)
    assert again.iou_early.iloc[0] == pytest.approx(np.mean(seen.iou), abs=1e-6)
    assert again.iou_early.iloc[0] == pytest.approx(one.iou_early.iloc[0], abs=1e-6)


def test_the_second_registration_is_read_beside_the_first_and_keeps_every_seed_apart():
    designs = {e: iv.design(e) for e in ("e1", "e2", "e2b", "e3")}
    assert {e: len(u) for e, (u, _, _) in designs.items()} == {"e1": 672, "e2": 336, "e2b": 336, "e3": 336}
    seeds = [set(u.seed) for u, _, _ in designs.values()]
    seeds += [set(iv.draw_units(iv.PILOT_SETS, 1, seed_offset=p["seed_offset"]).seed) for p in iv.PILOTS.values()]
    assert sum(map(len, seeds)) == len(set().union(*seeds))  # no seed twice, pilots included
    _, arms, spec = designs["e2b"]
    assert [a.relative for a in arms] == [False, True, True, True] and iv.kind("e2b") == "timing_relative"
    assert [sorted(a.steps(50))[0] for a in arms[1:]] == [0, 20, 40]
    _, arms, spec = designs["e3"]
    assert [a.objective for a in arms] == [None, "ae", "iou", "ae+iou"] and spec["step_size"] == 1.0
    assert iv.detectable_points(spec) == pytest.approx(7.54, abs=0.01)  # the registration's stated 7.5 points
    assert iv.detectable_points(designs["e2b"][2]) == pytest.approx(9.1, abs=0.05)


def _tiny_registration(path):
    arms = [{"name": "none", "dose": None}, {"name": "sham", "dose": "sham"},
            {"name": "early 0.6", "dose": 0.6, "window": [0.0, 0.5]},
            {"name": "early x0.9", "dose": 0.9, "relative": True, "window": [0.0, 0.5]}]
    spec = {"experiments": {"t1": {"analysis": "timing", "sets": 2, "skip_sets": 12, "seeds_per_order": 1,
                                   "seed_offset": 0, "steps": 2, "arms": arms, "family": ["trend", "extreme"],
                                   "alpha": 0.05}}}
    import json

    path.write_text("# a test's registration\n\n```json\n" + json.dumps(spec) + "\n```\n")
    return path


def test_processes_run_the_shards_at_once_and_analyse_merges_them_into_one_process_table(tmp_path):
    registered = _tiny_registration(tmp_path / "registration.md")
    common = ["--model", "tiny", "--registration", str(registered)]
    assert iv.main(["run", "t1", *common, "--processes", "2", "--out", str(tmp_path / "two")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").glob("*.csv")) == [
        "intervention_t1_images_shard0of2.csv", "intervention_t1_images_shard1of2.csv"]
    assert iv.main(["run", "t1", *common, "--out", str(tmp_path / "one")]) == 0
    assert iv.main(["analyse", "t1", *common, "--out", str(tmp_path / "two")]) == 0
    merged = pd.read_csv(tmp_path / "two" / "intervention_t1_images.csv")
    one = pd.read_csv(tmp_path / "one" / "intervention_t1_images.csv")
    drop = ["seconds", "settings_id"]
    # the shards ran with one thread each, this process with its own: float sums may differ in the last digits
    pd.testing.assert_frame_equal(merged.drop(columns=drop), one.drop(columns=drop), check_dtype=False, atol=1e-5)
    assert len(one) == 2 * 2 * 4 and (tmp_path / "two" / "intervention_t1_family.csv").exists()


def test_shard_auto_reads_a_launchers_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert iv.shard_of("auto") == (1, 4) and iv.shard_of("0/2") == (0, 2) and iv.shard_of(None) is None
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        iv.shard_of("auto")
    with pytest.raises(ValueError, match="0 ≤ I < N"):
        iv.shard_of("2/2")


def test_arm_outcomes_draws_each_arms_rates_with_their_intervals():
    from probe import plots

    rows = _e2b_rows(np.random.default_rng(4))
    summary = iv.arm_summary(rows, n_boot=100)
    figure = plots.arm_outcomes(summary, title="overlap moved per window")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(summary.arm)  # the first arm on top
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(points) == 3  # one series per outcome
    np.testing.assert_allclose(np.asarray(points[0].get_xdata(), float), summary.all_present_rate.to_numpy(float))
    assert ax.get_title() == "overlap moved per window"


def test_the_index_carries_one_answer_paragraph_made_of_each_analysed_experiments_answer(tmp_path):
    from probe.studies.report import write_index

    assert iv.index_section(tmp_path) is None  # nothing analysed: no section
    pd.DataFrame(columns=["study", "seconds", "quick", "settings"]).to_csv(tmp_path / "timing.csv", index=False)
    (tmp_path / "intervention_e1_answer.md").write_text("Overlap lowered all present.\n")
    (tmp_path / "intervention_e3_answer.md").write_text("No gain from the overlap term.\n")
    (tmp_path / "intervention_dose_response.png").write_bytes(b"")
    text = write_index(tmp_path).read_text()
    assert f"## {iv.TITLE}" in text and "![intervention_dose_response](intervention_dose_response.png)" in text
    assert ("**Answer.** **E1, dose–response.** Overlap lowered all present. **E3, A&E term × overlap term.** No gain "
            "from the overlap term.") in text
    assert "intervention_registration_2.md" in text


def test_a_registration_of_the_users_own_prompts_and_judge_runs_on_their_model(tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle and a blue square | circle, square\na blue square and a red circle | square, "
                       "circle\na red circle, a blue square and a green triangle | circle, square, triangle\n")
    units = iv.prompt_units(str(prompts), 2)
    pair = ["a red circle and a blue square", "a blue square and a red circle"]
    assert list(units.prompt.unique()) == pair  # two subjects only
    assert units.set_id.nunique() == 1 and units.seed.is_unique and len(units) == 4  # swapped order: one cluster
    spec = {"experiments": {"mine": {"analysis": "timing", "prompts": str(prompts), "judge": "exact",
                                     "seeds_per_order": 1, "seed_offset": 0, "steps": 2,
                                     "arms": [{"name": "none", "dose": None},
                                              {"name": "early x0.9", "dose": 0.9, "relative": True,
                                               "window": [0.0, 0.5]}],
                                     "family": ["early x0.9 - none"], "alpha": 0.05}}}
    registered = tmp_path / "registration.md"
    registered.write_text("```json\n" + json.dumps(spec) + "\n```\n")
    out = tmp_path / "out"
    assert iv.main(["run", "mine", "--model", "tiny", "--registration", str(registered), "--out", str(out)]) == 0
    rows = pd.read_csv(out / "intervention_mine_images.csv")
    assert len(rows) == 2 * 2 and set(rows.prompt) == set(pair)
    iv.check_registered(rows, "mine", registered)
    with pytest.raises(ValueError, match="exactly two subjects"):
        only_three = tmp_path / "three.txt"
        only_three.write_text("a cat, a dog and a bird | cat, dog, bird\n")
        iv.prompt_units(str(only_three), 1)
