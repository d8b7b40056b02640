"""The audit of the probe and editing studies: equal search budgets with selection inside nested cross-validation,
and many prompt pairs per edit with sign-flip tests over pairs and Holm over the headline rows. Each check compares
against a computation made here by hand."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from probe.analysis.probes import (
    FeatureKey,
    LinearProbe,
    nested_probe_features,
    probe_features,
    search_space,
    wilson_interval,
)
from probe.shapes.judge import parse_prompt
from probe.shapes.world import COLOURS, SHAPES
from probe.steer.edit import EDITS
from probe.studies.editing import edit_headline, edit_pairs, edit_summary, editing_answer, holm_family
from probe.studies.probing import attribute_sentence, probe_answer, probe_headline

ARMS = (("cross", "map"), ("self", "mean"), ("self", "aggregated"))


def _noise_features(n: int, seed: int, resolutions=(8,)) -> tuple[dict, dict]:
    """Blocks of pure noise for every arm, and a label no feature carries."""
    rng = np.random.default_rng(seed)
    features = {FeatureKey(kind, feature, res, f"l{layer}", b): rng.normal(size=(n, 4))
                for kind, feature in ARMS for res in resolutions for layer in range(6)
                for b in ("early", "middle", "late")}
    return features, {"y": rng.permutation(np.repeat(["a", "b"], n // 2))}


def test_nested_score_stays_at_chance_where_the_best_of_n_does_not():
    features, labels = _noise_features(120, seed=0)
    blocks = probe_features(features, labels)
    old = probe_headline(blocks)  # a table without nested rows: the best block per arm, as the study reported it
    best_self = old[old.kind == "self"].sort_values("accuracy").iloc[-1]
    assert best_self.ci_low > 0.5  # the best of 36 self set-ups looks above chance by its own interval
    nested = nested_probe_features(features, labels)
    assert set(zip(nested.kind, nested.feature)) == set(ARMS)
    for row in nested.itertuples():
        assert row.chance == 0.5 and row.ci_low <= 0.5 <= row.ci_high  # at chance: no feature carries the label
        arm = blocks[(blocks.kind == row.kind) & (blocks.feature == row.feature)]
        assert row.best_of_n == pytest.approx(arm.accuracy.max())  # the old score, on the same outer folds
        assert row.accuracy < row.best_of_n
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(round(row.accuracy * 120), 120))


def test_every_arm_searches_the_same_number_of_set_ups():
    features, labels = _noise_features(60, seed=1)
    rng = np.random.default_rng(2)
    for layer in range(3):  # cross-attention alone at a finer grid, as on a large model: not searched
        features[FeatureKey("cross", "map", 32, f"fine{layer}", "late")] = rng.normal(size=(60, 4))
    space = search_space(features)
    assert [len(keys) for keys in space.values()] == [18, 18, 18]
    assert all(key.resolution == 8 for keys in space.values() for key in keys)
    assert [(k.resolution, k.layer, k.step_bin) for k in space["cross", "map"]] == \
        [(k.resolution, k.layer, k.step_bin) for k in space["self", "aggregated"]]
    nested = nested_probe_features(features, labels, Cs=(0.1, 1.0))
    assert set(nested.n_candidates) == {36}  # 18 blocks × 2 regularisation strengths, for every arm
    assert set(nested.C) <= {0.1, 1.0}


def test_nested_with_one_set_up_is_plain_cross_validation():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 5))
    y = np.where(X[:, 0] + 0.5 * rng.normal(size=80) > 0, "a", "b")
    probe = LinearProbe()
    plain = probe.cross_validate(X, y)
    nested = probe.nested_cross_validate([X], y)
    assert nested.score == plain and nested.best_of_n == plain.accuracy and nested.n_candidates == 1
    assert nested.chosen == 0 and nested.chosen_folds == plain.folds


def _headline_row(target, kind, feature, accuracy, low, high, search="nested"):
    return {"target": target, "given_by_prompt": target == "colour", "kind": kind, "feature": feature,
            "accuracy": accuracy, "ci_low": low, "ci_high": high, "chance": 0.2, "search": search,
            "n_candidates": 30, "best_of_n": accuracy}


def test_the_headline_reads_nested_rows_not_the_best_block():
    block = {"kind": "self", "feature": "mean", "resolution": 8, "layer": "l0", "step_bin": "late", "target": "size",
             "ci_low": 0.8, "ci_high": 0.95, "chance": 0.34, "n": 100, "n_classes": 3, "folds": 5, "search": "block",
             "n_candidates": 1, "best_of_n": math.nan, "chosen_folds": math.nan, "C": 0.1}
    table = pd.DataFrame([{**block, "accuracy": 0.9}, {**block, "layer": "l1", "accuracy": 0.7},
                          {**block, "accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.7, "search": "nested",
                           "n_candidates": 2, "best_of_n": 0.9, "chosen_folds": 3}])
    row = probe_headline(table).iloc[0]
    assert (row.accuracy, row.best_of_n, row.n_candidates, row.search) == (0.6, 0.9, 2, "nested")


def test_the_attribute_sentence_is_written_from_the_numbers():
    today = pd.DataFrame([_headline_row("colour", "self", "aggregated", 0.771825, 0.733213, 0.806326, "best block"),
                          _headline_row("colour", "self", "mean", 0.75, 0.710401, 0.785817, "best block"),
                          _headline_row("colour", "cross", "map", 0.420635, 0.378296, 0.464175, "best block")])
    assert attribute_sentence(today) == ("Colour (as the prompt named it) is carried far better by self-attention "
                                         "(0.77) than by cross-attention (0.42), against FPE's claim that "
                                         "cross-attention carries attributes.")
    flipped = today.assign(kind=today.kind.map({"self": "cross", "cross": "self"}),
                           feature=today.feature.map({"aggregated": "map", "map": "aggregated", "mean": "mean"}))
    assert "better by cross-attention (0.77) than by self-attention (0.42), as FPE claims" in \
        attribute_sentence(flipped)
    close = today.assign(accuracy=[0.5, 0.5, 0.45], ci_low=[0.4, 0.4, 0.35], ci_high=[0.6, 0.6, 0.55])
    assert "about as well by self-attention (0.50) as by cross-attention (0.45)" in attribute_sentence(close)
    layout = pd.DataFrame([_headline_row("position", "self", "aggregated", 0.9, 0.85, 0.94),
                           _headline_row("position", "cross", "map", 0.7, 0.64, 0.76)])
    answer = probe_answer(pd.concat([layout, today.assign(search="nested")]))
    assert "position: self 0.90 vs cross 0.70, better" in answer and attribute_sentence(today) in answer
    assert "nested cross-validation over 30 candidate set-ups per arm" in answer
    assert "not nested: optimistic" in probe_answer(pd.concat([layout.assign(search="best block"), today]))
    assert "layer mean" not in answer  # no mean row for position: nothing more to say
    mean = pd.DataFrame([_headline_row("position", "self", "mean", 0.6, 0.55, 0.62)])  # below cross's [0.64, 0.76]
    assert ("Self-attention's layer mean (not the subject's own map), against cross-attention with disjoint "
            "intervals: position worse (0.60 vs 0.70).") in probe_answer(pd.concat([layout, mean, today]))
    touching = mean.assign(ci_high=0.64)  # intervals that touch are not apart
    assert "layer mean" not in probe_answer(pd.concat([layout, touching, today]))


def test_edit_pairs_are_distinct_and_drawn_from_the_shapes_world():
    pairs = edit_pairs()
    for kind in ("colour", "shape"):
        mine = [(src, tgt) for k, src, tgt in pairs if k == kind]
        assert len(mine) >= 20 and len(set(mine)) == len(mine)
        assert mine[0] == next((s, t) for k, s, t in EDITS if k == kind)  # the earlier study's pair first
        for src, tgt in mine:
            (c1, s1), (c2, s2) = parse_prompt(src)[0], parse_prompt(tgt)[0]
            assert {c1, c2} <= set(COLOURS) and {s1, s2} <= set(SHAPES)
            assert (c1 != c2 and s1 == s2) if kind == "colour" else (c1 == c2 and s1 != s2)
    assert edit_pairs() == pairs and edit_pairs(1) == tuple(e for e in pairs if e in EDITS)
    assert len({src for _, src, _ in pairs}) > 10  # many sources, not one object edited twenty ways
    with pytest.raises(ValueError, match="shape edits have 72 distinct prompt pairs"):
        edit_pairs(73)


def _hand_sign_flip(differences: dict[str, list[float]]) -> float:
    """Exact two-sided sign-flip p over whole pairs: every sign pattern of the pairs' summed differences."""
    sums = [sum(v) for v in differences.values()]
    observed = abs(sum(sums))
    flips = [abs(sum(s * v for s, v in zip(signs, sums))) for signs in itertools.product((1, -1), repeat=len(sums))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


def _hand_holm(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def test_sign_flip_over_pairs_and_holm_match_a_hand_computation():
    rng = np.random.default_rng(5)
    effects = {("colour", "self"): 0.0, ("colour", "cross"): 0.3, ("shape", "self"): 0.02, ("shape", "cross"): 0.1}
    rows, gains = [], {}
    for edit, _, _ in EDITS:
        for p_index in range(5):
            src, tgt = f"a red {SHAPES[p_index % 4]}", f"a blue {SHAPES[p_index % 4]} {p_index}"
            for seed in range(2):
                base = float(rng.uniform(0.3, 0.6))
                common = {"edit": edit, "origin": "generated", "seed": seed, "source_prompt": src,
                          "target_prompt": tgt, "success": True, "displacement": 1.0, "leaked": False,
                          "source_present": True}
                rows.append({**common, "inject": "none", "fraction": math.nan, "layer_set": "none", "iou": base})
                for inject in ("self", "cross"):
                    gain = effects[edit, inject] + float(rng.normal(0, 0.05))
                    gains.setdefault((edit, inject), {}).setdefault(src + tgt, []).append(gain)
                    rows.append({**common, "inject": inject, "fraction": 0.8, "layer_set": "coarser than latent",
                                 "iou": base + gain})
    headline = edit_headline(edit_summary(pd.DataFrame(rows), n_boot=200))
    tested = headline[headline.inject != "none"]
    assert set(tested.unit) == {"pair"} and set(tested.n_pairs) == {5} and set(tested.n) == {10}
    hand = [_hand_sign_flip(gains[e, i]) for e, i in zip(tested.edit, tested.inject)]
    assert tested.iou_vs_none_p.tolist() == pytest.approx(hand)
    assert tested.iou_vs_none_p_holm.tolist() == pytest.approx(_hand_holm(hand))
    assert headline[headline.inject == "none"].iou_vs_none_p_holm.isna().all()
    means = [np.mean([g for v in gains[e, i].values() for g in v]) for e, i in zip(tested.edit, tested.inject)]
    assert tested.iou_vs_none.tolist() == pytest.approx(means)
    assert holm_family(headline).startswith("Holm family: the 4 injected headline rows (2 edit types × 1 origins")
    assert holm_family().startswith("Holm family: the 8 injected headline rows (2 edit types × 2 origins")


def test_the_answer_on_a_table_like_todays_calls_no_unadjusted_row_clear():
    """Today's headline: one pair per edit, sign-flip over its 20 seeds; the shape / generated self row (−0.014,
    interval just below zero, unadjusted p ≈ 0.08) is one of eight tests and does not survive Holm."""
    numbers = [("colour", "generated", "self", 0.0026, -0.0017, 0.0067, 0.249),
               ("colour", "generated", "cross", 0.292, 0.157, 0.434, 0.0002),
               ("colour", "rendered", "self", 0.0288, -0.0009, 0.0835, 0.164),
               ("colour", "rendered", "cross", 0.272, 0.174, 0.375, 0.0001),
               ("shape", "generated", "self", -0.0142, -0.0338, -0.0004, 0.0779),
               ("shape", "generated", "cross", 0.1137, 0.0556, 0.1939, 0.0001),
               ("shape", "rendered", "self", 0.0064, -0.0013, 0.0147, 0.167),
               ("shape", "rendered", "cross", 0.0402, 0.0178, 0.0714, 0.0003)]
    summary = pd.DataFrame([{"edit": e, "origin": o, "inject": i, "layer_set": "coarser than latent",
                             "fraction": 0.8, "success_rate": 1.0, "iou_vs_none": d, "iou_vs_none_ci_low": lo,
                             "iou_vs_none_ci_high": hi, "n_pairs": 1, "unit": "seed", "iou_vs_none_p": p}
                            for e, o, i, d, lo, hi, p in numbers])
    headline = edit_headline(summary)
    assert headline.iou_vs_none_p_holm.tolist() == pytest.approx(_hand_holm([n[-1] for n in numbers]))
    answer = editing_answer(headline)
    assert "self -0.014 [-0.034, -0.000] (no clear difference, Holm p = 0.31)" in answer
    assert answer.count("no clear difference") == 4  # every self row; every cross row is clear
    assert "cross +0.292 [+0.157, +0.434] (Holm p = 0.0012)" in answer
    assert "one prompt pair per edit" in answer
    assert "flips the seeds of each edit's one prompt pair" in holm_family(headline)
    untested = editing_answer(headline.drop(columns=["iou_vs_none_p_holm"]))
    assert untested.count("no clear difference, no test over prompt pairs") == 8  # no p-value: nothing is clear


def test_a_class_seen_in_one_group_is_left_out_not_an_error():
    """Folds keep a seed's images together: a class drawn under one seed only cannot be on both sides of a split."""
    rng = np.random.default_rng(6)
    features = {FeatureKey(kind, feature, 4, "mean", "late"): rng.normal(size=(24, 3)) for kind, feature in ARMS}
    groups = np.repeat(np.arange(6), 4)
    y = np.where(np.arange(24) % 2 == 0, "a", "b").astype(object)
    y[[0, 1]] = "rare"  # two samples, both of seed 0
    for table in (probe_features(features, {"y": y}, groups=groups),
                  nested_probe_features(features, {"y": y}, groups=groups)):
        assert len(table) == 3 and set(table.n) == {22} and set(table.n_classes) == {2}


def test_the_editing_answer_gives_no_injections_success_and_the_pairs_each_row_pools():
    rows = [{"edit": "colour", "origin": "rendered", "inject": "none", "layer_set": "none", "fraction": math.nan,
             "success_rate": 0.625, "iou_vs_none": math.nan, "iou_vs_none_ci_low": math.nan,
             "iou_vs_none_ci_high": math.nan, "n_pairs": 40, "unit": "pair", "iou_vs_none_p": math.nan},
            {"edit": "colour", "origin": "rendered", "inject": "cross", "layer_set": "coarser than latent",
             "fraction": 0.8, "success_rate": 0.575, "iou_vs_none": 0.204, "iou_vs_none_ci_low": 0.112,
             "iou_vs_none_ci_high": 0.306, "n_pairs": 40, "unit": "pair", "iou_vs_none_p": 0.0001}]
    answer = editing_answer(edit_headline(pd.DataFrame(rows)))
    assert ("colour edits of rendered images: cross +0.204 [+0.112, +0.306] (Holm p < 0.001), success 57%, "
            "none: success 62%") in answer  # the harm to success is read against no injection's
    assert "Each row pools 40 prompt pairs" in answer
