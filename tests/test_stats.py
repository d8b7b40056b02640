"""The cluster bootstrap against hand-worked cases."""

import numpy as np

from probe.stats import clustered_bootstrap


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
    from probe.stats import holm

    # sorted 0.01, 0.02, 0.04 with 3 tests → 0.03, 0.04, 0.04 (monotone), NaN ignored
    adjusted = holm([0.04, 0.01, np.nan, 0.02])
    np.testing.assert_allclose(adjusted[[1, 3, 0]], [0.03, 0.04, 0.04])
    assert np.isnan(adjusted[2])


def test_mcnemar_is_the_binomial_test_of_discordant_pairs():
    from math import comb

    from probe.stats import mcnemar

    before = [True] * 7 + [False] * 1 + [True] * 5 + [False] * 5  # 7 only-before, 1 only-after, 10 concordant
    after = [False] * 7 + [True] * 1 + [True] * 5 + [False] * 5
    by_hand = 2 * sum(comb(8, k) for k in (0, 1)) / 2**8  # P(X ≤ 1 or X ≥ 7), X ~ Bin(8, ½)
    assert abs(mcnemar(before, after) - by_hand) < 1e-12
    assert mcnemar([True, False], [True, False]) == 1.0


def test_cluster_sign_flip_enumerates_prompts_not_images():
    from probe.stats import cluster_sign_flip

    # three prompts with summed differences 3, 1, 2 (|total| = 6): of the 8 sign patterns only ±(+,+,+) reach 6
    diffs, prompts = [1, 1, 1, 1, 1, 1], ["a", "a", "a", "b", "c", "c"]
    assert cluster_sign_flip(diffs, prompts) == 2 / 8
    # as six independent images the same data would look far stronger: 2 / 64
    assert cluster_sign_flip(diffs, range(6)) == 2 / 64
    assert cluster_sign_flip([1, -1], ["a", "a"]) == 1.0


def test_power_matches_connors_formula_and_inverts():
    from scipy.stats import norm

    from probe.stats import pairs_for_power, power_of_pairs

    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    by_hand = (za * 0.2**0.5 + zb * (0.2 - 0.05**2) ** 0.5) ** 2 / 0.05**2  # ≈ 617 pairs
    assert pairs_for_power(0.05, 0.2) == int(np.ceil(by_hand))
    assert pairs_for_power(0.05, 0.2, design_effect=1.5) == int(np.ceil(by_hand * 1.5))
    assert abs(power_of_pairs(int(np.ceil(by_hand)), 0.05, 0.2) - 0.8) < 0.002
