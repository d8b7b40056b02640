"""The causal test: does guidance that lowers overlap raise the share of images with every subject present, beyond
Attend-and-Excite?

Each image has one outcome (any subject missing, else any mixed, else all present), all present the primary one;
every method is compared with A&E and with no guidance on all three, paired on (prompt, seed), clustered by object
set; the pooled test keeps only the overlap arms that pass a pre-declared manipulation check and do not contain
A&E's own term; an answer is written only for a table of the size a registration fixed before the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probe import plots
from probe.analysis.stats import (
    cluster_sign_flip,
    detectable_effect,
    holm,
    intraclass_correlation,
    mcnemar,
    pairs_for_power,
    power_of_pairs,
)
from probe.checks import step_count, whole_number
from probe.models import load
from probe.prompts import attributes_of, subjects_of
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import require_shapes_world
from probe.shapes.settings import GUIDANCE, HELD_OUT_SEED, STEPS
from probe.steer.guide import InitNO, Schedule
from probe.studies import registration
from probe.studies.answers import (
    OUTCOME_WORDS,
    add_section_text,
    holm_p,
    initno_groups,
    interval_text,
    join_names,
    method_label,
    row_where,
    signed_text,
    truthy,
)
from probe.studies.common import (
    BOOTSTRAPS,
    QUICK_BOOTSTRAPS,
    QUICK_STEPS,
    Judge,
    Subject,
    mean_interval,
    save_figures,
)
from probe.studies.guided import (
    BASELINE,
    DEFAULT_SECONDS,
    NO_GUIDANCE,
    StudyPart,
    configurations,
    guided_rows,
    study_plan,
    study_prompts,
)
from probe.studies.registration import function_defaults, same_value
from probe.studies.registry import Study, register
from probe.studies.shards import Shard

GUIDANCE_SEED = HELD_OUT_SEED + 40_000  # seeds of the guidance study's images (shared by every method)
GUIDANCE_SETS = ("shapes-2", "shapes-3")  # the built-in world's two- and three-object prompts
GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou", "com", "kl", "cc", "self_cross", "ai_t2i")
OVERLAP_METHODS = ("iou", "com", "kl", "cc", "self_cross", "ai_t2i")  # objectives that push subjects' maps apart
POOLED = "overlap methods (pooled)"
GUIDANCE_SEEDS_PER_PROMPT = 5  # seeds per prompt of the default design (its size is set by power: Design)
SUMMARY_METRICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross", "intensity_mean")
QUICK_GUIDANCE_IMAGES = 4  # quick: four prompts (two per set), one seed
QUICK_GUIDANCE_METHODS = (NO_GUIDANCE, "ae", "iou")
QUICK_INITNO = InitNO(rounds=2, steps=5, final_steps=5)  # quick: a short initial-noise optimisation
QUICK_SCHEDULE = Schedule(max_refinement=5)  # quick: A&E's schedule with at most 5 refinement iterations
ALPHA = 0.05  # family-wise error of each outcome's comparisons (Holm)




CATEGORIES = ("all_present", "missing", "mixed")  # one outcome per image: any missing, else any mixed, else all present
PRIMARY = "all_present"  # the comparison each study's verdicts are read from; missing and mixing are reported beside
REFERENCES = (BASELINE, NO_GUIDANCE)  # every method is compared with A&E (same INITNO) and with no guidance
AE_TERM = ("self_cross", "ai_t2i")  # objectives that add λ·response, A&E's own loss at top-k 1
PAIR = ["prompt", "seed"]  # what pairs two methods' images: the same prompt and seed
LEFT_OUT_AE = "left out: contains A&E's own term"
LEFT_OUT_CHECK = "left out: failed the manipulation check"
IN_POOL = "pooled"


def object_set(prompt: str) -> str:
    """The sorted set of a prompt's (colour, noun) subjects, e.g. ``"blue square & red circle"``.

    A prompt and the same objects in swapped word order share what fails, so intervals and sign flips resample
    object sets, not prompt strings. A prompt whose subjects cannot be read is a set of its own."""
    try:
        subjects = [f"{a} {n}".strip() for a, n in zip(attributes_of(prompt), subjects_of(prompt))]
    except ValueError:
        return prompt
    return " & ".join(sorted(subjects))


def categorised(images: pd.DataFrame) -> pd.DataFrame:
    """The per-image rows with the judge's verdict as one exclusive outcome: ``outcome`` and its flags
    ``all_present``, ``missing``, ``mixed`` (0/1; any subject missing first, else any mixed, else all present), and
    each prompt's :func:`object_set`.

    The judge makes missing and mixed exclusive per subject, so counted apart a method can lower missing by mixing
    more; one outcome per image shows the trade. ``all_present`` here means no subject missing or mixed (a subject of
    the wrong colour or shape counts as present, as in the intervention study's registered outcome): it replaces the
    judge's stricter column of the same name. ``mixed`` may be absent (no image mixed); ``initno`` becomes bool."""
    missing = images["missing"].astype(bool)
    mixed = (images["mixed"].astype(bool) if "mixed" in images else pd.Series(False, images.index)) & ~missing
    sets = {prompt: object_set(prompt) for prompt in images["prompt"].unique()}
    return images.assign(
        initno=images["initno"].astype(bool) if "initno" in images else False,
        missing=missing.astype(float), mixed=mixed.astype(float), all_present=(~missing & ~mixed).astype(float),
        outcome=np.select([missing, mixed], ["missing", "mixed"], PRIMARY), object_set=images["prompt"].map(sets))


def contains_ae_term(method: str) -> bool:
    """Whether an objective holds A&E's own loss (Self-Cross and AI-T2I add it as their response term; a sum such as
    ``"ae+iou"`` names it): pooled with the overlap objectives it would test A&E against itself."""
    parts = {part.strip() for part in method.split("+")}
    return bool(parts & {BASELINE, *AE_TERM})


def planned_comparisons(configs: Sequence[tuple[str, bool]], pools: Mapping[bool, Sequence[str]] | None = None
                        ) -> list[tuple[str, tuple[str, ...], bool, str, bool]]:
    """Every comparison a study tests, as (name, members, initno, reference, reference's initno): each method
    against A&E at its own INITNO setting and against no guidance (which runs without INITNO), and the pool of
    ``pools[initno]`` (two or more methods) against both. A&E against no guidance is the positive control; no
    guidance against A&E is the same comparison and is not tested twice."""
    present = list(dict.fromkeys((m, bool(i)) for m, i in configs))
    plan = []
    for initno in dict.fromkeys(i for _, i in present):
        pool = tuple(m for m in (pools or {}).get(initno, ()) if (m, initno) in present)
        groups = [(m, (m,)) for m, i in present if i == initno] + ([(POOLED, pool)] if len(pool) > 1 else [])
        for name, members in groups:
            if name not in (BASELINE, NO_GUIDANCE) and (BASELINE, initno) in present:
                plan.append((name, members, initno, BASELINE, initno))
            if name != NO_GUIDANCE and (NO_GUIDANCE, False) in present:
                plan.append((name, members, initno, NO_GUIDANCE, False))
    return plan


def family_size(configs: Sequence[tuple[str, bool]], candidates: Sequence[str] = OVERLAP_METHODS) -> int:
    """The most comparisons one outcome's Holm family holds at one INITNO setting, counting the pool as if every
    overlap method without A&E's term passed the manipulation check (the size a power calculation must assume)."""
    initnos = dict.fromkeys(bool(i) for _, i in configs)
    pools = {i: [m for m in candidates if (m, i) in configs and not contains_ae_term(m)] for i in initnos}
    plan = planned_comparisons(configs, pools)
    return max((sum(p[2] == i for p in plan) for i in initnos), default=0)


def _per_pair(frame: pd.DataFrame, members: Sequence[str], initno: bool, columns: Sequence[str]) -> pd.DataFrame:
    """Each (prompt, seed)'s mean of ``columns`` over the images of ``members`` at ``initno`` (one image each for a
    single method: its own 0/1 outcome)."""
    part = frame[frame.method.isin(members) & (frame.initno == initno)]
    return part.groupby(PAIR)[list(columns)].mean()


def _contrast(part: pd.DataFrame, reference: pd.DataFrame, column: str, sets: Mapping[str, str], n_boot: int,
              seed: int, binary: bool) -> dict:
    """``part`` minus ``reference`` in ``column``, paired on (prompt, seed): the mean with a bootstrap interval over
    object sets, the sign-flip p-value over object sets, and McNemar's exact p-value where the pairs are 0/1."""
    joined = part[[column]].join(reference[[column]], rsuffix="_ref", how="inner")
    prompts = joined.index.get_level_values("prompt")
    clusters = np.asarray(prompts.map(sets))
    differences = joined[column] - joined[f"{column}_ref"]
    mean, low, high = mean_interval(differences, clusters, n_boot, seed=seed)
    flips = cluster_sign_flip(differences, clusters, seed=seed)
    exact = mcnemar(joined[f"{column}_ref"] > 0.5, joined[column] > 0.5) if binary and len(joined) else math.nan
    return {"n_paired": len(joined), "n_prompts": prompts.nunique(), "n_sets": len(set(clusters)),
            "difference": mean, "ci_low": low, "ci_high": high, "p_value": exact if binary else flips,
            "test": "McNemar exact" if binary else "sign flip over object sets", "p_sign_flip": flips}


def _verdict(difference: float, adjusted: float, outcome: str, reference: str, alpha: float) -> str:
    if math.isnan(difference):
        return "not measured"
    if adjusted < alpha:
        return f"{'less' if difference < 0 else 'more'} {outcome} than {reference}"
    return f"no clear difference from {reference}"


def comparison_table(images: pd.DataFrame, pools: Mapping[bool, Sequence[str]] | None = None,
                     outcomes: Sequence[str] = CATEGORIES, n_boot: int = BOOTSTRAPS, seed: int = 0,
                     alpha: float = ALPHA) -> pd.DataFrame:
    """Every planned comparison (:func:`planned_comparisons`) on every outcome: one row per (method, initno,
    reference, outcome), paired on (prompt, seed).

    ``difference`` (method − reference) with a bootstrap interval over object sets (:func:`object_set`: a prompt
    and its swapped word order are one cluster). ``p_value``: McNemar's exact test where each pair is one image of
    each (0/1 outcomes), else (the pool, whose per-pair outcome is a share) sign flips of whole object sets; which
    one is ``test``. ``p_sign_flip``: the sign-flip p-value of every row, cluster-robust, beside. ``p_holm``:
    ``p_value`` adjusted by Holm over one outcome's comparisons at one INITNO setting (``family`` says whether that
    outcome is the primary one, all present, or reported beside); ``verdict`` reads it at ``alpha``."""
    frame = categorised(images)
    sets = dict(zip(frame.prompt, frame.object_set))
    configs = list(zip(frame.method, frame.initno))
    rows = []
    for name, members, initno, reference, reference_initno in planned_comparisons(configs, pools):
        part = _per_pair(frame, members, initno, outcomes)
        base = _per_pair(frame, [reference], reference_initno, outcomes)
        for outcome in outcomes:
            found = _contrast(part, base, outcome, sets, n_boot, seed, binary=len(members) == 1)
            rows.append({"method": name, "initno": initno, "reference": reference, "outcome": outcome,
                         "family": "primary" if outcome == PRIMARY else "reported beside", **found})
    columns = ["method", "initno", "reference", "outcome", "family", "n_paired", "n_prompts", "n_sets", "difference",
               "ci_low", "ci_high", "p_value", "test", "p_sign_flip", "p_holm", "verdict"]
    table = pd.DataFrame(rows, columns=columns)
    for _, family in table.groupby(["initno", "outcome"], sort=False):
        table.loc[family.index, "p_holm"] = holm(family.p_value.to_numpy())
    table["verdict"] = [_verdict(d, p, o, r, alpha) for d, p, o, r in
                        zip(table.difference, table.p_holm.astype(float), table.outcome, table.reference)]
    return table


def _overlap_check(frame: pd.DataFrame, members: Sequence[str], initno: bool, sets: Mapping[str, str],
                   n_boot: int, seed: int) -> dict:
    """How far soft IoU moved from no guidance's images at step 10 (interval over object sets) and at the end, and
    from A&E's own at step 10, on the same (prompt, seed)."""
    columns = [c for c in ("soft_iou_t10", "soft_iou_end") if c in frame]
    row = dict.fromkeys(["iou_t10_vs_none", "iou_t10_vs_none_ci_low", "iou_t10_vs_none_ci_high", "iou_end_vs_none",
                         "iou_t10_vs_ae", "iou_t10_vs_ae_ci_low", "iou_t10_vs_ae_ci_high"], math.nan)
    part = _per_pair(frame, members, initno, columns)
    for reference, reference_initno, name in ((NO_GUIDANCE, False, "none"), (BASELINE, initno, "ae")):
        if reference in members or "soft_iou_t10" not in frame:
            continue
        base = _per_pair(frame, [reference], reference_initno, columns)
        found = _contrast(part, base, "soft_iou_t10", sets, n_boot, seed, binary=False)
        row.update({f"iou_t10_vs_{name}": found["difference"], f"iou_t10_vs_{name}_ci_low": found["ci_low"],
                    f"iou_t10_vs_{name}_ci_high": found["ci_high"]})
        if name == "none" and "soft_iou_end" in frame:
            row["iou_end_vs_none"] = float((part.soft_iou_end - base.soft_iou_end).dropna().mean())
    return row


def manipulation_check(images: pd.DataFrame, candidates: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS,
                       seed: int = 0) -> pd.DataFrame:
    """The pre-declared manipulation check, and which arms the pooled test keeps: one row per guided (method,
    initno), plus the pool per initno where two or more arms are left.

    An arm passes (``manipulated``) when it lowered soft IoU at step 10 against no guidance on the same (prompt,
    seed), the interval over object sets wholly below 0 (``iou_t10_vs_none`` and its interval; ``iou_end_vs_none``:
    what is left at the end; ``iou_t10_vs_ae``: against A&E's own images). ``pool``: for the ``candidates`` (the
    overlap objectives), whether the arm is pooled or why it is left out: it contains A&E's own term
    (:func:`contains_ae_term`; pooled, A&E would be tested against itself) or it failed the check (pooled, it would
    dilute a test of lower overlap with arms that did not lower it)."""
    frame = categorised(images)
    sets = dict(zip(frame.prompt, frame.object_set))
    rows = []
    for method, initno in dict.fromkeys(zip(frame.method, frame.initno)):
        if method == NO_GUIDANCE:
            continue
        row = {"method": method, "initno": initno, **_overlap_check(frame, [method], initno, sets, n_boot, seed)}
        high = row["iou_t10_vs_none_ci_high"]
        row["manipulated"] = bool(high < 0) if not math.isnan(high) else math.nan
        row["pool"] = ("" if method not in candidates else LEFT_OUT_AE if contains_ae_term(method)
                       else IN_POOL if row["manipulated"] is True else LEFT_OUT_CHECK)
        rows.append(row)
    table = pd.DataFrame(rows)
    for initno, members in pool_members(table).items():
        if len(members) > 1:
            row = {"method": POOLED, "initno": initno, **_overlap_check(frame, members, initno, sets, n_boot, seed)}
            high = row["iou_t10_vs_none_ci_high"]
            rows.append({**row, "manipulated": bool(high < 0) if not math.isnan(high) else math.nan, "pool": ""})
    return pd.DataFrame(rows)


def pool_members(check: pd.DataFrame) -> dict[bool, tuple[str, ...]]:
    """Per initno, the arms :func:`manipulation_check` keeps in the pool."""
    if check.empty or "pool" not in check:
        return {}
    kept = check[check["pool"] == IN_POOL]
    return {bool(i): tuple(group.method) for i, group in kept.groupby("initno", sort=False)}


def versus_baseline(images: pd.DataFrame, outcome: str = "missing", baseline: str = BASELINE,
                    pooled: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS, seed: int = 0,
                    alpha: float = ALPHA) -> pd.DataFrame:
    """Each method against ``baseline`` (A&E or none) on one ``outcome``: :func:`comparison_table`'s rows (Holm over
    every comparison of that outcome, the pool of ``pooled`` kept by :func:`manipulation_check`), against A&E with no
    guidance's row as in :func:`versus_ae_view`; ``overlap_difference`` (``overlap_ci_low`` / ``_high``): soft IoU
    at step 10 against the same reference."""
    if baseline not in REFERENCES:
        raise ValueError(f"baseline must be one of {REFERENCES}, not {baseline!r}")
    check = manipulation_check(images, pooled, n_boot, seed)
    table = comparison_table(images, pool_members(check), (outcome,), n_boot, seed, alpha)
    mine = versus_ae_view(table, outcome, alpha) if baseline == BASELINE else table[table.reference == baseline]
    overlap = check.set_index(["method", "initno"]) if len(check) else pd.DataFrame()
    name = "ae" if baseline == BASELINE else "none"
    for column, suffix in (("overlap_difference", ""), ("overlap_ci_low", "_ci_low"), ("overlap_ci_high", "_ci_high")):
        source = f"iou_t10_vs_{name}{suffix}"
        mine[column] = [overlap[source].get((m, i), math.nan) if source in overlap else math.nan
                        for m, i in zip(mine.method, mine.initno)]
    return mine.reset_index(drop=True)


def outcome_summary(images: pd.DataFrame, outcomes: Sequence[str] = CATEGORIES,
                    pooled: Sequence[str] | Mapping[bool, Sequence[str]] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS,
                    seed: int = 0) -> pd.DataFrame:
    """One row per (method, initno), plus the pool per initno where it holds two or more methods (``pooled``: its
    members, the same at every initno for a sequence; :func:`pool_members` gives them after the manipulation check).

    Per outcome of :func:`categorised` (exclusive: all present, missing, mixed) its rate with an interval over object
    sets (``{outcome}_rate``, ``{outcome}_ci_low``, ``_ci_high``); the mean number of missing subjects; the mean of
    each :data:`SUMMARY_METRICS` at step 10 and at the end; the objective's median at its first and last guided step
    and the share of images where it fell (``loss_start_median``, ``loss_end_median``, ``loss_fell``); ``step_size``,
    the step its images were made at (NaN unguided and for the pool); the quality proxies; seconds per image."""
    frame = categorised(images)
    groups = list(frame.groupby(["method", "initno"], sort=False))
    for initno in dict.fromkeys(frame.initno):
        members = pooled.get(initno, ()) if isinstance(pooled, Mapping) else pooled
        family = frame[frame.method.isin(members) & (frame.initno == initno)]
        if family.method.nunique() > 1:
            groups.append(((POOLED, initno), family))
    rows = []
    for (method, initno), part in groups:
        row = {"method": method, "initno": bool(initno), "n": len(part), "n_prompts": part.prompt.nunique(),
               "n_sets": part.object_set.nunique()}
        for outcome in outcomes:
            rate, low, high = mean_interval(part[outcome].astype(float), part.object_set, n_boot, seed=seed)
            row.update({f"{outcome}_rate": rate, f"{outcome}_ci_low": low, f"{outcome}_ci_high": high})
        row["n_missing_mean"] = float(part["n_missing"].mean()) if "n_missing" in part else math.nan
        row.update({f"{m}_{at}": float(part[f"{m}_{at}"].mean()) if f"{m}_{at}" in part else math.nan
                    for m in SUMMARY_METRICS for at in ("t10", "end")})
        guided = part.dropna(subset=["loss_start", "loss_end"]) if "loss_start" in part else part.iloc[:0]
        row.update({"loss_start_median": float(guided.loss_start.median()) if len(guided) else math.nan,
                    "loss_end_median": float(guided.loss_end.median()) if len(guided) else math.nan,
                    "loss_fell": float((guided.loss_end < guided.loss_start).mean()) if len(guided) else math.nan})
        made_at = part.get("step_size", pd.Series(dtype=float)).dropna().unique()
        row["step_size"] = float(made_at[0]) if len(made_at) == 1 and method != POOLED else math.nan
        row.update({name: float(part[name].mean()) if name in part else math.nan
                    for name in ("quality", "precision")})
        row["seconds_per_image"] = float(part["seconds"].mean()) if "seconds" in part else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


COMPARISON_FIELDS = {"difference": "", "ci_low": "_ci_low", "ci_high": "_ci_high", "p_value": "_p",
                     "p_holm": "_p_holm", "verdict": "_verdict"}


def with_comparisons(summary: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with each comparison of its row as columns ``{outcome}_vs_{reference}`` (the difference) and
    ``…_ci_low``, ``…_ci_high``, ``…_p``, ``…_p_holm``, ``…_verdict``."""
    merged = summary
    for (reference, outcome), rows in comparisons.groupby(["reference", "outcome"], sort=False):
        name = f"{outcome}_vs_{reference}"
        wide = rows.set_index(["method", "initno"])[list(COMPARISON_FIELDS)]
        wide.columns = [f"{name}{suffix}" for suffix in COMPARISON_FIELDS.values()]
        merged = merged.merge(wide.reset_index(), on=["method", "initno"], how="left")
    return merged


def study_tables(images: pd.DataFrame, candidates: Sequence[str] = OVERLAP_METHODS, n_boot: int = BOOTSTRAPS,
                 seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A guided study's summary (rates, manipulation check, pool, every comparison as columns) and its comparisons
    (:func:`comparison_table`), from the per-image rows alone; ``candidates``: the arms the pool may hold."""
    check = manipulation_check(images, candidates, n_boot, seed)
    pools = pool_members(check)
    comparisons = comparison_table(images, pools, n_boot=n_boot, seed=seed)
    summary = outcome_summary(images, CATEGORIES, pools, n_boot, seed)
    if len(check):
        summary = summary.merge(check, on=["method", "initno"], how="left")
    return with_comparisons(summary, comparisons), comparisons


def guidance_tables(images: pd.DataFrame, n_boot: int = BOOTSTRAPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The guidance study's summary and comparisons (:func:`study_tables`) from the per-image rows alone, so that
    the committed ``guidance_images.csv`` reproduces every number of the headline."""
    return study_tables(images, OVERLAP_METHODS, n_boot)


def versus_ae_view(comparisons: pd.DataFrame, outcome: str = "missing", alpha: float = ALPHA) -> pd.DataFrame:
    """One ``outcome`` against A&E, one row per (method, initno), no guidance's (which runs without INITNO) as the
    negative of A&E without INITNO against it (the same comparison, so the same p-values): the layout of the
    study's earlier ``versus_ae`` table, which ``probe.shapes.evaluate.positive_control`` reads."""
    rows = comparisons[comparisons.outcome == outcome]
    mine = rows[rows.reference == BASELINE]
    control = rows[(rows.reference == NO_GUIDANCE) & (rows.method == BASELINE) & ~rows.initno.astype(bool)].copy()
    control[["difference", "ci_low", "ci_high"]] = -control[["difference", "ci_high", "ci_low"]].to_numpy()
    control["method"], control["reference"] = NO_GUIDANCE, BASELINE
    control["verdict"] = [_verdict(d, p, outcome, BASELINE, alpha) for d, p in zip(control.difference, control.p_holm)]
    return pd.concat([control, mine], ignore_index=True)


@dataclass
class GuidanceStudy:
    """``images``: one row per generated image; ``summary``: one row per (method, initno) plus the pool of
    overlap-lowering methods, with the three exclusive outcomes' rates, the manipulation check and every comparison
    as columns (:func:`study_tables`); ``versus_ae``: missing against A&E in the earlier layout
    (:func:`versus_ae_view`, read by ``probe.shapes.evaluate.positive_control``); ``step_sizes``: how each method's
    step size was chosen; ``comparisons``: every comparison, one row per (method, initno, reference, outcome)
    (:func:`comparison_table`)."""

    images: pd.DataFrame
    summary: pd.DataFrame
    versus_ae: pd.DataFrame
    step_sizes: pd.DataFrame  # the step-size calibration (empty where the step sizes were given)
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class Design:
    """How many images a comparison with the baseline needs: a McNemar test on (prompt, seed) pairs, Bonferroni's
    bound on Holm over the comparisons, inflated for the seeds that share a prompt.

    ``effect``: the smallest paired difference in missing rate worth finding (the testbed's target for A&E);
    ``discordant``: the share of pairs whose outcome differs between two methods; ``icc``: how alike one prompt's
    paired differences are (design effect 1 + (seeds − 1)·icc). The defaults are the built-in model's, measured on
    its 540-pair guidance run (``figures/guidance_images.csv``, :meth:`from_pilot`): 18–24% of pairs differ between
    A&E and an overlap-lowering method (0.22 on average), and the intraclass correlation of their paired
    differences over prompts is 0.01 to 0.06 (0.02 on average); on another model, measure them on a pilot.
    """

    effect: float = 0.05
    discordant: float = 0.22
    icc: float = 0.02
    power: float = 0.80
    alpha: float = ALPHA

    @classmethod
    def from_pilot(cls, images: pd.DataFrame, outcome: str = PRIMARY, baseline: str = BASELINE,
                   methods: Sequence[str] = OVERLAP_METHODS, **fixed) -> Design:
        """``discordant`` and ``icc`` measured on a pilot's per-image rows (a guidance study's ``images``): the mean
        over ``methods`` of the share of (prompt, seed) pairs whose ``outcome`` (of :func:`categorised`; all present,
        the primary one, by default) differs from ``baseline``'s, and of the intraclass correlation of the paired
        differences over object sets, the study's clusters (at least 0); ``fixed`` sets the rest."""
        frame = categorised(images)
        wide = frame[~frame.initno].pivot_table(index=PAIR, columns="method", values=outcome, aggfunc="mean")
        present = [m for m in methods if m in wide and m != baseline]
        if baseline not in wide or not present:
            raise ValueError(f"the pilot needs {baseline!r} and one of {list(methods)}; it has {list(wide.columns)}")
        sets = dict(zip(frame.prompt, frame.object_set))
        clusters = wide.index.get_level_values("prompt").map(sets)
        differences = [wide[m] - wide[baseline] for m in present]
        discordant = float(np.mean([(d != 0).mean() for d in differences]))
        icc = float(np.nanmean([intraclass_correlation(d, clusters) for d in differences]))
        return cls(discordant=discordant, icc=max(0.0, icc if math.isfinite(icc) else 0.0), **fixed)

    def _deff(self, seeds_per_prompt: int) -> float:
        return 1 + (seeds_per_prompt - 1) * self.icc

    def images(self, comparisons: int, seeds_per_prompt: int) -> int:
        return pairs_for_power(self.effect, self.discordant, self.alpha / max(1, comparisons), self.power,
                               self._deff(seeds_per_prompt))

    def describe(self, n_images: int, comparisons: int, seeds_per_prompt: int) -> str:
        alpha, deff = self.alpha / max(1, comparisons), self._deff(seeds_per_prompt)
        power = power_of_pairs(n_images, self.effect, self.discordant, alpha, deff)
        smallest = detectable_effect(n_images, self.discordant, alpha, self.power, deff)
        return (f"design: {n_images} (prompt, seed) pairs per method, {comparisons} comparisons in each outcome's "
                f"Holm family (family-wise α = {self.alpha}); power {power:.0%} to find a paired difference of "
                f"{self.effect * 100:.0f} points if {self.discordant:.0%} of pairs differ and one prompt's paired "
                f"differences correlate at {self.icc:.2g} ({self.images(comparisons, seeds_per_prompt)} pairs give "
                f"{self.power:.0%}); at this size {self.power:.0%} power finds {smallest * 100:.1f} points")


def guidance_study(pipe, n_images: int | None = None, steps: int = STEPS, quick: bool = False,
                   out: str | Path | None = None, methods: Sequence[str] = GUIDANCE_METHODS,
                   initno: Sequence[bool] = (False, True),
                   progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                   sets: Sequence[str] = GUIDANCE_SETS, subject: Subject = "noun", judge: Judge = exact_judge,
                   guidance_scale: float = GUIDANCE, schedule: Schedule | None = None,
                   initno_settings: InitNO | None = None, step_sizes: Mapping[str, float] | None = None,
                   design: Design = Design(), registration: str | Path | None = None,
                   seed_offset: int = 0, min_effects: Mapping[str, float] | None = None,
                   shard: Shard | None = None, calibrate_only: bool = False) -> GuidanceStudy | StudyPart:
    """The causal test: does guidance that lowers attention overlap lower entity missing, beyond Attend-and-Excite?

    The same ``n_images`` (prompt, seed) pairs per method (default: as many as ``design`` needs for its power, the
    calculation printed at the start): the first prompts of the two- and three-object sets, each
    with ``seeds_per_prompt`` seeds. Methods: ``none`` (no guidance, same code path), ``ae`` and the overlap-lowering
    objectives of :data:`probe.steer.guide.OBJECTIVES`, each without and with INITNO (``none`` without only). Schedule:
    Attend-and-Excite's, refinement steps scaled to ``steps`` (:func:`scaled_schedule`). Per image: the judge's
    verdict (missing, number missing, mixed), overlap statistics of the subjects' maps at step 10 (of 50, scaled)
    and at the last step, the quality proxies of :func:`judged`, seconds. An image is missing when any subject is.
    ``schedule`` replaces A&E's schedule (given for 50 steps); ``initno_settings`` the default :class:`InitNO`.
    ``step_sizes``: each method's ``scale_factor``; by default chosen before the study on pilot prompts it does not
    use (:func:`probe.studies.guided.calibrate_steps`: A&E's lowers missing most against no guidance, every other
    objective's soft IoU at step 10), the table in ``step_sizes`` (``guidance_step_sizes.csv``).

    ``quick``: at most 4 images (two prompts per set, one seed), methods none / ae / iou when ``methods`` is the
    default, at most 20 steps, a short INITNO and refinement (:data:`QUICK_INITNO`, :data:`QUICK_SCHEDULE`).

    With ``out``, the per-image rows go to ``out/guidance_images.csv`` as they are made (:class:`ImageRows`):
    the same command run again after a stop resumes where it stopped, and a larger ``n_images`` reuses a smaller
    run's images (the sets take turns, so a smaller run's prompts come first).

    ``registration``: a registration file (:func:`read_registration`) whose design the study runs at (an argument
    that disagrees is refused); only a table of the registered size is answered (:func:`guidance_answer`).
    ``seed_offset``: added to every seed (a registered run's own images). ``min_effects``: the step-size pilot's
    smallest changes (:func:`~probe.studies.guided.calibrate_group`). ``calibrate_only``, ``shard=(i, n)``: only the
    calibration, or only shard ``i`` of ``n``'s rows (:func:`~probe.studies.guided.guided_rows`).
    """
    if registration is not None:
        given = {"n_images": n_images, "steps": steps, "methods": methods, "initno": initno,
                 "seeds_per_prompt": seeds_per_prompt, "sets": sets, "seed_offset": seed_offset,
                 "min_effects": min_effects}
        fixed = registered_settings(registration, given)
        n_images, steps, methods, initno = fixed["n_images"], fixed["steps"], fixed["methods"], fixed["initno"]
        seeds_per_prompt, sets, design = fixed["seeds_per_prompt"], fixed["sets"], fixed["design"]
        seed_offset, min_effects = fixed["seed_offset"], fixed["min_effects"]
    pipe = load(pipe)
    if n_images is not None:
        n_images = whole_number(n_images, "n_images", "the number of (prompt, seed) pairs per arm (None: what power "
                                "needs)")
    seeds_per_prompt = whole_number(seeds_per_prompt, "seeds_per_prompt", "the number of seeds of each prompt")
    seed_offset = whole_number(seed_offset, "seed_offset", "added to every seed of the study", minimum=0)
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "guidance")
    if quick:
        methods = QUICK_GUIDANCE_METHODS if tuple(methods) == GUIDANCE_METHODS else methods
    configs = configurations(methods, initno)
    comparisons = family_size(configs)
    if n_images is None:
        n_images = design.images(comparisons, seeds_per_prompt)
    if quick:
        n_images, seeds_per_prompt, steps = min(n_images, QUICK_GUIDANCE_IMAGES), 1, min(steps, QUICK_STEPS)
        initno_settings, schedule = initno_settings or QUICK_INITNO, schedule or QUICK_SCHEDULE
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    seeds = [GUIDANCE_SEED + seed_offset + i for i in range(seeds_per_prompt)]
    if progress:
        print(design.describe(len(prompts) * len(seeds), comparisons, seeds_per_prompt))
    options = {"guidance_scale": guidance_scale, "subject": subject, "judge": judge, "schedule": schedule}
    found = guided_rows(pipe, "guidance", out, methods, sets, prompts, seeds, configs,
                        steps=steps, step_sizes=step_sizes, quick=quick, progress=progress, min_effects=min_effects,
                        shard=shard, calibrate_only=calibrate_only, initno_settings=initno_settings,
                        desc="guidance study", **options)
    if isinstance(found, StudyPart):  # the calibration alone, or one shard's rows
        return found
    images, calibration = found
    summary, comparisons = guidance_tables(images, n_boot)
    figures = {"guidance_missing": plots.outcome_rates(summary, CATEGORIES, baseline=BASELINE),
               "guidance_overlap_vs_missing": plots.overlap_vs_outcome(summary, CATEGORIES)}
    return GuidanceStudy(images, summary, versus_ae_view(comparisons), calibration, figures,
                         save_figures(figures, out), comparisons)


REGISTRATION = Path(__file__).resolve().parents[2] / "figures" / "guidance_registration.md"
REGISTERED = ("study", "n_images", "seeds_per_prompt", "sets", "methods", "initno", "steps", "power")
# optional: "seed_offset" (default 0), added to every seed so that the registered run makes images of its own, and
# "min_effects" (the step-size pilot's smallest changes, :func:`~probe.studies.guided.calibrate_group`)
POWER_FIELDS = ("effect", "discordant", "icc", "power", "alpha")  # Design's fields, the registration's "power"


def read_registration(path: str | Path = REGISTRATION) -> dict:
    """The guidance study's design as a registration file fixes it before the run (its ```json block: the
    :data:`REGISTERED` fields, ``power`` holding :data:`POWER_FIELDS`), checked: the size must be a whole number of
    prompts per set and at least what its power calculation needs (:class:`Design` over the largest Holm family,
    :func:`family_size`). A missing file raises FileNotFoundError, anything else wrong ValueError."""
    spec = registration.read_registration(path, "guidance")
    absent = [key for key in REGISTERED if key not in spec]
    if absent:
        raise ValueError(f"{path} is not a guidance registration: it needs {list(REGISTERED)} with study "
                         f"'guidance' (missing: {absent})")
    unknown = sorted(set(spec["power"]) - set(POWER_FIELDS))
    if unknown:
        raise ValueError(f"{path}: power takes {list(POWER_FIELDS)}, not {unknown}")
    design = Design(**spec["power"])
    per_prompt = len(spec["sets"]) * spec["seeds_per_prompt"]
    if spec["n_images"] % per_prompt:
        raise ValueError(f"{path}: n_images {spec['n_images']} is not a whole number of prompts per set "
                         f"({len(spec['sets'])} sets × {spec['seeds_per_prompt']} seeds)")
    configs = configurations(spec["methods"], spec["initno"])
    needed = design.images(family_size(configs), spec["seeds_per_prompt"])
    if spec["n_images"] < needed:
        raise ValueError(f"{path}: n_images {spec['n_images']} is below the {needed} pairs its power calculation "
                         f"needs ({design.describe(spec['n_images'], family_size(configs), spec['seeds_per_prompt'])})")
    return spec


def registered_settings(registration: str | Path, given: Mapping[str, object]) -> dict:
    """The keywords :func:`guidance_study` runs with under a registration (size, seeds, sets, methods, INITNO
    settings, steps, seed offset, its power ``design``); a ``given`` value that is neither the function's default
    nor the registered one is refused, so that a registered study cannot be run at another size by mistake."""
    import inspect

    spec = read_registration(registration)
    settings = {"n_images": int(spec["n_images"]), "seeds_per_prompt": int(spec["seeds_per_prompt"]),
                "sets": tuple(spec["sets"]), "methods": tuple(spec["methods"]),
                "initno": tuple(bool(i) for i in spec["initno"]), "steps": int(spec["steps"]),
                "seed_offset": int(spec.get("seed_offset", 0)), "min_effects": spec.get("min_effects")}
    defaults = {name: p.default for name, p in inspect.signature(guidance_study).parameters.items()}
    for key, value in given.items():
        if key in settings and not same_value(value, defaults.get(key)) and not same_value(value, settings[key]):
            raise ValueError(f"{key}={value!r} conflicts with the registration's {settings[key]!r} "
                             f"({registration}): a registered study runs at its registered design")
    return {**settings, "design": Design(**spec["power"])}


def registered_size_problem(headline: pd.DataFrame, registration: str | Path = REGISTRATION) -> str | None:
    """Why no answer may be read from ``headline`` (None when it may): no usable registration, or a table whose
    arms or pairs per arm differ from the registered ones (a size chosen after reading answers is not a test)."""
    path = Path(registration)
    try:
        spec = read_registration(path)
    except FileNotFoundError:
        return (f"Not answered: no registration ({path.name}) fixed this study's size before it ran, so its tables "
                "are exploratory")
    except ValueError as err:
        return f"Not answered: the registration is not usable: {err}"
    rows = headline[headline.method != POOLED]
    found = {(str(m), truthy(i)): int(n) for m, i, n in zip(rows.method, rows.initno, rows.n)}
    expected = set(configurations(spec["methods"], spec["initno"]))
    sizes = sorted(set(found.values()))
    if set(found) == expected and sizes == [spec["n_images"]]:
        return None
    return (f"Not answered: the table has {'/'.join(map(str, sizes))} pairs per arm over {len(found)} (method, INITNO) "
            f"arms; the registration ({path.name}) fixes {spec['n_images']} pairs over {len(expected)} arms. An "
            "answer is read only from a table of the registered size (a new size is a new registration)")


CHECK_COLUMNS = ["loss_fell", "loss_start_median", "loss_end_median", "step_size", "iou_t10_vs_none",
                 "iou_t10_vs_none_ci_low", "iou_t10_vs_none_ci_high", "iou_end_vs_none", "iou_t10_vs_ae",
                 "iou_t10_vs_ae_ci_low", "iou_t10_vs_ae_ci_high", "manipulated", "pool"]


def ranked_headline(summary: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Per (method, initno), most images with every subject present first: the three outcomes' rates, each
    comparison with A&E and with no guidance (difference, interval, Holm p), the manipulation check and pool,
    ``extra`` columns, quality, seconds per image."""
    compared = [f"{o}_vs_{r}{s}" for r in REFERENCES for o in CATEGORIES
                for s in ("", "_ci_low", "_ci_high", "_p_holm")]
    columns = ["method", "initno", "n", "n_sets", *(f"{c}_rate" for c in CATEGORIES), *compared, *CHECK_COLUMNS,
               *extra, "quality", "seconds_per_image"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    return (summary.reindex(columns=columns)
            .sort_values([f"{PRIMARY}_rate", "method"], ascending=[False, True], kind="stable").reset_index(drop=True))


def guidance_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """The guidance study's headline (:func:`ranked_headline`) with overlap at step 10 and at the end."""
    return ranked_headline(summary, ("soft_iou_t10", "soft_iou_end", "intensity_mean_t10"))


HARM_SIGN = {"all_present": -1, "missing": 1, "mixed": 1}  # the sign of a change that is a harm


def effect(row: pd.Series, outcome: str, reference: str) -> tuple[float, float, float, float]:
    """A headline row's (difference, ci_low, ci_high, Holm p) for ``outcome`` against ``reference``."""
    name = f"{outcome}_vs_{reference}"
    return tuple(float(row.get(f"{name}{s}", math.nan)) for s in ("", "_ci_low", "_ci_high", "_p_holm"))


def judgement(outcome: str, difference: float, p_holm: float) -> str:
    """A comparison's verdict at Holm α: a harm (fewer all present, more missing or mixing), a gain, or none."""
    if math.isnan(p_holm) or p_holm >= ALPHA:
        return "no clear difference"
    return "harm" if difference * HARM_SIGN[outcome] > 0 else "gain"


def contrast_text(row: pd.Series, reference: str) -> str | None:
    """'Self-Cross vs A&E: all present −5.0 points [−9.6, −0.4] (Holm p = 0.31, no clear difference), missing −3.7
    (…), mixing +10.4 (Holm p = 0.0042, harm)': every outcome of one comparison, the primary with its interval."""
    pieces = []
    for outcome in CATEGORIES:
        diff, low, high, p = effect(row, outcome, reference)
        if math.isnan(diff):
            return None
        shown = f" points {interval_text(low, high)}" if outcome == PRIMARY else ""
        pieces.append(f"{OUTCOME_WORDS[outcome]} {signed_text(100 * diff, 1)}{shown} ({holm_p(p)}, "
                      f"{judgement(outcome, diff, p)})")
    return f"{method_label(row['method'])} vs {method_label(reference)}: " + ", ".join(pieces)


def harms_text(table: pd.DataFrame) -> str:
    """Every comparison of ``table`` whose Holm-adjusted verdict is a harm, or that there is none."""
    found = []
    for _, row in table.iterrows():
        for reference in REFERENCES:
            for outcome in CATEGORIES:
                diff, _, _, p = effect(row, outcome, reference)
                if judgement(outcome, diff, p) == "harm":
                    found.append(f"{method_label(row['method'])} {OUTCOME_WORDS[outcome]} "
                                 f"{signed_text(100 * diff, 1)} points vs {method_label(reference)} ({holm_p(p)})")
    return ("Harms at Holm α = 0.05: " + "; ".join(found)) if found else "No comparison shows a harm at Holm α = 0.05"


def _overlap_against_ae(table: pd.DataFrame) -> str | None:
    """Which single methods lowered soft IoU at step 10 below A&E's own images, which raised it (intervals)."""
    groups: dict[str, list[str]] = {"lower": [], "higher": [], "not clearly different": []}
    for _, row in table[~table.method.isin([NO_GUIDANCE, BASELINE, POOLED])].iterrows():
        diff, low, high = (float(row.get(c, math.nan)) for c in
                           ("iou_t10_vs_ae", "iou_t10_vs_ae_ci_low", "iou_t10_vs_ae_ci_high"))
        if math.isnan(diff):
            continue
        key = "lower" if high < 0 else "higher" if low > 0 else "not clearly different"
        groups[key].append(f"{method_label(row.method)} {signed_text(diff)} [{low:+.3f}, {high:+.3f}]")
    shown = [f"{key} for {', '.join(names)}" for key, names in groups.items() if names]
    return ("soft IoU at step 10 against A&E's own: " + "; ".join(shown)) if shown else None


def _pool_text(table: pd.DataFrame) -> str | None:
    """Which overlap arms the pooled test kept and which it left out, and why; then the pool's comparisons and
    what they can say about overlap."""
    arms = table[table["pool"].fillna("").astype(str).ne("") & (table.method != POOLED)] if "pool" in table else \
        table.iloc[:0]
    if arms.empty:
        return None
    order = {m: i for i, m in enumerate(OVERLAP_METHODS)}
    arms = arms.sort_values("method", key=lambda c: c.map(lambda m: order.get(m, len(order))), kind="stable")
    why = {LEFT_OUT_AE: "A&E's own term, so pooled they would test A&E against itself",
           LEFT_OUT_CHECK: "failed the pre-declared manipulation check (soft IoU at step 10 below no guidance's, "
                           "interval below 0)"}
    left = [f"{join_names([method_label(m) for m in arms[arms.pool == reason].method])} "
            f"({'contain ' if reason == LEFT_OUT_AE else ''}{text})"
            for reason, text in why.items() if (arms.pool == reason).any()]
    kept = join_names([method_label(m) for m in arms[arms.pool == IN_POOL].method]) or "no arm"
    head = ("Pooled test of the overlap arms that passed the manipulation check (soft IoU at step 10 below unguided "
            f"generation's, interval below 0): {kept}")
    head += f"; left out before pooling: {'; '.join(left)}" if left else ""
    pooled = row_where(table, method=POOLED)
    if pooled is None:
        return f"{head}; fewer than two arms are left, so there is no pooled test"
    parts = [c for c in (contrast_text(pooled, BASELINE), contrast_text(pooled, NO_GUIDANCE)) if c]
    against = float(pooled.get("iou_t10_vs_ae", math.nan))
    moved = (f"its soft IoU at step 10 moved {signed_text(pooled.iou_t10_vs_none)} from unguided generation"
             f"{_kept(pooled)} and {signed_text(against)} [{pooled.iou_t10_vs_ae_ci_low:+.3f}, "
             f"{pooled.iou_t10_vs_ae_ci_high:+.3f}] from A&E's images")
    diff, _, _, p = effect(pooled, PRIMARY, BASELINE)
    verb = {"gain": "raised", "harm": "lowered"}.get(judgement(PRIMARY, diff, p), "did not clearly change")
    if not truthy(pooled.get("manipulated")):
        ending = "the pool did not lower overlap, so this does not test whether lower overlap helps"
    elif not _beyond_baseline(pooled):
        ending = (f"they {verb} the share of images with every subject present relative to A&E, but as they did not "
                  "lower overlap below A&E's own, this comparison cannot tell whether lower overlap helps beyond A&E")
    else:
        ending = (f"so guidance that lowers overlap below A&E's {verb} the share of images with every subject "
                  "present relative to A&E")
    return "; ".join([head, *parts, moved]) + ": " + ending


def _beyond_baseline(row: pd.Series) -> bool:
    """Did the methods lower overlap at step 10 below A&E's own images (the interval's upper end, else the
    estimate)? Without that, a comparison with A&E does not isolate overlap: A&E lowers overlap too."""
    high = float(row.get("iou_t10_vs_ae_ci_high", math.nan))
    high = float(row.get("iou_t10_vs_ae", math.nan)) if math.isnan(high) else high
    return bool(high < 0)


def _kept(row: pd.Series) -> str:
    """How much of the change in soft IoU from unguided generation at step 10 is left at the last step."""
    t10, end = float(row.get("iou_t10_vs_none", math.nan)), float(row.get("iou_end_vs_none", math.nan))
    if math.isnan(t10) or math.isnan(end) or t10 >= 0:
        return ""
    return f" ({max(0.0, end / t10):.0%} of it left at the end)"


def _control_text(table: pd.DataFrame) -> str | None:
    """A&E against no guidance on every outcome, and whether the positive control (more images with every subject
    present) holds."""
    ae = row_where(table, method=BASELINE)
    text = None if ae is None else contrast_text(ae, NO_GUIDANCE)
    if text is None:
        return None
    diff, _, _, p = effect(ae, PRIMARY, NO_GUIDANCE)
    verdict = judgement(PRIMARY, diff, p)
    head = f"Positive control, {text} ({int(ae.n)} pairs): the positive control"
    if verdict == "gain":
        return f"{head} holds"
    why = "A&E lowered the share with every subject present" if verdict == "harm" else "no clear rise at this size"
    return (f"{head} is not met ({why}), so where a comparison below shows no clear difference this study cannot "
            "tell a method without effect from one it could not detect")


def guidance_findings(headline: pd.DataFrame) -> str:
    """What the guidance tables say, whatever their size: per INITNO setting, the positive control, every method's
    comparisons with A&E and with no guidance on all three outcomes (each verdict, harms included), which methods
    lowered overlap below A&E's, the pooled test with the arms it left out and why, and every harm."""
    parts = []
    for prefix, table in initno_groups(headline):
        methods = table[~table.method.isin([NO_GUIDANCE, BASELINE, POOLED])]
        clauses = [_control_text(table)]
        clauses += ["; ".join(c for c in (contrast_text(row, BASELINE), contrast_text(row, NO_GUIDANCE)) if c)
                    for _, row in methods.iterrows()]
        overlap = _overlap_against_ae(table)
        clauses += [overlap[0].upper() + overlap[1:] if overlap else None, _pool_text(table), harms_text(table)]
        text = ". ".join(c for c in clauses if c)
        parts.append(prefix + text if text else "")
    text = " ".join(p + "." for p in parts if p)
    return text or "No comparison with Attend-and-Excite was run."


def guidance_answer(headline: pd.DataFrame, registration: str | Path = REGISTRATION) -> str:
    """The study's answer (:func:`guidance_findings`), written only for a table of the size a registration fixed
    before the run (:func:`registered_size_problem` says why not otherwise)."""
    problem = registered_size_problem(headline, registration)
    return problem + "." if problem else guidance_findings(headline)


def family_text(headline: pd.DataFrame | None, pool: bool) -> str:
    """Which comparisons each Holm family adjusts together, which test gives each p-value, what the intervals
    resample; with ``headline``, how many comparisons a family holds in it."""
    counted = ""
    if headline is not None and len(headline):
        sizes = sorted({sum(table[f"{PRIMARY}_vs_{r}_p_holm"].notna().sum() for r in REFERENCES
                            if f"{PRIMARY}_vs_{r}_p_holm" in table) for _, table in initno_groups(headline)})
        counted = f"; {' or '.join(map(str, sizes))} comparisons per family here"
    return ("**Holm families.** Each outcome (all present, the primary one; missing and mixing, reported beside) is "
            "adjusted in a family of its own at each INITNO setting, over every comparison in the table: each method "
            "against A&E (same INITNO) and against no guidance, A&E against no guidance (the positive control)"
            + (", and the pool of overlap arms against both" if pool else "") + counted + ". p-values: McNemar's "
            "exact test on the (prompt, seed) pairs of one method and its reference"
            + ("; the pool's, whose per-pair outcome is a share, from sign flips of whole object sets" if pool else "")
            + "; every row's sign-flip p-value over object sets (cluster-robust) is in the comparisons table beside. "
            "p-values below 0.001 print as < 0.001. Intervals: bootstrap over object sets (a prompt and the same "
            "objects in swapped word order are one cluster).")


def holm_family_text(headline: pd.DataFrame | None = None) -> str:
    """The guidance study's Holm families and tests, as the report writes them into its section."""
    return family_text(headline, pool=True)


OUTCOME_TEXT = ("**Outcome.** Each image has one outcome: any subject missing, else any subject mixed, else all "
                "present (a subject of the wrong colour or shape counts as present). The three shares add up to one, "
                "so a method cannot lower missing by mixing more unseen; all present is the primary comparison, "
                "missing and mixing are reported beside it.")


def outcome_text(headline: pd.DataFrame | None = None) -> str:
    """What the three outcomes of the guided studies' tables are (the report writes it into their sections)."""
    return OUTCOME_TEXT


EARLIER_RUN = ("an earlier run of this study (540 pairs per method, seeds 0–2), whose size grew 120 → 360 → 540 pairs "
               "per method after the answers of its smaller runs had been read, so that its tables are exploratory "
               "(their intervals and p-values assume a size chosen in advance)")


def size_history_text(headline: pd.DataFrame | None = None) -> str:
    """How the size of the table answered was fixed: by the registration, with the earlier grown run as its pilot
    only, or (a table of another size) not at all, so no answer is read from it."""
    if headline is not None and len(headline) and registered_size_problem(headline) is None:
        spec = read_registration(REGISTRATION)
        return (f"**Size.** Fixed before the run by `figures/guidance_registration.md`: {spec['n_images']} (prompt, "
                f"seed) pairs per arm from a power calculation whose pilot was {EARLIER_RUN}. That run is not reused "
                f"(this one draws seeds from {spec.get('seed_offset', 0)}). Rerun with `probe study guidance "
                "--registered`.")
    return ("**Size.** This table is not of the size the registration fixed before its run "
            "(`figures/guidance_registration.md`, run with `probe study guidance --registered`), so no answer is "
            f"written for it. The registration's pilot was {EARLIER_RUN}.")


add_section_text("guidance", outcome_text)
add_section_text("guidance", holm_family_text)
add_section_text("guidance", size_history_text)
register(Study(
    name="guidance", title="Guidance: does lowering overlap lower entity missing?", order=40, run=guidance_study,
    tables=lambda study: {"guidance_summary": study.summary, "guidance_comparisons": study.comparisons,
                          "guidance_step_sizes": study.step_sizes},  # images: stored as they are made
    headline=lambda study: guidance_headline(study.summary),
    source="guidance_images", recompute=lambda table, n_boot: guidance_headline(guidance_tables(table, n_boot)[0]),
    answer=guidance_answer, figures=("guidance_missing", "guidance_overlap_vs_missing")))


def study_plan_of(function, settings: Mapping[str, object], seconds_per_image: float = DEFAULT_SECONDS
                  ) -> pd.DataFrame:
    """:func:`~probe.studies.guided.study_plan` of a guided study function (:func:`guidance_study`,
    ``self_cross_study``) called with ``settings``: its defaults, its registration where it names one, and the size
    its power design asks for where ``n_images`` is None (``probe study NAME --dry``)."""
    keywords = {**function_defaults(function), **settings}
    if keywords.get("registration"):
        keywords.update(registered_settings(keywords["registration"], settings))
    configs = configurations(keywords["methods"], keywords["initno"])
    n_images = keywords["n_images"]
    if n_images is None:
        n_images = keywords["design"].images(family_size(configs), keywords["seeds_per_prompt"])
    return study_plan(keywords["sets"], n_images, keywords["seeds_per_prompt"], configs,
                      step_sizes=keywords["step_sizes"], min_effects=keywords.get("min_effects"),
                      seconds_per_image=seconds_per_image)
