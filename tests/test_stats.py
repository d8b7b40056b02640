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
