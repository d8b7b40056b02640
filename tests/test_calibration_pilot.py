"""The step-size calibration's pilot: sized by one power rule for every method, and its chosen step reported with a
95 % interval over object sets (the issue: overlap objectives' steps were chosen on 8 images, A&E's on 60)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import probe.studies.guided as guided
from probe.analysis.stats import clustered_bootstrap
from probe.steer.guide import Schedule
from probe.studies.common import BOOTSTRAPS
from probe.studies.guidance import object_set
from probe.studies.guided import (
    CALIBRATION_PROMPTS,
    MIN_EFFECTS,
    calibrate_steps,
    detectable_change,
    guided_images,
    pilot_object_set,
    pilot_size,
    pooled_sd,
    study_prompts,
    study_steps,
)

SETS = ("shapes-2", "shapes-3")
NEW_COLUMNS = ["criterion_mean", "criterion_ci_low", "criterion_ci_high", "clear"]


def _judge(image, prompt):
    """A stand-in judge for the random tiny model: a subject is present where its half of the image is bright."""
    halves = np.asarray(image)[:, : image.shape[1] // 2], np.asarray(image)[:, image.shape[1] // 2 :]
    return [SimpleNamespace(status="present" if half.mean() > 120 else "missing", detection=None) for half in halves]


@pytest.mark.parametrize(("sd", "effect", "power", "alpha"), [
    (0.04, 0.005, 0.8, 0.05),  # soft IoU at step 10: an SD like the study's paired differences
    (math.sqrt(0.19 - 0.05**2), 0.05, 0.8, 0.05),  # missing: 19 % discordant pairs
    (0.02, 0.01, 0.9, 0.01),
])
def test_pilot_size_is_the_normal_approximation_rounded_up(sd, effect, power, alpha):
    by_hand = ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / effect) ** 2
    assert pilot_size(sd, effect, power, alpha) == math.ceil(by_hand)
    n = pilot_size(sd, effect, power, alpha)
    assert detectable_change(n, sd, power, alpha) <= effect < detectable_change(n - 1, sd, power, alpha)


def test_pilot_size_at_the_defaults_and_its_bounds():
    assert pilot_size(0.04, 0.005) == math.ceil(((norm.ppf(0.975) + norm.ppf(0.8)) * 8) ** 2) == 503
    assert pilot_size(0.0, 0.005) == 2  # an interval needs a spread
    assert pilot_size(0.08, 0.005) > pilot_size(0.04, 0.005) > pilot_size(0.04, 0.01)
    with pytest.raises(ValueError, match="effect > 0"):
        pilot_size(0.04, 0.0)


def test_a_prompt_and_its_swapped_order_are_one_object_set():
    item = {"prompt": "a blue square and a red circle", "nouns": ["square", "circle"], "colours": ["blue", "red"]}
    swapped = {"prompt": "a red circle and a blue square", "nouns": ["circle", "square"], "colours": ["red", "blue"]}
    assert pilot_object_set(item) == pilot_object_set(swapped) == object_set(item["prompt"])


def test_calibration_reports_each_criterion_with_its_interval(tiny):
    """The new columns on the tiny model: the criterion's mean is the mean paired difference of separately made
    images, its interval the object-set bootstrap of those differences, and the chosen step the lowest mean."""
    pilot = study_prompts(SETS, 4, 1)
    options = {"steps": 2, "schedule": Schedule(max_refinement=2), "judge": _judge}
    table = calibrate_steps(tiny, ["none", "ae", "iou"], pilot, [0], candidates=(20.0, 0.2), progress=False,
                            **options)
    assert [c for c in NEW_COLUMNS if c in table] == NEW_COLUMNS
    assert {"missing_vs_none", "iou_t10_vs_none", "iou_end_vs_none", "loss_fell", "chosen", "n"} <= set(table)
    plain = guided_images(tiny, pilot, [0], [("none", False)], progress=False, **options).set_index("prompt")
    clusters = [pilot_object_set(item) for item in pilot]
    for row in table.itertuples():
        made = guided_images(tiny, pilot, [0], [(row.method, False)], progress=False,
                             step_sizes={row.method: row.scale_factor}, **options).set_index("prompt")
        if row.criterion == "missing_vs_none":
            differences = made.missing.astype(float) - plain.missing.astype(float)
        else:
            differences = made.soft_iou_t10 - plain.soft_iou_t10
        differences = differences.loc[[item["prompt"] for item in pilot]]
        assert row.n == len(pilot)
        assert row.criterion_mean == pytest.approx(differences.mean(), abs=1e-9)
        assert row.criterion_mean == pytest.approx(getattr(row, row.criterion), abs=1e-9)
        mean, low, high = clustered_bootstrap(differences.to_numpy(), clusters, BOOTSTRAPS)
        assert (row.criterion_ci_low, row.criterion_ci_high) == pytest.approx((low, high), abs=1e-9)
        assert row.criterion_ci_low <= row.criterion_mean <= row.criterion_ci_high
        assert row.clear == (row.criterion_ci_high < 0)
    for _, rows in table.groupby("method"):
        chosen = rows[rows.chosen]
        assert len(chosen) == 1
        assert chosen.criterion_mean.iloc[0] == rows.criterion_mean.min()


def _fake_differences(spread: dict[str, float], made: list):
    """A stand-in for :func:`guided.pilot_differences`: per-image rows whose criterion alternates ±spread around a
    candidate's own mean, so that the pooled SD is known without a model; records the prompts it was given."""

    def fake(pipe, methods, prompts, seeds, *, steps, candidates, progress=True, **options):
        made.append([item["prompt"] for item in prompts])
        rows = []
        for scale in candidates:
            for method in methods:
                criterion = guided.criterion_of(method)
                for i, item in enumerate(prompts):
                    value = -0.01 * scale + (spread[criterion] if i % 2 else -spread[criterion])
                    rows.append({"method": method, "scale_factor": float(scale), "prompt": item["prompt"],
                                 "seed": seeds[0], "object_set": pilot_object_set(item), "missing_vs_none": value,
                                 "iou_t10_vs_none": value, "iou_end_vs_none": value, "loss_fell": 1.0,
                                 "missing": 0.0, "mixed": 0.0, "criterion": criterion, "difference": value})
        return pd.DataFrame(rows)

    return fake


def test_study_steps_size_the_pilot_by_the_power_rule_for_every_method(monkeypatch):
    """A first pilot of CALIBRATION_PROMPTS per set measures each criterion's SD; the pilot is then widened (its
    first images kept, not made again) to pilot_size(SD, smallest effect), A&E and the overlap objectives alike."""
    made: list = []
    spread = {"missing_vs_none": 0.3, "iou_t10_vs_none": 0.02}
    monkeypatch.setattr(guided, "pilot_differences", _fake_differences(spread, made))
    study = study_prompts(SETS, 2, 1)
    chosen, table = study_steps(None, ["none", "ae", "iou", "kl"], SETS, study, [7, 8], steps=2, step_sizes=None,
                                quick=False, progress=False)
    assert len(made) == 4  # a first pilot and its widening, per group
    first, wider = CALIBRATION_PROMPTS * len(SETS), study_prompts(SETS, 400, 1)
    for group, criterion in ((("ae",), "missing_vs_none"), (("iou", "kl"), "iou_t10_vs_none")):
        rows = table[table.method.isin(group)]
        sd = rows.pilot_sd.iloc[0]
        first_rows = pd.DataFrame({"method": "m", "scale_factor": 1.0, "difference": [-spread[criterion],
                                                                                    spread[criterion]] * (first // 2)})
        assert sd == pytest.approx(pooled_sd(first_rows))
        planned = pilot_size(sd, MIN_EFFECTS[criterion])
        assert (rows.pilot_planned == planned).all()
        per_set = math.ceil(planned / len(SETS))
        assert (rows.n == per_set * len(SETS)).all() and planned <= per_set * len(SETS)
    assert not set(made[1]) & set(made[0]) and not {p["prompt"] for p in study} & set(made[0] + made[1])
    assert made[0] + made[1] == [p["prompt"] for p in wider if p not in study][: len(made[0]) + len(made[1])]
    assert chosen == {"ae": 20.0, "iou": 20.0, "kl": 20.0}  # the fake lowers the criterion most at the largest step


def test_a_pilot_the_sets_cannot_fill_says_what_it_can_find(monkeypatch, tmp_path):
    prompts = tmp_path / "few.txt"
    prompts.write_text("\n".join(f"a {c} square and a {d} circle" for c, d in
                                 [("red", "blue"), ("blue", "red"), ("green", "red"), ("red", "green"),
                                  ("blue", "green"), ("green", "blue")]) + "\n")
    made: list = []
    monkeypatch.setattr(guided, "pilot_differences", _fake_differences({"iou_t10_vs_none": 0.02}, made))
    study = study_prompts([str(prompts)], 2, 1)
    with pytest.warns(UserWarning, match=r"power rule asks for \d+ pilot prompts .* hold 4 beyond the study's"):
        chosen, table = study_steps(None, ["iou"], [str(prompts)], study, [0], steps=2, step_sizes=None,
                                    quick=False, progress=False)
    assert (table.n == 4).all() and list(chosen) == ["iou"]


def test_a_registration_s_smallest_effects_size_the_pilot(monkeypatch):
    """min_effects (a registration's) replaces MIN_EFFECTS for the criteria it names; an unknown criterion is an
    error before anything is made."""
    made: list = []
    spread = {"missing_vs_none": 0.3, "iou_t10_vs_none": 0.02}
    monkeypatch.setattr(guided, "pilot_differences", _fake_differences(spread, made))
    study = study_prompts(SETS, 2, 1)
    _, table = study_steps(None, ["none", "ae", "iou"], SETS, study, [7], steps=2, step_sizes=None, quick=False,
                           progress=False, min_effects={"iou_t10_vs_none": 0.01})
    iou, ae = table[table.method == "iou"], table[table.method == "ae"]
    assert (iou.pilot_planned == pilot_size(iou.pilot_sd.iloc[0], 0.01)).all()
    assert (ae.pilot_planned == pilot_size(ae.pilot_sd.iloc[0], MIN_EFFECTS["missing_vs_none"])).all()
    made.clear()
    with pytest.raises(ValueError, match=r"min_effects names criteria \['missing'\]"):
        study_steps(None, ["ae"], SETS, study, [7], steps=2, step_sizes=None, quick=False, progress=False,
                    min_effects={"missing": 0.1})
    assert made == []
