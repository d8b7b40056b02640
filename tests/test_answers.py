"""Each study's one-sentence answer states the numbers of its headline table, with the sign and verdict a reader
would give them by hand."""

import pandas as pd

from probe.studies.probing import probe_answer
from probe.studies.self_cross import self_cross_answer

NAN = float("nan")


def _contrasts(reference: str, all_present=(NAN, NAN, NAN, NAN), missing=(NAN, NAN, NAN, NAN),
               mixed=(NAN, NAN, NAN, NAN)) -> dict:
    """A headline row's columns for the three outcomes against ``reference``: (difference, low, high, Holm p)."""
    out = {}
    for outcome, values in (("all_present", all_present), ("missing", missing), ("mixed", mixed)):
        name = f"{outcome}_vs_{reference}"
        out.update(dict(zip([name, f"{name}_ci_low", f"{name}_ci_high", f"{name}_p_holm"], values)))
    return out


def _guidance_row(method, pool="", **extra):
    return {"method": method, "initno": False, "n": 300, "pool": pool, "manipulated": extra.pop("manipulated", True),
            "loss_fell": extra.pop("loss_fell", NAN), "iou_t10_vs_none": extra.pop("iou_t10_vs_none", NAN),
            "iou_end_vs_none": extra.pop("iou_end_vs_none", NAN), "iou_t10_vs_ae": extra.pop("against", NAN),
            "iou_t10_vs_ae_ci_low": extra.pop("against_low", NAN),
            "iou_t10_vs_ae_ci_high": extra.pop("against_high", NAN), **extra}


def test_guidance_findings_read_the_control_every_method_and_the_pool_with_its_exclusions():
    from probe.studies.guidance import POOLED, guidance_findings

    table = pd.DataFrame([
        _guidance_row("ae", **_contrasts("none", (0.08, 0.04, 0.12, 0.0004), (-0.1, -0.14, -0.06, 0.0002),
                                          (0.02, -0.01, 0.05, 0.4))),
        _guidance_row("none", manipulated=NAN),
        _guidance_row("iou", "pooled", against=-0.01, against_low=-0.02, against_high=-0.005,
                      **_contrasts("ae", (0.01, -0.02, 0.04, 0.6), (-0.05, -0.08, -0.02, 0.01),
                                   (0.04, 0.01, 0.07, 0.02)),
                      **_contrasts("none", (0.09, 0.05, 0.13, 0.001), (-0.15, -0.2, -0.1, 0.001),
                                   (0.06, 0, 0.1, 0.3))),
        _guidance_row("kl", "left out: failed the manipulation check", manipulated=False,
                      **_contrasts("ae", (-0.02, -0.05, 0.01, 0.5), (0.02, -0.01, 0.05, 0.5), (0, -0.03, 0.03, 1))),
        _guidance_row("self_cross", "left out: contains A&E's own term",
                      **_contrasts("ae", (-0.05, -0.09, -0.01, 0.2), (-0.04, -0.08, 0, 0.3),
                                   (0.09, 0.05, 0.13, 0.004))),
        _guidance_row("com", "pooled", **_contrasts("ae", *[(0, -0.03, 0.03, 1)] * 3)),
        _guidance_row(POOLED, loss_fell=0.9, iou_t10_vs_none=-0.08, iou_end_vs_none=-0.04, against=-0.03,
                      against_low=-0.05, against_high=-0.01,
                      **_contrasts("ae", (0.01, -0.02, 0.04, 0.3), (-0.03, -0.06, 0.0, 0.2), (0.02, -0.01, 0.05, 0.4))),
    ])
    answer = guidance_findings(table)
    assert answer.startswith("Positive control, A&E vs no guidance: all present +8.0 points [+4.0, +12.0] "
                             "(Holm p < 0.001, gain), missing -10.0 (Holm p < 0.001, gain), mixing +2.0 (Holm p = 0.4, "
                             "no clear difference) (300 pairs): the positive control holds")
    assert "IoU vs A&E: all present +1.0 points [-2.0, +4.0] (Holm p = 0.6, no clear difference), missing -5.0 " \
           "(Holm p = 0.01, gain), mixing +4.0 (Holm p = 0.02, harm); IoU vs no guidance: all present" in answer
    assert "Pooled test of the overlap arms that passed the manipulation check (soft IoU at step 10 below " \
           "unguided generation's, interval below 0): IoU and CoM; left out before pooling: Self-Cross (contain " \
           "A&E's own term" in answer and "KL (failed the pre-declared manipulation check" in answer
    assert "Soft IoU at step 10 against A&E's own: lower for IoU -0.010 [-0.020, -0.005]" in answer
    assert "moved -0.080 from unguided generation (50% of it left at the end) and -0.030 [-0.050, -0.010]" in answer
    assert "so guidance that lowers overlap below A&E's did not clearly change the share" in answer
    assert "Harms at Holm α = 0.05: IoU mixing +4.0 points vs A&E (Holm p = 0.02); Self-Cross mixing +9.0 points " \
           "vs A&E (Holm p = 0.004)" in answer
    table.loc[0, "all_present_vs_none_p_holm"] = 0.2
    assert "the positive control is not met (no clear rise at this size), so where a comparison below shows no " \
           "clear difference" in guidance_findings(table)
    table.loc[0, ["all_present_vs_none", "all_present_vs_none_p_holm"]] = [-0.08, 0.001]
    assert "the positive control is not met (A&E lowered the share with every subject present)" in \
        guidance_findings(table)
    table.loc[0, ["all_present_vs_none", "all_present_vs_none_p_holm"]] = [0.08, 0.2]
    table.loc[6, "iou_t10_vs_ae_ci_high"] = 0.01  # no lower than A&E's own overlap
    assert "cannot tell whether lower overlap helps beyond A&E" in guidance_findings(table)
    table.loc[6, "manipulated"] = False  # the pool did not lower overlap at all
    assert "the pool did not lower overlap, so this does not test" in guidance_findings(table)
    only = table[~table.method.isin(["com", POOLED])]
    assert "IoU; left out" in guidance_findings(only) and "there is no pooled test" in guidance_findings(only)


def test_self_cross_answer_names_both_sides_and_says_a_failed_check_tells_nothing():
    row = {"method": "self_cross", "initno": False, "n": 130, "loss_fell": 0.16, "loss_start_median": 0.947,
           "loss_end_median": 0.995, "iou_t10_vs_none": 0.01, "iou_t10_vs_none_ci_low": -0.01,
           "iou_t10_vs_none_ci_high": 0.03, "manipulated": False,
           **_contrasts("ae", (0.054, 0.008, 0.1, 0.127), (-0.01, -0.03, 0.01, 1), (-0.044, -0.09, 0, 0.2)),
           **_contrasts("none", (0.1, 0.05, 0.15, 0.001), (-0.2, -0.25, -0.15, 0.0001), (0.1, 0.05, 0.15, 0.002))}
    answer = self_cross_answer(pd.DataFrame([row]))
    assert answer.startswith("Self-Cross vs A&E: all present +5.4 points [+0.8, +10.0] (Holm p = 0.13, no clear ")
    assert "Self-Cross vs no guidance: all present +10.0 points" in answer and "mixing +10.0 (Holm p = 0.002, harm)" \
        in answer
    assert "fell in 16% of images" in answer and "failed, so the comparisons say nothing about the method" in answer
    assert "Harms at Holm α = 0.05: Self-Cross mixing +10.0 points vs no guidance (Holm p = 0.002)" in answer
    passed = {**row, "manipulated": True, "iou_t10_vs_none_ci_high": -0.001}
    assert ": passed" in self_cross_answer(pd.DataFrame([passed]))
    both = self_cross_answer(pd.DataFrame([{**passed, "initno": False}, {**passed, "initno": True}]))
    assert both.startswith("Without INITNO: Self-Cross vs A&E") and " With INITNO: Self-Cross vs A&E" in both
    # the paper's claim (lower mixing than A&E) read from the Holm verdicts: mixing -4.4 vs A&E at p 0.2 is no fall
    assert both.endswith("here it lowers mixing below A&E's in 0 of 2 INITNO settings and raises it above no "
                         "guidance's in 2 of 2 (Holm α = 0.05), so the claim is not confirmed on this model.")
    lowered = {**passed, "mixed_vs_ae_p_holm": 0.01}
    mixed = self_cross_answer(pd.DataFrame([{**lowered, "initno": False}, {**passed, "initno": True}]))
    assert "below A&E's in 1 of 2" in mixed and "partly confirmed" in mixed
    overlap = {**passed, "iou_t10_vs_ae": 0.007, "iou_t10_vs_ae_ci_low": 0.002, "iou_t10_vs_ae_ci_high": 0.013}
    assert "and +0.007 [+0.002, +0.013] from A&E's (above A&E's own)" in self_cross_answer(pd.DataFrame([overlap]))


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

    def row(inject, diff, low, high, success, p_holm=NAN):
        return {"edit": "colour", "origin": "generated", "inject": inject, "iou_vs_none": diff,
                "iou_vs_none_ci_low": low, "iou_vs_none_ci_high": high, "success_rate": success,
                "iou_vs_none_p_holm": p_holm}
    answer = editing_answer(pd.DataFrame([row("none", NAN, NAN, NAN, 1.0),
                                          row("self", 0.001, -0.006, 0.01, 1.0, 0.8),
                                          row("cross", 0.42, 0.25, 0.61, 0.95, 0.0004)]))
    assert "self +0.001 [-0.006, +0.010] (no clear difference, Holm p = 0.8), success 100%" in answer
    assert "cross +0.420 [+0.250, +0.610] (Holm p < 0.001), success 95%" in answer
    untested = editing_answer(pd.DataFrame([row("cross", 0.42, 0.25, 0.61, 0.95)]))  # an interval alone is no test
    assert "cross +0.420 [+0.250, +0.610] (no clear difference, no test over prompt pairs), success 95%" in untested
