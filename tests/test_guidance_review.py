"""The audit of the guidance and Self-Cross studies, each flaw a test checked against an independent computation:
competing outcomes (one exclusive outcome per image, all present primary), answers that say every tested row's
verdict, clusters by object set, exact p-values where pairs are binary, and sizes fixed by a registration."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from probe.analysis.stats import cluster_sign_flip, clustered_bootstrap, holm, mcnemar
from probe.studies.answers import OUTCOME_WORDS, method_label
from probe.studies.guidance import (
    HARM_SIGN,
    LEFT_OUT_AE,
    LEFT_OUT_CHECK,
    POOLED,
    guidance_answer,
    guidance_headline,
    guidance_tables,
    registered_size_problem,
    size_history_text,
)
from probe.studies.self_cross import self_cross_answer, self_cross_headline, self_cross_summary

FIGURES = Path(__file__).resolve().parents[1] / "figures"
N_BOOT = 200


def _category(missing: pd.Series, mixed: pd.Series) -> pd.Series:
    """By hand: any missing, else any mixed, else all present."""
    return pd.Series(np.where(missing, "missing", np.where(mixed, "mixed", "all_present")), index=missing.index)


def _planted(n_prompts: int = 12, seeds: int = 2, seed: int = 0) -> pd.DataFrame:
    """Three-object prompts whose images can be missing and mixed at once; "kl" lowers missing only by mixing."""
    rng = np.random.default_rng(seed)
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"]
    rows = []
    for i in range(n_prompts):
        prompt = " and ".join(f"a {colours[(i + k) % 4]} {shapes[k]}" for k in range(3))
        for s in range(seeds):
            base_missing, base_mixed = rng.random() < 0.5, rng.random() < 0.3
            for method in ("none", "ae", "iou", "kl"):
                missing = base_missing and method == "none" or (method == "iou" and rng.random() < 0.3)
                mixed = base_mixed or (method == "kl" and base_missing)  # kl: the lost subject comes back mixed
                rows.append({"method": method, "initno": False, "set": "shapes-3", "prompt": prompt, "seed": 10 * i + s,
                             "missing": bool(missing), "n_missing": int(missing), "mixed": bool(mixed),
                             "all_present": not (missing or mixed), "soft_iou_t10": 0.3 - 0.05 * (method != "none"),
                             "soft_iou_end": 0.2, "loss_start": np.nan if method == "none" else 1.0,
                             "loss_end": np.nan if method == "none" else 0.5, "quality": 0.9, "precision": 1.0,
                             "seconds": 1.0, "step_size": np.nan if method == "none" else 1.0})
    table = pd.DataFrame(rows)
    for metric in ("com_distance", "kl_sym", "compactness", "self_cross", "intensity_mean"):
        table[f"{metric}_t10"] = table[f"{metric}_end"] = 0.5
    return table


# -- 1. competing outcomes ----------------------------------------------------------------------------------------


def test_every_table_has_three_exclusive_outcomes_with_all_present_primary():
    images = _planted()
    summary, _ = guidance_tables(images, N_BOOT)
    category = _category(images.missing, images.mixed)
    rates = pd.crosstab(images.method, category, normalize="index")
    table = summary.set_index("method")
    for outcome in ("all_present", "missing", "mixed"):
        for method in ("none", "ae", "iou", "kl"):
            assert table.loc[method, f"{outcome}_rate"] == pytest.approx(rates.loc[method].get(outcome, 0.0))
    total = table.loc[["none", "ae", "iou", "kl"], ["all_present_rate", "missing_rate", "mixed_rate"]].sum(axis=1)
    np.testing.assert_allclose(total, 1.0)  # exclusive: a method cannot lower missing without it showing elsewhere
    wide = images.assign(ap=category == "all_present").pivot_table(index=["prompt", "seed"], columns="method",
                                                                    values="ap", aggfunc="mean")
    for method, reference in (("kl", "ae"), ("kl", "none"), ("ae", "none")):
        column = f"all_present_vs_{reference}"
        assert table.loc[method, column] == pytest.approx((wide[method] - wide[reference]).mean())
    headline = guidance_headline(summary)
    assert {"all_present_vs_ae", "missing_vs_ae", "mixed_vs_ae", "all_present_vs_none", "missing_vs_none",
            "mixed_vs_none"} <= set(headline.columns)
    assert headline.all_present_rate.is_monotonic_decreasing  # most images with every subject present first


def test_self_cross_tables_have_the_three_outcomes_against_a_and_e_and_none():
    images = _planted().replace({"method": {"iou": "self_cross"}})
    images = images[images.method != "kl"]
    summary = self_cross_summary(images, N_BOOT).set_index("method")
    category = _category(images.missing, images.mixed)
    wide = images.assign(mx=category == "mixed").pivot_table(index=["prompt", "seed"], columns="method",
                                                              values="mx", aggfunc="mean")
    assert summary.loc["self_cross", "mixed_vs_none"] == pytest.approx((wide.self_cross - wide.none).mean())
    assert summary.loc["self_cross", "mixed_vs_ae"] == pytest.approx((wide.self_cross - wide.ae).mean())
    assert "all_present_vs_ae_p_holm" in summary


# -- 3. clusters by object set ------------------------------------------------------------------------------------


def test_a_prompt_and_its_swapped_word_order_are_one_cluster():
    from probe.studies.guidance import object_set

    assert object_set("a red circle and a blue square") == object_set("a blue square and a red circle")
    assert object_set("a red circle and a blue square") != object_set("a blue circle and a red square")
    rows = []
    rng = np.random.default_rng(1)
    for i in range(10):
        a, b = ("red circle", "blue square") if i < 5 else ("green triangle", "yellow ellipse")
        for prompt in (f"a {a} and a {b}", f"a {b} and a {a}"):
            for seed in range(3):
                worse = rng.random() < 0.6
                for method in ("none", "ae", "iou"):
                    missing = bool(method == "iou" and worse)
                    rows.append({"method": method, "initno": False, "prompt": prompt,
                                 "seed": 10 * i + seed, "missing": missing, "mixed": False,
                                 "soft_iou_t10": 0.2})
    images = pd.DataFrame(rows)
    _, comparisons = guidance_tables(images.assign(soft_iou_end=0.1), N_BOOT)
    row = comparisons[(comparisons.method == "iou") & (comparisons.reference == "ae")
                      & (comparisons.outcome == "missing")].iloc[0]
    assert row.n_prompts == 4 and row.n_sets == 2  # four prompt strings, two object sets
    wide = images.pivot_table(index=["prompt", "seed"], columns="method", values="missing", aggfunc="mean")
    diffs = (wide.iou - wide.ae).astype(float)
    sets = [" & ".join(sorted(p.replace("a ", "", 1).split(" and a "))) for p in wide.index.get_level_values(0)]
    mean, low, high = clustered_bootstrap(diffs.to_numpy(), sets, N_BOOT, 0.95, 0)
    assert [row.difference, row.ci_low, row.ci_high] == pytest.approx([mean, low, high])
    assert row.p_sign_flip == pytest.approx(cluster_sign_flip(diffs.to_numpy(), sets))


# -- 4. p-values --------------------------------------------------------------------------------------------------


def test_binary_rows_use_mcnemar_and_holm_runs_over_each_outcomes_family():
    images = _planted(n_prompts=20)
    _, comparisons = guidance_tables(images, N_BOOT)
    category = _category(images.missing, images.mixed)
    wide = images.assign(c=category).pivot_table(index=["prompt", "seed"], columns="method", values="c",
                                                 aggfunc="first")
    for (method, reference, outcome), row in comparisons.set_index(["method", "reference", "outcome"]).iterrows():
        if method == POOLED:  # a share of two methods per pair, not 0/1: sign flips of whole object sets
            assert row.test == "sign flip over object sets" and row.p_value == row.p_sign_flip
            continue
        assert row.test == "McNemar exact"
        assert row.p_value == pytest.approx(mcnemar(wide[reference] == outcome, wide[method] == outcome))
    for _, family in comparisons.groupby(["initno", "outcome"]):
        np.testing.assert_allclose(family.p_holm.to_numpy(), holm(family.p_value.to_numpy()))
    # each method against A&E and against none, A&E against none once (none against A&E is the same comparison)
    assert set(zip(comparisons.method, comparisons.reference)) == {("iou", "ae"), ("kl", "ae"), ("ae", "none"),
                                                                   ("iou", "none"), ("kl", "none"),
                                                                   (POOLED, "ae"), (POOLED, "none")}


# -- the committed tables -----------------------------------------------------------------------------------------


@cache
def _committed(study: str) -> pd.DataFrame:
    images = pd.read_csv(FIGURES / f"{study}_images.csv", dtype={"settings_id": str})
    if study == "guidance":
        return guidance_headline(guidance_tables(images, N_BOOT)[0])
    return self_cross_headline(self_cross_summary(images, N_BOOT))


def _registration(tmp_path: Path, **changes) -> Path:
    spec = {"study": "guidance", "n_images": 540, "seeds_per_prompt": 3, "sets": ["shapes-2", "shapes-3"],
            "methods": ["none", "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i"], "initno": [False],
            "steps": 50, "power": {"effect": 0.12, "discordant": 0.4, "icc": 0.05, "power": 0.8, "alpha": 0.05}}
    spec.update(changes)
    path = tmp_path / "guidance_registration.md"
    path.write_text(f"# test registration\n\n```json\n{json.dumps(spec)}\n```\n")
    return path


def _by_hand(outcome: str, method: str, reference: str) -> float:
    images = pd.read_csv(FIGURES / "guidance_images.csv")
    category = _category(images.missing, images.mixed)
    wide = images.assign(c=category == outcome).pivot_table(index=["prompt", "seed"], columns="method", values="c",
                                                             aggfunc="mean")
    return 100 * float((wide[method] - wide[reference]).mean())


def _registered_for(headline: pd.DataFrame, tmp_path: Path, **changes) -> Path:
    """A registration of the committed table's own size (what makes an answer readable)."""
    pairs = int(headline[headline.method != POOLED].n.max())
    return _registration(tmp_path, **{"n_images": pairs, **changes})


def test_the_guidance_answer_states_every_harm_of_the_committed_tables(tmp_path):
    headline = _committed("guidance")
    answer = guidance_answer(headline, registration=_registered_for(headline, tmp_path))
    harms = answer.split("Harms at Holm α = 0.05: ")[1] if "Harms at Holm" in answer else ""
    images = pd.read_csv(FIGURES / "guidance_images.csv")
    _, comparisons = guidance_tables(images, N_BOOT)
    named = 0
    for _, row in comparisons[comparisons.method != POOLED].iterrows():  # each verdict from a difference by hand
        diff = _by_hand(row.outcome, row.method, row.reference)
        harm = row.p_holm < 0.05 and diff * HARM_SIGN[row.outcome] > 0
        text = (f"{method_label(row.method)} {OUTCOME_WORDS[row.outcome]} {diff:+.1f} points vs "
                f"{method_label(row.reference)}")
        assert (text in harms) == harm, text
        named += harm
    assert ("No comparison shows a harm" in answer) == (named == 0) and "0.0008" not in answer
    iou = images.pivot_table(index=["prompt", "seed"], columns="method", values="soft_iou_t10")
    single = headline[~headline.method.isin(["none", "ae", POOLED])]
    overlap = answer.split("Soft IoU at step 10 against A&E's own: ")[1].split(". ")[0]
    groups = dict(part.split(" for ", 1) for part in overlap.split("; "))
    for _, row in single.iterrows():  # each method's mean by hand, in the group its interval puts it
        group = ("lower" if row.iou_t10_vs_ae_ci_high < 0 else "higher" if row.iou_t10_vs_ae_ci_low > 0
                 else "not clearly different")
        assert f"{method_label(row.method)} {(iou[row.method] - iou.ae).mean():+.3f} [" in groups[group]
    for reason, words in ((LEFT_OUT_AE, "A&E's own term"), (LEFT_OUT_CHECK, "failed the pre-declared")):
        assert (words in answer) == (headline["pool"] == reason).any()
    assert answer.count("vs A&E:") >= len(single) and answer.count("vs no guidance:") >= len(single)


def test_the_self_cross_answer_names_both_sides():
    answer = self_cross_answer(_committed("self_cross"))
    assert "Self-Cross vs no guidance: all present" in answer and "Self-Cross vs A&E: all present" in answer
    assert "missing" in answer and "mixing" in answer and "0.0008" not in answer


# -- 5. sizes fixed before the run --------------------------------------------------------------------------------


def test_no_answer_without_a_registration_of_the_tables_size(tmp_path):
    headline = _committed("guidance")
    missing = guidance_answer(headline, registration=tmp_path / "nothing_registered.md")
    assert missing.startswith("Not answered") and "vs A&E" not in missing
    size = int(headline[headline.method != POOLED].n.max())
    other = guidance_answer(headline, registration=_registration(tmp_path, n_images=size + 60))
    assert other.startswith("Not answered") and str(size) in other and str(size + 60) in other
    assert guidance_answer(headline, registration=_registered_for(headline, tmp_path)).startswith("Positive control")


def test_a_registration_whose_size_its_power_calculation_does_not_reach_is_refused(tmp_path):
    from probe.studies.guidance import Design, family_size, read_registration, registered_settings

    weak = {"effect": 0.05, "discordant": 0.22, "icc": 0.02, "power": 0.8, "alpha": 0.05}
    needed = Design(**weak).images(family_size([(m, False) for m in
                                                ("none", "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i")]), 3)
    assert needed > 540
    with pytest.raises(ValueError, match="power calculation"):
        read_registration(_registration(tmp_path, power=weak))
    with pytest.raises(ValueError, match="whole number of prompts"):
        read_registration(_registration(tmp_path, n_images=541))
    settings = registered_settings(_registration(tmp_path), {"n_images": None, "steps": 50})
    assert settings["n_images"] == 540 and settings["seeds_per_prompt"] == 3 and settings["initno"] == (False,)
    with pytest.raises(ValueError, match="conflicts with the registration"):
        registered_settings(_registration(tmp_path), {"n_images": 360})
    assert registered_settings(_registration(tmp_path, seed_offset=1000), {})["seed_offset"] == 1000
    from probe.studies.guidance import guidance_study

    with pytest.raises(ValueError, match="conflicts with the registration"):  # refused before any model loads
        guidance_study("no such model", n_images=360, registration=_registration(tmp_path))


def test_the_report_writes_the_size_history_and_each_studys_holm_family(tmp_path):
    from probe.studies.report import write_index

    for study in ("guidance", "self_cross"):
        _committed(study).to_csv(tmp_path / f"headline_{study}.csv", index=False)
    pd.DataFrame([{"study": s, "seconds": 60.0, "quick": False, "settings": "{}", "model": "shapes",
                   "model_path": "shapes"} for s in ("guidance", "self_cross")]).to_csv(tmp_path / "timing.csv",
                                                                                         index=False)
    text = write_index(tmp_path).read_text()
    guidance = text.split("## Guidance")[1].split("## Self-Cross")[0]
    assert "120 → 360 → 540" in guidance and "Holm famil" in guidance
    assert "probe study guidance --registered" in guidance
    registered = registered_size_problem(_committed("guidance")) is None  # the table is of the registered size
    assert ("**Size.** Fixed before the run" in guidance) == registered
    assert ("**Size.** This table is not of the size the registration fixed" in guidance) == (not registered)
    other = size_history_text(_committed("guidance").assign(n=540))  # a table of another size than registered
    assert other.startswith("**Size.** This table is not of the size") and "120 → 360 → 540" in other
    assert "Fixed before the run" not in other
    assert "Holm famil" in text.split("## Self-Cross")[1]
