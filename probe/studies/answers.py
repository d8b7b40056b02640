"""The wording the studies' answers share. Each study's answer is one sentence read from its headline table (its
:class:`~probe.studies.registry.Study`'s ``answer``), so that it never disagrees with the numbers and is written
whatever the numbers say (a null result, a failed manipulation check, a control not met). The answers live with
their studies; this module imports no study, so every study can use it.
"""

from __future__ import annotations

import math

import pandas as pd


def signed_text(value: float, digits: int = 3) -> str:
    """An estimate, signed, where −0.0 prints as +0.0 (an interval's bounds keep their sign: −0.000 says the bound
    is below zero, which is what the verdict reads)."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def points_text(value: float) -> str:
    return f"{signed_text(100 * value, 1)} points"


def interval_text(low: float, high: float) -> str:
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def p_text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f", Holm p = {value:.3g}"


def row_where(table: pd.DataFrame, **match) -> pd.Series | None:
    rows = table
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return rows.iloc[0] if len(rows) else None


def acted(row: pd.Series) -> bool:
    """The manipulation check of an overlap-lowering guidance: its objective fell in at least half of the images and
    soft IoU at step 10 ended below unguided generation's (unknown counts as acted)."""
    fell, moved = row.get("loss_fell", float("nan")), row.get("iou_t10_vs_none", float("nan"))
    return bool((math.isnan(fell) or fell >= 0.5) and (math.isnan(moved) or moved < 0))


def direction_of(verdict: str) -> str:
    """A study's Holm-corrected verdict ("less missing than ae", "no clear difference from ae") as a verb."""
    return "lowered" if verdict.startswith("less") else "raised" if verdict.startswith("more") else \
        "did not clearly change"


def overlap_answer(headline: pd.DataFrame) -> str:
    """Per outcome, the statistic whose last-step AUC is furthest from 0.5 with an interval that excludes 0.5."""
    parts = []
    for outcome, rows in headline.groupby("outcome", sort=False):
        rows = rows.dropna(subset=["auc_last"])
        rows = rows[(rows.ci_low_last > 0.5) | (rows.ci_high_last < 0.5)]
        cases = int(headline[headline.outcome == outcome].n_cases.max())
        if rows.empty:
            parts.append(f"no statistic separates {outcome} images ({cases} cases)")
            continue
        best = rows.loc[(rows.auc_last - 0.5).abs().idxmax()]
        parts.append(f"{best.metric} separates {outcome} images best (AUC {best.auc_last:.2f} "
                     f"[{best.ci_low_last:.2f}, {best.ci_high_last:.2f}] at the last step, {cases} cases)")
    return ("At the last step " + "; ".join(parts) + ".") if parts else "No outcome was measured."
