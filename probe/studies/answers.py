"""Each study's answer in one sentence, read from its headline table, so that it never disagrees with the numbers
and is written whatever the numbers say (a null result, a failed manipulation check, a control not met)."""

from __future__ import annotations

import math

import pandas as pd

from probe.studies.guidance import POOLED
from probe.studies.guided import BASELINE

LAYOUT_TARGETS = ("position", "extent", "size", "judge_shape")  # where and shape: what FPE says self-attention holds


def _signed(value: float, digits: int = 3) -> str:
    """An estimate, signed, where −0.0 prints as +0.0 (an interval's bounds keep their sign: −0.000 says the bound
    is below zero, which is what the verdict reads)."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def _points(value: float) -> str:
    return f"{_signed(100 * value, 1)} points"


def _interval(low: float, high: float) -> str:
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def _clear(low: float, high: float) -> bool:
    return low > 0 or high < 0


def _p(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f", Holm p = {value:.3g}"


def _row(table: pd.DataFrame, **match) -> pd.Series | None:
    rows = table
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return rows.iloc[0] if len(rows) else None


def _without_initno(headline: pd.DataFrame) -> pd.DataFrame:
    """The rows without INITNO where there are any (the comparisons a reader meets first)."""
    if "initno" not in headline:
        return headline
    plain = headline[~headline.initno.astype(str).str.lower().eq("true")]
    return plain if len(plain) else headline


def _acted(row: pd.Series) -> bool:
    """The manipulation check of an overlap-lowering guidance: its objective fell in at least half of the images and
    soft IoU at step 10 ended below unguided generation's (unknown counts as acted)."""
    fell, moved = row.get("loss_fell", float("nan")), row.get("iou_t10_vs_none", float("nan"))
    return bool((math.isnan(fell) or fell >= 0.5) and (math.isnan(moved) or moved < 0))


def _direction(verdict: str) -> str:
    """A study's Holm-corrected verdict ("less missing than ae", "no clear difference from ae") as a verb."""
    return "lowered" if verdict.startswith("less") else "raised" if verdict.startswith("more") else \
        "did not clearly change"


def _beyond_baseline(row: pd.Series) -> bool:
    """Did the methods lower overlap at step 10 below the baseline's own images (the interval's upper end, else the
    estimate; unknown counts as yes)? Without that, a comparison with A&E does not isolate overlap: A&E lowers
    overlap too."""
    high = row.get("iou_t10_diff_ci_high", float("nan"))
    high = row.get(f"iou_t10_diff_vs_{BASELINE}", float("nan")) if math.isnan(high) else high
    return bool(math.isnan(high) or high < 0)


def _kept(row: pd.Series) -> str:
    """How much of the change in soft IoU from unguided generation at step 10 is left at the last step."""
    t10, end = row.get("iou_t10_vs_none", float("nan")), row.get("iou_end_vs_none", float("nan"))
    if math.isnan(t10) or math.isnan(end) or t10 >= 0:
        return ""
    return f" ({max(0.0, end / t10):.0%} of it left at the end)"


def guidance_answer(headline: pd.DataFrame) -> str:
    """The positive control (A&E vs none), then the pooled overlap methods vs A&E on missing and mixing, with their
    manipulation check (how often the objective fell, how far the maps moved from unguided generation and from
    A&E's, and whether the change lasted); directions are the study's Holm-corrected verdicts."""
    table = _without_initno(headline)
    none, pooled = _row(table, method="none"), _row(table, method=POOLED)
    parts = []
    if none is not None and not math.isnan(none[f"diff_vs_{BASELINE}"]):
        effect, low, high = -none[f"diff_vs_{BASELINE}"], -none.diff_ci_high, -none.diff_ci_low
        held = str(none.verdict).startswith("more")  # no guidance misses more than A&E
        parts.append(f"Attend-and-Excite changed missing by {_points(effect)} {_interval(low, high)} against no "
                     f"guidance ({int(none.n)} pairs{_p(none.get('p_holm'))}): the positive control "
                     f"{'holds' if held else 'is not met at this size'}")
    if pooled is not None:
        missing = (f"missing by {_points(pooled[f'diff_vs_{BASELINE}'])} "
                   f"{_interval(pooled.diff_ci_low, pooled.diff_ci_high)}{_p(pooled.get('p_holm'))}")
        mixing = (f"mixing by {_points(pooled[f'mixed_diff_vs_{BASELINE}'])} "
                  f"{_interval(pooled.mixed_diff_ci_low, pooled.mixed_diff_ci_high)}{_p(pooled.get('mixed_p_holm'))}")
        check = ""
        if not math.isnan(pooled.get("loss_fell", float("nan"))):
            check = (f"; their objective fell in {pooled.loss_fell:.0%} of images and soft IoU moved "
                     f"{_signed(pooled.iou_t10_vs_none)} at step 10{_kept(pooled)} from unguided generation")
        against = pooled.get(f"iou_t10_diff_vs_{BASELINE}", float("nan"))
        if not math.isnan(against):
            check += f" and {_signed(against)}"
            if not math.isnan(pooled.get("iou_t10_diff_ci_low", float("nan"))):
                check += f" [{pooled.iou_t10_diff_ci_low:+.3f}, {pooled.iou_t10_diff_ci_high:+.3f}]"
            check += " from A&E's images"
        effect = _direction(str(pooled.verdict))
        if not _acted(pooled):
            conclusion = (f"the guidance {effect} entity missing relative to Attend-and-Excite, but as it did not "
                          "lower its objective in most images, or did not lower overlap, this does not test whether "
                          "lower overlap lowers missing")
        elif not _beyond_baseline(pooled):
            conclusion = (f"they {effect} entity missing relative to Attend-and-Excite, but as they did not lower "
                          "overlap below A&E's own, this comparison cannot tell whether lower overlap lowers missing "
                          "beyond A&E")
        else:
            conclusion = f"so guidance that lowers overlap {effect} entity missing relative to Attend-and-Excite"
        parts.append(f"the overlap-lowering methods, pooled, changed {missing} and {mixing} against A&E{check}; "
                     + conclusion)
    return ("; ".join(parts) + ".") if parts else "No comparison with Attend-and-Excite was run."


def self_cross_answer(headline: pd.DataFrame) -> str:
    """Self-Cross vs A&E on mixing of similar subjects (the study's Holm-corrected verdict), with its manipulation
    check."""
    rows = headline[headline.method == "self_cross"] if "method" in headline else headline.iloc[:0]
    parts = []
    for _, row in rows.iterrows():
        if math.isnan(row[f"mixed_diff_vs_{BASELINE}"]):
            continue
        diff, low, high = row[f"mixed_diff_vs_{BASELINE}"], row.mixed_diff_ci_low, row.mixed_diff_ci_high
        fell = row.get("loss_fell", float("nan"))
        check = (f"; its loss fell in {fell:.0%} of images (median {row.loss_start_median:.3f} → "
                 f"{row.loss_end_median:.3f})" if not math.isnan(fell) else "")
        verdict = (f"it {_direction(str(row.mixed_verdict))} mixing" if _acted(row) else
                   "the guidance did not act, so the comparison says nothing about the method")
        with_initno = str(row.get("initno", False)).lower() == "true"
        parts.append(f"{'with' if with_initno else 'without'} INITNO, Self-Cross changed mixing of similar subjects "
                     f"by {_points(diff)} {_interval(low, high)} against Attend-and-Excite ({int(row.n)} pairs"
                     f"{_p(row.get('mixed_p_holm'))}){check}: {verdict}")
    if not parts:
        return "Self-Cross was not compared with Attend-and-Excite."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def probe_answer(headline: pd.DataFrame) -> str:
    """FPE's claim on targets the prompt does not give away: does self-attention carry where and shape better than
    cross-attention? Per layout target, the best probe of each kind; "better" needs disjoint Wilson intervals."""
    targets = [t for t in LAYOUT_TARGETS if t in set(headline.target)]
    if not targets:
        return "No layout target was probed."
    verdicts = []
    for target in targets:
        rows = headline[headline.target == target]
        best = {kind: rows[rows.kind == kind].sort_values("accuracy").iloc[-1] for kind in ("self", "cross")
                if (rows.kind == kind).any()}
        if len(best) < 2:
            continue
        s, c = best["self"], best["cross"]
        word = "better" if s.ci_low > c.ci_high else "worse" if s.ci_high < c.ci_low else "as well (intervals overlap)"
        verdicts.append((target, word, s.accuracy, c.accuracy))
    better = sum(w == "better" for _, w, _, _ in verdicts)
    listed = "; ".join(f"{t}: self {s:.2f} vs cross {c:.2f}, {w}" for t, w, s, c in verdicts)
    return (f"Self-attention carries where and shape better than cross-attention on {better} of {len(verdicts)} "
            f"targets the prompt does not give away ({listed}), so FPE's claim is "
            f"{'confirmed' if better == len(verdicts) else 'partly confirmed' if better else 'not confirmed'} "
            "on this model.")


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


def editing_answer(headline: pd.DataFrame) -> str:
    """Per edit and image origin, how much of the source object's mask self- and cross-attention injection kept
    beyond no injection (IoU difference, paired interval), and the self edit's success rate."""
    parts = []
    for (edit, origin), rows in headline.groupby(["edit", "origin"], sort=False):
        said = []
        for row in rows[rows.inject.isin(["self", "cross"])].itertuples(index=False):
            if math.isnan(row.iou_vs_none):
                continue
            clear = _clear(row.iou_vs_none_ci_low, row.iou_vs_none_ci_high)
            said.append(f"{row.inject} {row.iou_vs_none:+.3f} [{row.iou_vs_none_ci_low:+.3f}, "
                        f"{row.iou_vs_none_ci_high:+.3f}]{'' if clear else ' (no clear difference)'}, "
                        f"success {row.success_rate:.0%}")
        if said:
            parts.append(f"{edit} edits of {origin} images: " + ", ".join(said))
    return ("Mask IoU with the source beyond no injection: " + "; ".join(parts) + ".") if parts else \
        "No attention-injection edit was run."


ANSWERS = {"probe": probe_answer, "overlap": overlap_answer, "editing": editing_answer, "guidance": guidance_answer,
           "self_cross": self_cross_answer}
