"""The wording the studies' answers share. Each study's answer is one sentence read from its headline table (its
:class:`~probe.studies.registry.Study`'s ``answer``), so that it never disagrees with the numbers and is written
whatever the numbers say (a null result, a failed manipulation check, a control not met). The answers live with
their studies; this module imports no study, so every study can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pandas as pd

from probe.analysis.stats import p_phrase


def signed_text(value: float, digits: int = 3) -> str:
    """An estimate, signed, where −0.0 prints as +0.0 (an interval's bounds keep their sign: −0.000 says the bound
    is below zero, which is what the verdict reads)."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def points_text(value: float) -> str:
    return f"{signed_text(100 * value, 1)} points"


def interval_text(low: float, high: float) -> str:
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


def holm_p(value) -> str:
    """"Holm p = 0.0042", "Holm p < 0.001" (:func:`~probe.analysis.stats.format_p`: a resampled p-value's floor
    times the family size says how many resamples were drawn, not what the data say), "Holm p n/a"."""
    return p_phrase(value, "Holm p")


def p_text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f", {holm_p(value)}"


METHOD_LABELS = {"none": "no guidance", "ae": "A&E", "iou": "IoU", "com": "CoM", "kl": "KL", "cc": "CC",
                 "self_cross": "Self-Cross", "ai_t2i": "AI-T2I", "overlap methods (pooled)": "the pool"}
OUTCOME_WORDS = {"all_present": "all present", "missing": "missing", "mixed": "mixing"}


def method_label(method: str) -> str:
    """A guidance method as an answer names it ("Self-Cross", "A&E", "no guidance"); other names as they are."""
    return METHOD_LABELS.get(str(method), str(method))


def join_names(names: Sequence[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    names = list(names)
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + f" and {names[-1]}"


def truthy(value) -> bool:
    """A flag as a table read back from CSV holds it (True, "True", 1.0); NaN and anything else is False."""
    return str(value).strip().lower() in ("true", "1", "1.0")


def initno_groups(headline: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A headline's rows per INITNO setting, each with the prefix its answer starts with ("Without INITNO: ");
    one group without a prefix where the table has one setting."""
    if "initno" not in headline:
        return [("", headline)]
    flags = headline.initno.map(truthy)
    groups = [(f"{'With' if flag else 'Without'} INITNO: ", headline[flags == flag]) for flag in (False, True)
              if (flags == flag).any()]
    return [("", groups[0][1])] if len(groups) == 1 else groups


_SECTION_TEXTS: dict[str, dict[str, Callable[[pd.DataFrame | None], str]]] = {}


def add_section_text(study: str, text: Callable[[pd.DataFrame | None], str]) -> None:
    """Register a paragraph the report writes into ``study``'s section after its answer (its Holm family, how its
    size was fixed), made from the study's headline table; a module reloaded replaces its own paragraphs."""
    _SECTION_TEXTS.setdefault(study, {})[f"{text.__module__}.{text.__qualname__}"] = text


def section_texts(study: str, headline: pd.DataFrame | None = None) -> list[str]:
    """The paragraphs registered for ``study`` (:func:`add_section_text`), in the order they were registered."""
    return [text(headline) for text in _SECTION_TEXTS.get(study, {}).values()]


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


