"""Self-Cross guidance on similar subjects: does it lower subject mixing?"""

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
from probe.studies.answers import acted, direction_of, interval_text, p_text, points_text
from probe.studies.common import BOOTSTRAPS, QUICK_BOOTSTRAPS, QUICK_STEPS, Judge, Subject, rows_path, save_figures
from probe.studies.guidance import (
    GUIDANCE_SEEDS_PER_PROMPT,
    QUICK_INITNO,
    QUICK_SCHEDULE,
    outcome_summary,
    versus_baseline,
    with_versus,
)
from probe.studies.guided import (
    BASELINE,
    NO_GUIDANCE,
    configurations,
    guided_images,
    study_prompts,
    study_steps,
)
from probe.studies.registry import Study, register

SELF_CROSS_SEED = HELD_OUT_SEED + 50_000  # seeds of the self-cross study's images
SIMILAR_SET = "shapes-similar"  # confusable subjects (red/orange, blue/purple, circle/ellipse)
SELF_CROSS_METHODS = (NO_GUIDANCE, "ae", "self_cross")
SELF_CROSS_IMAGES = 320  # 64 similar-subject prompts × 5 seeds
QUICK_SELF_CROSS_IMAGES = 4



@dataclass
class SelfCrossStudy:
    """``images``: one row per image; ``summary``: mixing and missing rates per method with intervals."""

    images: pd.DataFrame
    summary: pd.DataFrame
    step_sizes: pd.DataFrame  # the step-size calibration (empty where the step sizes were given)
    figures: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def self_cross_summary(images: pd.DataFrame, n_boot: int = BOOTSTRAPS) -> pd.DataFrame:
    """Per (method, initno): mixing and missing rates and mixing's paired difference from A&E, from the per-image
    rows alone (``self_cross_images.csv`` reproduces the headline)."""
    summary = outcome_summary(images, ("mixed", "missing"), pooled=(), n_boot=n_boot)
    return with_versus(summary, versus_baseline(images, "mixed", pooled=(), n_boot=n_boot), "mixed_")


def self_cross_study(pipe, n_images: int = SELF_CROSS_IMAGES, steps: int = STEPS, quick: bool = False,
                     out: str | Path | None = None, methods: Sequence[str] = SELF_CROSS_METHODS,
                     progress: bool = True, *, seeds_per_prompt: int = GUIDANCE_SEEDS_PER_PROMPT,
                     sets: Sequence[str] = (SIMILAR_SET,),
                     subject: Subject = "noun", judge: Judge = exact_judge,
                     guidance_scale: float = GUIDANCE, schedule: Schedule | None = None,
                     step_sizes: Mapping[str, float] | None = None, initno: Sequence[bool] = (False, True),
                     initno_settings: InitNO | None = None) -> SelfCrossStudy:
    """Subject mixing on similar subjects (Self-Cross guidance's claim): "a red circle and an orange ellipse".

    Prompts of ``sets`` (default ``shapes-similar``; SSD-2 / SSD-3 on a real model) × seeds, each method without
    and with INITNO (Self-Cross's paper runs on INITNO's initial-noise optimisation; ``none`` without only),
    through :func:`guided_images`. Per (method, initno): the rate of images with any subject judged "mixed" (a blend
    or swapped attributes) and with any subject missing, each with an interval over prompts, and the paired
    difference of the mixing rate from A&E at the same ``initno`` (Holm over the methods). ``quick``: at most 4
    images (4 prompts, one seed), at most 20 steps, at most 5 refinement iterations, a short INITNO, 200
    bootstrap resamples.
    Step sizes as in :func:`guidance_study` (calibrated on pilot prompts unless ``step_sizes`` gives them).
    With ``out``, resumable like :func:`guidance_study` (rows in ``out/self_cross_images.csv``).
    """
    pipe = load(pipe)
    n_images = whole_number(n_images, "n_images", "the number of (prompt, seed) pairs per method")
    seeds_per_prompt = whole_number(seeds_per_prompt, "seeds_per_prompt", "the number of seeds of each prompt")
    steps = step_count(steps)
    require_shapes_world(pipe, judge, "self_cross")
    if quick:
        n_images, seeds_per_prompt, steps = min(n_images, QUICK_SELF_CROSS_IMAGES), 1, min(steps, QUICK_STEPS)
        schedule, initno_settings = schedule or QUICK_SCHEDULE, initno_settings or QUICK_INITNO
    n_boot = QUICK_BOOTSTRAPS if quick else BOOTSTRAPS
    prompts = study_prompts(sets, n_images, seeds_per_prompt)
    seeds = [SELF_CROSS_SEED + i for i in range(seeds_per_prompt)]
    options = {"guidance_scale": guidance_scale, "subject": subject, "judge": judge, "schedule": schedule}
    sizes, calibration = study_steps(pipe, methods, sets, prompts, seeds, steps=steps, step_sizes=step_sizes,
                                     quick=quick, progress=progress, **options)
    images = guided_images(pipe, prompts, seeds, configurations(methods, initno), steps=steps, step_sizes=sizes,
                           initno_settings=initno_settings, progress=progress, desc="self-cross study",
                           store=rows_path(out, "self_cross_images"), **options)
    summary = self_cross_summary(images, n_boot)
    figures = {"self_cross_mixing": plots.outcome_rates(summary, ("mixed", "missing"), baseline=BASELINE)}
    return SelfCrossStudy(images, summary, calibration, figures, save_figures(figures, out))


def self_cross_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (method, initno), least mixing first: mixing and missing rates (CIs), mixing minus A&E's (paired CI),
    the manipulation check, overlap."""
    columns = ["method", "initno", "n", "mixed_rate", "mixed_ci_low", "mixed_ci_high", "missing_rate",
               "missing_ci_low", "missing_ci_high", f"mixed_diff_vs_{BASELINE}", "mixed_diff_ci_low",
               "mixed_diff_ci_high", "mixed_p_holm", "mixed_verdict", "loss_start_median", "loss_end_median",
               "loss_fell", "step_size", "iou_t10_vs_none", "iou_end_vs_none", "soft_iou_t10", "self_cross_t10",
               "quality", "seconds_per_image"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    return summary[columns].sort_values(["mixed_rate", "method"], kind="stable").reset_index(drop=True)


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
        verdict = (f"it {direction_of(str(row.mixed_verdict))} mixing" if acted(row) else
                   "the guidance did not act, so the comparison says nothing about the method")
        with_initno = str(row.get("initno", False)).lower() == "true"
        parts.append(f"{'with' if with_initno else 'without'} INITNO, Self-Cross changed mixing of similar subjects "
                     f"by {points_text(diff)} {interval_text(low, high)} against Attend-and-Excite ({int(row.n)} pairs"
                     f"{p_text(row.get('mixed_p_holm'))}){check}: {verdict}")
    if not parts:
        return "Self-Cross was not compared with Attend-and-Excite."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


register(Study(
    name="self_cross", title="Self-Cross guidance on similar subjects: mixing", order=50, run=self_cross_study,
    tables=lambda study: {"self_cross_summary": study.summary,  # images: stored as they are made
                          "self_cross_step_sizes": study.step_sizes},
    headline=lambda study: self_cross_headline(study.summary),
    source="self_cross_images", recompute=lambda table, n_boot: self_cross_headline(self_cross_summary(table, n_boot)),
    answer=self_cross_answer, figures=("self_cross_mixing",), aliases=("self-cross",)))
