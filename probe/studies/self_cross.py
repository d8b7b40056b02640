"""Self-Cross guidance on similar subjects: does it lower subject mixing, and at what cost?

Each image has one outcome (any subject missing, else any mixed, else all present), all present the primary one;
Self-Cross and A&E are each compared with A&E and with no guidance on all three (:mod:`probe.studies.guidance`'s
machinery), so that less mixing bought with more missing shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from probe import plots
from probe.checks import step_count, whole_number
from probe.models import load
from probe.shapes.judge import judge as exact_judge
from probe.shapes.judge import require_shapes_world
from probe.shapes.settings import GUIDANCE, HELD_OUT_SEED, STEPS
from probe.steer.guide import InitNO, Schedule
from probe.studies.answers import add_section_text, initno_groups, row_where, signed_text, truthy
from probe.studies.common import BOOTSTRAPS, QUICK_BOOTSTRAPS, QUICK_STEPS, Judge, Subject, save_figures
from probe.studies.guidance import (
    ALPHA,
    CATEGORIES,
    GUIDANCE_SEEDS_PER_PROMPT,
    QUICK_INITNO,
    QUICK_SCHEDULE,
    REFERENCES,
    contrast_text,
    family_text,
    harms_text,
    outcome_text,
    ranked_headline,
    study_tables,
)
from probe.studies.guided import (
    BASELINE,
    NO_GUIDANCE,
    StudyPart,
    configurations,
    guided_rows,
    study_prompts,
)
from probe.studies.registry import Study, register
from probe.studies.shards import Shard

SELF_CROSS_SEED = HELD_OUT_SEED + 50_000  # seeds of the self-cross study's images
SIMILAR_SET = "shapes-similar"  # confusable subjects (red/orange, blue/purple, circle/ellipse)
SELF_CROSS_METHODS = (NO_GUIDANCE, "ae", "self_cross")
SELF_CROSS_IMAGES = 320  # 64 similar-subject prompts × 5 seeds
QUICK_SELF_CROSS_IMAGES = 4



@dataclass
class SelfCrossStudy:
    """``images``: one row per image; ``summary``: per (method, initno) the three exclusive outcomes' rates, the
    manipulation check and every comparison with A&E and with no guidance as columns; ``comparisons``: those
    comparisons, one row per (method, initno, reference, outcome)."""

    images: pd.DataFrame
    summary: pd.DataFrame
    step_sizes: pd.DataFrame  # the step-size calibration (empty where the step sizes were given)
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)


def self_cross_tables(images: pd.DataFrame, n_boot: int = BOOTSTRAPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary and comparisons (:func:`probe.studies.guidance.study_tables`, no pool: one overlap arm) from the
    per-image rows alone (``self_cross_images.csv`` reproduces the headline)."""
    return study_tables(images, candidates=(), n_boot=n_boot)


def self_cross_summary(images: pd.DataFrame, n_boot: int = BOOTSTRAPS) -> pd.DataFrame:
    """Per (method, initno): all present, missing and mixed (exclusive) with intervals over object sets, the
    manipulation check, and each comparison with A&E and with no guidance (:func:`self_cross_tables`)."""
    return self_cross_tables(images, n_boot)[0]


def self_cross_study(pipe, n_images: int = SELF_CROSS_IMAGES, steps: int = STEPS, quick: bool = False,
                     out: str | Path | None = None, methods: Sequence[str] = SELF_CROSS_METHODS,
                     progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                     sets: Sequence[str] = (SIMILAR_SET,),
                     subject: Subject = "noun", judge: Judge = exact_judge,
                     guidance_scale: float = GUIDANCE, schedule: Schedule | None = None,
                     step_sizes: Mapping[str, float] | None = None, initno: Sequence[bool] = (False, True),
                     initno_settings: InitNO | None = None, seed_offset: int = 0,
                     min_effects: Mapping[str, float] | None = None, shard: Shard | None = None,
                     calibrate_only: bool = False) -> SelfCrossStudy | StudyPart:
    """Subject mixing on similar subjects (Self-Cross guidance's claim): "a red circle and an orange ellipse".

    Prompts of ``sets`` (default ``shapes-similar``; SSD-2 / SSD-3 on a real model) × seeds, each method without
    and with INITNO (Self-Cross's paper runs on INITNO's initial-noise optimisation; ``none`` without only),
    through :func:`guided_images`. Per (method, initno): the share of images with any subject missing, else any
    judged "mixed" (a blend or swapped attributes), else all present, each with an interval over object sets, and
    the paired differences from A&E (same ``initno``) and from no guidance on all three (Holm per outcome, all
    present the primary one; :func:`probe.studies.guidance.comparison_table`). ``quick``: at most 4
    images (4 prompts, one seed), at most 20 steps, at most 5 refinement iterations, a short INITNO, 200
    bootstrap resamples.
    Step sizes as in :func:`guidance_study` (calibrated on pilot prompts unless ``step_sizes`` gives them).
    With ``out``, resumable like :func:`guidance_study` (rows in ``out/self_cross_images.csv``). ``seed_offset`` and
    ``min_effects``, ``calibrate_only`` and ``shard`` as in :func:`guidance_study` (a registered run's own seeds; the
    step-size pilot's smallest changes; the calibration alone, one shard's rows).
    """
    pipe = load(pipe)
    n_images = whole_number(n_images, "n_images", "the number of (prompt, seed) pairs per method")
    seeds_per_prompt = whole_number(seeds_per_prompt, "seeds_per_prompt", "the number of seeds of each prompt")
    seed_offset = whole_number(seed_offset, "seed_offset", "added to every seed of the study", minimum=0)
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "self_cross")
    if quick:
        n_images, seeds_per_prompt, steps = min(n_images, QUICK_SELF_CROSS_IMAGES), 1, min(steps, QUICK_STEPS)
        schedule, initno_settings = schedule or QUICK_SCHEDULE, initno_settings or QUICK_INITNO
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    seeds = [SELF_CROSS_SEED + seed_offset + i for i in range(seeds_per_prompt)]
    options = {"guidance_scale": guidance_scale, "subject": subject, "judge": judge, "schedule": schedule}
    found = guided_rows(pipe, "self_cross", out, methods, sets, prompts, seeds, configurations(methods, initno),
                        steps=steps, step_sizes=step_sizes, quick=quick, progress=progress, min_effects=min_effects,
                        shard=shard, calibrate_only=calibrate_only, initno_settings=initno_settings,
                        desc="self-cross study", **options)
    if isinstance(found, StudyPart):  # the calibration alone, or one shard's rows
        return found
    images, calibration = found
    summary, comparisons = self_cross_tables(images, n_boot)
    figures = {"self_cross_mixing": plots.outcome_rates(summary, CATEGORIES, baseline=BASELINE)}
    return SelfCrossStudy(images, summary, calibration, figures, save_figures(figures, out), comparisons)


def self_cross_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (method, initno), most images with every subject present first: the three outcomes, every comparison with
    A&E and with no guidance, the manipulation check, overlap and Self-Cross's own statistic at step 10."""
    return ranked_headline(summary, ("soft_iou_t10", "self_cross_t10"))


def _check_text(row: pd.Series) -> str:
    """Self-Cross's manipulation check: soft IoU at step 10 against no guidance and against A&E (intervals over object
    sets) and how often its loss fell; a failed check says the comparison tells nothing about the method."""
    moved, low, high = (float(row.get(c, float("nan"))) for c in
                        ("iou_t10_vs_none", "iou_t10_vs_none_ci_low", "iou_t10_vs_none_ci_high"))
    text = f"Self-Cross's manipulation check: soft IoU at step 10 {signed_text(moved)} [{low:+.3f}, {high:+.3f}] " \
           "from unguided generation"
    vs_ae = [float(row.get(f"iou_t10_vs_ae{part}", float("nan"))) for part in ("", "_ci_low", "_ci_high")]
    if not math.isnan(vs_ae[0]):  # A&E's own term separates the subjects' maps too
        where = "below A&E's own" if vs_ae[2] < 0 else "above A&E's own" if vs_ae[1] > 0 else "no clear difference"
        text += f" and {signed_text(vs_ae[0])} [{vs_ae[1]:+.3f}, {vs_ae[2]:+.3f}] from A&E's ({where})"
    fell = float(row.get("loss_fell", float("nan")))
    if not math.isnan(fell):
        text += f", its loss fell in {fell:.0%} of images (median {row.loss_start_median:.3f} → " \
                f"{row.loss_end_median:.3f})"
    return text + (": passed" if truthy(row.get("manipulated")) else
                   ": failed, so the comparisons say nothing about the method")


def self_cross_answer(headline: pd.DataFrame) -> str:
    """Per INITNO setting: Self-Cross against A&E and against no guidance, and A&E against no guidance, on all three
    outcomes (all present primary; each Holm-corrected verdict, harms included), Self-Cross's manipulation check,
    and every harm."""
    parts = []
    for prefix, table in initno_groups(headline):
        row, ae = row_where(table, method="self_cross"), row_where(table, method=BASELINE)
        clauses = [] if row is None else [contrast_text(row, reference) for reference in REFERENCES]
        clauses += [contrast_text(ae, NO_GUIDANCE)] if ae is not None else []
        clauses = [c for c in clauses if c]
        if row is None or not clauses:
            continue
        parts.append(prefix + ". ".join([*clauses, _check_text(row), harms_text(table)]) + ".")
    if not parts:
        return "Self-Cross was not compared with Attend-and-Excite or no guidance."
    return " ".join([*parts, _paper_text(headline)]).strip()


def _paper_text(headline: pd.DataFrame) -> str:
    """Whether the table confirms Self-Cross's claim that it lowers subject mixing: a Holm-significant fall in mixing
    against A&E, in how many INITNO settings."""
    rows = headline[headline.method == "self_cross"]
    if rows.empty or "mixed_vs_ae_p_holm" not in rows:
        return ""
    lower = int(((rows.mixed_vs_ae < 0) & (rows.mixed_vs_ae_p_holm < ALPHA)).sum())
    higher = int(((rows.mixed_vs_none > 0) & (rows.mixed_vs_none_p_holm < ALPHA)).sum())
    verdict = "confirmed" if lower == len(rows) else "partly confirmed" if lower else "not confirmed"
    return (f"Self-Cross's paper claims it lowers subject mixing: here it lowers mixing below A&E's in {lower} of "
            f"{len(rows)} INITNO settings and raises it above no guidance's in {higher} of {len(rows)} (Holm α = "
            f"{ALPHA:g}), so the claim is {verdict} on this model.")


def holm_family_text(headline: pd.DataFrame | None = None) -> str:
    """The Self-Cross study's Holm families and tests, as the report writes them into its section."""
    return family_text(headline, pool=False)


add_section_text("self_cross", outcome_text)
add_section_text("self_cross", holm_family_text)
register(Study(
    name="self_cross", title="Self-Cross guidance on similar subjects: mixing", order=50, run=self_cross_study,
    tables=lambda study: {"self_cross_summary": study.summary, "self_cross_comparisons": study.comparisons,
                          "self_cross_step_sizes": study.step_sizes},  # images: stored as they are made
    headline=lambda study: self_cross_headline(study.summary),
    source="self_cross_images", recompute=lambda table, n_boot: self_cross_headline(self_cross_summary(table, n_boot)),
    answer=self_cross_answer, figures=("self_cross_mixing",), aliases=("self-cross",)))
