"""Statistics the studies share: intervals and tests that respect how the data were drawn, corrected for the number
of comparisons, with sizes set by power.

Images of one prompt are not independent (a prompt fixes much of what fails), so intervals resample prompts, not
images: the cluster bootstrap draws prompts with replacement and keeps all of each drawn prompt's images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def clustered_bootstrap(values: Sequence[float], clusters: Sequence, n_resamples: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile interval with whole clusters (prompts) resampled.

    For paired designs pass the per-pair differences: the mean is then the paired effect.
    """
    values = np.asarray(values, dtype=float)
    labels, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    if len(values) == 0:
        raise ValueError("no values to summarise")
    sums = np.bincount(index, weights=values, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(n_resamples, len(labels)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def cluster_sign_flip(differences: Sequence[float], clusters: Sequence, n_resamples: int = 10_000,
                      seed: int = 0) -> float:
    """Two-sided p-value that paired ``differences`` have mean zero, flipping the sign of whole clusters (prompts).

    Under the null each prompt's summed difference is as likely negative as positive, whatever the dependence
    between its images; exact enumeration up to 2¹⁶ clusters' sign patterns, random flips beyond.
    """
    values = np.asarray(differences, dtype=float)
    if len(values) == 0:
        return float("nan")
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=values)
    observed = abs(sums.sum())
    if observed == 0:
        return 1.0
    if len(sums) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(sums))[:, None] >> np.arange(len(sums))) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, len(sums)))
    totals = np.abs(signs @ sums)
    return float(((totals >= observed - 1e-12).sum() + (len(sums) > 16)) / (len(totals) + (len(sums) > 16)))


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes (binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    a, b = np.asarray(before, bool), np.asarray(after, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


P_FLOOR = 0.001  # below this a resampled p-value says only how many resamples were drawn


def format_p(p: float) -> str:
    """A p-value as an answer prints it: "< 0.001" below :data:`P_FLOOR` (a sign-flip p-value's floor is 1 over the
    number of flips, and Holm multiplies that floor, so "p = 0.0008" would state the resampling, not the data),
    else two significant digits; "n/a" where there is none."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"< {P_FLOOR:g}" if p < P_FLOOR else f"{p:.2g}"


def p_phrase(p: float, label: str = "p") -> str:
    """A p-value as a sentence says it: "p = 0.042", "p < 0.001" (:func:`format_p`), "p n/a"; ``label`` names
    it ("Holm p")."""
    shown = format_p(p)
    return f"{label} {shown}" if shown.startswith("<") or shown == "n/a" else f"{label} = {shown}"


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error); NaN p-values stay NaN and do not count."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    known = np.flatnonzero(~np.isnan(p))
    order = known[np.argsort(p[known], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def pairs_for_power(effect: float, discordant: float, alpha: float = 0.05, power: float = 0.8,
                    design_effect: float = 1.0) -> int:
    """Pairs a McNemar test needs to detect a paired rate difference ``effect`` when a share ``discordant`` of pairs
    differ (Connor 1987), inflated by ``design_effect`` (1 + (m − 1)·ICC for m images per prompt)."""
    from scipy.stats import norm

    if not 0 < abs(effect) <= discordant <= 1:
        raise ValueError(f"need 0 < |effect| ≤ discordant ≤ 1, got effect={effect}, discordant={discordant}")
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    n = (za * np.sqrt(discordant) + zb * np.sqrt(discordant - effect**2)) ** 2 / effect**2
    return int(np.ceil(n * design_effect))


def power_of_pairs(n_pairs: int, effect: float, discordant: float, alpha: float = 0.05,
                   design_effect: float = 1.0) -> float:
    """The power of a McNemar test on ``n_pairs`` pairs (the inverse of :func:`pairs_for_power`)."""
    from scipy.stats import norm

    n = n_pairs / design_effect
    za = norm.ppf(1 - alpha / 2)
    return float(norm.cdf((abs(effect) * np.sqrt(n) - za * np.sqrt(discordant)) / np.sqrt(discordant - effect**2)))


def detectable_effect(n_pairs: int, discordant: float, alpha: float = 0.05, power: float = 0.8,
                      design_effect: float = 1.0) -> float:
    """The smallest paired rate difference ``n_pairs`` pairs find with ``power`` (:func:`power_of_pairs` solved
    for the effect, which cannot exceed ``discordant``): what a null result at this size rules out."""
    from scipy.optimize import brentq

    if power_of_pairs(n_pairs, discordant, discordant, alpha, design_effect) < power:
        return discordant
    return float(brentq(lambda e: power_of_pairs(n_pairs, e, discordant, alpha, design_effect) - power,
                        1e-9, discordant))


def intraclass_correlation(values, groups) -> float:
    """One-way ANOVA ICC(1) of ``values`` grouped by ``groups`` (e.g. paired differences by prompt): how much more
    alike values within a group are than values across groups; NaN with fewer than two groups or one value each."""
    frame = pd.DataFrame({"v": np.asarray(values, dtype=float), "g": np.asarray(groups)})
    by = frame.groupby("g").v
    sizes, n = by.size(), len(frame)
    if len(sizes) < 2 or n <= len(sizes):
        return float("nan")
    k = (n - (sizes**2).sum() / n) / (len(sizes) - 1)  # the mean group size, corrected for unequal groups
    between = (sizes * (by.mean() - frame.v.mean()) ** 2).sum() / (len(sizes) - 1)
    within = ((frame.v - by.transform("mean")) ** 2).sum() / (n - len(sizes))
    total = between + (k - 1) * within
    return float((between - within) / total) if total > 0 else float("nan")
