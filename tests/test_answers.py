"""Each study's one-sentence answer states the numbers of its headline table, with the sign and verdict a reader
would give them by hand."""

import pandas as pd

from probe.studies.guidance import guidance_answer
from probe.studies.probing import probe_answer
from probe.studies.self_cross import self_cross_answer

NAN = float("nan")


def _guidance_row(method, diff, low, high, mixed=NAN, mixed_low=NAN, mixed_high=NAN, **extra):
    return {"method": method, "initno": False, "n": 300, "diff_vs_ae": diff, "diff_ci_low": low, "diff_ci_high": high,
            "verdict": extra.pop("verdict", "no clear difference from ae"),
            "p_holm": extra.pop("p_holm", NAN), "mixed_diff_vs_ae": mixed, "mixed_diff_ci_low": mixed_low,
            "mixed_diff_ci_high": mixed_high, "mixed_p_holm": NAN, "loss_fell": extra.pop("loss_fell", NAN),
            "iou_t10_vs_none": extra.pop("iou_t10_vs_none", NAN), "iou_end_vs_none": extra.pop("iou_end_vs_none", NAN),
            "iou_t10_diff_vs_ae": extra.pop("against", NAN), "iou_t10_diff_ci_low": extra.pop("against_low", NAN),
            "iou_t10_diff_ci_high": extra.pop("against_high", NAN)}


def test_guidance_answer_turns_none_minus_ae_into_the_control_effect_and_reads_the_pooled_row():
    table = pd.DataFrame([
        _guidance_row("none", 0.08, 0.04, 0.12, p_holm=0.001, verdict="more missing than ae"),  # none misses more
        _guidance_row("ae", NAN, NAN, NAN),
        _guidance_row("overlap methods (pooled)", 0.01, -0.02, 0.04, 0.05, 0.01, 0.09, loss_fell=0.9,
                      iou_t10_vs_none=-0.08, iou_end_vs_none=-0.04, against=-0.03, against_low=-0.05,
                      against_high=-0.01),
    ])
    answer = guidance_answer(table)
    assert "changed missing by -8.0 points [-12.0, -4.0] against no guidance (300 pairs, Holm p = 0.001)" in answer
    assert "the positive control holds" in answer
    assert "missing by +1.0 points [-2.0, +4.0]" in answer and "mixing by +5.0 points [+1.0, +9.0]" in answer
    assert "fell in 90% of images" in answer and "-0.080 at step 10 (50% of it left at the end)" in answer
    assert "and -0.030 [-0.050, -0.010] from A&E's images" in answer
    assert "did not clearly change entity missing" in answer
    table.loc[0, ["diff_vs_ae", "diff_ci_low", "diff_ci_high", "verdict"]] = [0.03, -0.01, 0.07,
                                                                          "no clear difference from ae"]
    assert "is not met at this size" in guidance_answer(table)
    table.loc[2, ["diff_vs_ae", "diff_ci_low", "diff_ci_high", "verdict"]] = [0.2, 0.15, 0.29,
                                                                          "more missing than ae"]  # Holm: more
    assert "so guidance that lowers overlap raised entity missing relative to" in guidance_answer(table)
    table.loc[2, ["iou_t10_diff_vs_ae", "iou_t10_diff_ci_high"]] = [0.004, 0.01]  # no lower than A&E's own overlap
    assert "cannot tell whether lower overlap lowers missing beyond A&E" in guidance_answer(table)
    table.loc[2, ["iou_t10_diff_vs_ae", "iou_t10_diff_ci_high"]] = [-0.03, -0.01]
    table.loc[2, "loss_fell"] = 0.44  # the objective mostly did not fall: the manipulation check fails
    assert "does not test whether lower overlap lowers missing" in guidance_answer(table)
    table.loc[2, ["loss_fell", "iou_t10_vs_none"]] = [0.9, 0.05]  # it fell, but overlap rose: fails as well
    assert "does not test whether lower overlap lowers missing" in guidance_answer(table)


def test_self_cross_answer_says_a_guidance_that_did_not_act_tells_nothing():
    row = {"method": "self_cross", "n": 130, "mixed_diff_vs_ae": 0.054, "mixed_diff_ci_low": 0.008,
           "mixed_diff_ci_high": 0.1, "mixed_p_holm": 0.127, "loss_fell": 0.16, "loss_start_median": 0.947,
           "loss_end_median": 0.995, "mixed_verdict": "no clear difference from ae"}
    answer = self_cross_answer(pd.DataFrame([row]))
    assert "+5.4 points [+0.8, +10.0]" in answer and "fell in 16% of images" in answer
    assert "did not act" in answer
    acted = {**row, "loss_fell": 0.9}  # the verdict is the study's Holm-corrected one, not the raw interval's
    assert "it did not clearly change mixing" in self_cross_answer(pd.DataFrame([acted]))
    assert "it raised mixing" in self_cross_answer(pd.DataFrame([{**acted, "mixed_verdict": "more mixed than ae"}]))
    both = self_cross_answer(pd.DataFrame([{**acted, "initno": False},
                                           {**acted, "initno": True, "mixed_diff_vs_ae": -0.1,
                                            "mixed_verdict": "less mixed than ae"}]))  # one clause per initno
    assert both.startswith("Without INITNO, Self-Cross changed mixing") and "; with INITNO, " in both
    assert "-10.0 points" in both and "it lowered mixing" in both


def test_probe_answer_needs_disjoint_intervals_for_better():
    def rows(target, self_acc, self_ci, cross_acc, cross_ci):
        return [{"target": target, "kind": "self", "accuracy": self_acc, "ci_low": self_ci[0], "ci_high": self_ci[1]},
                {"target": target, "kind": "cross", "accuracy": cross_acc, "ci_low": cross_ci[0],
                 "ci_high": cross_ci[1]}]
    table = pd.DataFrame(rows("position", 0.9, (0.85, 0.94), 0.7, (0.64, 0.76))
                         + rows("size", 0.6, (0.55, 0.65), 0.62, (0.57, 0.67)))
    answer = probe_answer(table)
    assert "on 1 of 2 targets" in answer and "position: self 0.90 vs cross 0.70, better" in answer
    assert "size: self 0.60 vs cross 0.62, as well" in answer and "partly confirmed" in answer


def test_editing_answer_gives_both_injections_against_no_injection():
    from probe.studies.editing import editing_answer

    def row(inject, diff, low, high, success):
        return {"edit": "colour", "origin": "generated", "inject": inject, "iou_vs_none": diff,
                "iou_vs_none_ci_low": low, "iou_vs_none_ci_high": high, "success_rate": success}
    answer = editing_answer(pd.DataFrame([row("none", NAN, NAN, NAN, 1.0), row("self", 0.001, -0.006, 0.01, 1.0),
                                          row("cross", 0.42, 0.25, 0.61, 0.95)]))
    assert "self +0.001 [-0.006, +0.010] (no clear difference), success 100%" in answer
    assert "cross +0.420 [+0.250, +0.610], success 95%" in answer
