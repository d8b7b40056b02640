"""The cluster bootstrap against hand-worked cases."""

import numpy as np
import pytest

from probe.analysis.stats import clustered_bootstrap


def test_identical_clusters_give_a_point_interval():
    mean, low, high = clustered_bootstrap([1.0, 0.0, 1.0, 0.0], ["a", "a", "b", "b"])
    assert (mean, low, high) == (0.5, 0.5, 0.5)  # every resample of whole prompts has mean 0.5


def test_clustering_widens_the_interval_when_prompts_differ():
    values = np.repeat([0.0, 1.0, 0.0, 1.0, 1.0], 20)  # five prompts, each all 0 or all 1
    prompts = np.repeat(list("abcde"), 20)
    _, low, high = clustered_bootstrap(values, prompts, seed=1)
    _, ilow, ihigh = clustered_bootstrap(values, np.arange(len(values)), seed=1)  # images as independent
    assert high - low > 2 * (ihigh - ilow)
    assert low <= 0.6 <= high


def test_holm_by_hand():
    from probe.analysis.stats import holm

    # sorted 0.01, 0.02, 0.04 with 3 tests → 0.03, 0.04, 0.04 (monotone), NaN ignored
    adjusted = holm([0.04, 0.01, np.nan, 0.02])
    np.testing.assert_allclose(adjusted[[1, 3, 0]], [0.03, 0.04, 0.04])
    assert np.isnan(adjusted[2])


def test_mcnemar_is_the_binomial_test_of_discordant_pairs():
    from math import comb

    from probe.analysis.stats import mcnemar

    before = [True] * 7 + [False] * 1 + [True] * 5 + [False] * 5  # 7 only-before, 1 only-after, 10 concordant
    after = [False] * 7 + [True] * 1 + [True] * 5 + [False] * 5
    by_hand = 2 * sum(comb(8, k) for k in (0, 1)) / 2**8  # P(X ≤ 1 or X ≥ 7), X ~ Bin(8, ½)
    assert abs(mcnemar(before, after) - by_hand) < 1e-12
    assert mcnemar([True, False], [True, False]) == 1.0


def test_cluster_sign_flip_enumerates_prompts_not_images():
    from probe.analysis.stats import cluster_sign_flip

    # three prompts with summed differences 3, 1, 2 (|total| = 6): of the 8 sign patterns only ±(+,+,+) reach 6
    diffs, prompts = [1, 1, 1, 1, 1, 1], ["a", "a", "a", "b", "c", "c"]
    assert cluster_sign_flip(diffs, prompts) == 2 / 8
    # as six independent images the same data would look far stronger: 2 / 64
    assert cluster_sign_flip(diffs, range(6)) == 2 / 64
    assert cluster_sign_flip([1, -1], ["a", "a"]) == 1.0


def test_power_matches_connors_formula_and_inverts():
    from scipy.stats import norm

    from probe.analysis.stats import pairs_for_power, power_of_pairs

    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    by_hand = (za * 0.2**0.5 + zb * (0.2 - 0.05**2) ** 0.5) ** 2 / 0.05**2  # ≈ 617 pairs
    assert pairs_for_power(0.05, 0.2) == int(np.ceil(by_hand))
    assert pairs_for_power(0.05, 0.2, design_effect=1.5) == int(np.ceil(by_hand * 1.5))
    assert abs(power_of_pairs(int(np.ceil(by_hand)), 0.05, 0.2) - 0.8) < 0.002


def test_detectable_effect_inverts_the_power_and_the_size():
    from probe.analysis.stats import detectable_effect, pairs_for_power, power_of_pairs

    effect = detectable_effect(600, 0.24, alpha=0.05 / 7, design_effect=1.1)
    assert power_of_pairs(600, effect, 0.24, 0.05 / 7, 1.1) == pytest.approx(0.8, abs=1e-6)
    assert pairs_for_power(effect, 0.24, 0.05 / 7, design_effect=1.1) == pytest.approx(600, abs=1)
    assert detectable_effect(3, 0.2) == 0.2  # too few pairs: nothing below the discordant share is found


def test_intraclass_correlation_against_a_hand_worked_anova():
    from probe.analysis.stats import intraclass_correlation

    values, groups = [1, 2, 3, 5, 6, 7, 2, 2, 5], list("aaabbbccc")
    # means 2, 6, 3; grand 11/3; MSB = 3·((2−11/3)² + (6−11/3)² + (3−11/3)²)/2 = 13; MSW = (2 + 2 + 6)/6 = 5/3
    msb, msw = 13.0, 5 / 3
    assert intraclass_correlation(values, groups) == pytest.approx((msb - msw) / (msb + 2 * msw))
    assert np.isnan(intraclass_correlation([1, 2], ["a", "b"]))  # one value per group: no within-group spread


def test_design_from_pilot_measures_discordance_and_correlation():
    import pandas as pd

    from probe.studies.guidance import Design

    rows = []
    for i in range(8):
        for seed in (0, 1):
            for method, missing in (("ae", False), ("iou", i < 2), ("kl", i < 4 and seed == 0), ("none", True)):
                rows.append({"method": method, "initno": False, "prompt": f"p{i}", "seed": seed, "missing": missing})
    design = Design.from_pilot(pd.DataFrame(rows), effect=0.1)
    assert design.discordant == pytest.approx((4 / 16 + 4 / 16) / 2)  # none is not an overlap method
    # iou's differences are whole prompts' (ICC 1); kl's split each of four prompts: MSB 1/7, MSW 1/4, ICC −3/11
    assert design.effect == 0.1 and design.icc == pytest.approx((1 - 3 / 11) / 2)
    with pytest.raises(ValueError, match="needs 'ae'"):
        Design.from_pilot(pd.DataFrame(rows).query("method != 'ae'"))


def test_format_p_prints_a_floor_not_the_resampling_limit():
    from probe.analysis.stats import cluster_sign_flip, format_p, holm

    # 40 prompts all pushing one way: the real p is about 2·2⁻⁴⁰; 10,000 flips can only say ~1e-4, Holm × 8 says 8e-4
    flips = cluster_sign_flip(np.ones(40), np.arange(40))
    adjusted = holm([flips] + [0.5] * 7)[0]
    assert 0 < adjusted < 0.001
    assert format_p(adjusted) == "< 0.001"
    assert format_p(0.0123) == "0.012" and format_p(1.0) == "1" and format_p(float("nan")) == "n/a"


def test_a_plus_joined_objective_is_the_equal_weight_sum():
    import torch

    from probe.steer.objectives import OBJECTIVES, GuidanceMaps, as_objective, is_objective_name

    maps = torch.rand(2, 2, 8, 8)
    seen = GuidanceMaps(subjects=maps, cross=torch.rand(2, 8, 8, 5), self_attention=None, schedule=None)
    both = as_objective("ae+iou")(seen)
    assert torch.allclose(both, OBJECTIVES["ae"](seen) + OBJECTIVES["iou"](seen))
    assert is_objective_name("ae+iou") and is_objective_name("ae") and not is_objective_name("ae+nope")
