"""The studies on the tiny model with quick sizes: tables with sane values, and figures on disk."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from probe.analysis.probes import COLUMNS, SEARCH_COLUMNS, attn_tensor
from probe.analysis.stats import cluster_sign_flip, clustered_bootstrap, holm, mcnemar
from probe.fingerprint import weights_id
from probe.models import Layer, attention_layers
from probe.record import record
from probe.shapes.judge import parse_prompt
from probe.shapes.world import COLOURS, SHAPES
from probe.steer.guide import InitNO, Schedule, generate
from probe.studies.common import mean_interval, nearest_grid
from probe.studies.editing import EDIT_KEYS, edit_headline, edit_study, edit_summary
from probe.studies.guidance import (
    GUIDANCE_SETS,
    POOLED,
    comparison_table,
    guidance_headline,
    guidance_study,
    versus_baseline,
)
from probe.studies.guided import (
    NO_GUIDANCE_SCHEDULE,
    RealPassMaps,
    calibrate_steps,
    chosen_steps,
    guided_images,
    overlap_steps,
    pilot_prompts,
    scaled_schedule,
    study_prompts,
    subject_metrics,
)
from probe.studies.overlap import (
    ALL_METRICS,
    METRICS,
    Example,
    _keep_examples,
    auc_interval,
    failure_association,
    overlap_headline,
    overlap_study,
)
from probe.studies.probing import PROBE_TARGETS, position_bin, probe_headline, probe_study
from probe.studies.report import STUDIES, headline_differences, run_all, study_command
from probe.studies.self_cross import SELF_CROSS_METHODS, self_cross_headline, self_cross_study
from probe.tap import Call

STEPS = 3


def _alternating_judge(image, prompt):
    """A stand-in judge that calls the second subject missing in about half of the images (by pixel parity), so
    the association has both outcomes even on a random model."""
    second = "missing" if int(image.sum()) % 2 else "present"
    return [SimpleNamespace(status="present", detection=None), SimpleNamespace(status=second, detection=None)]


def _check_intervals(table: pd.DataFrame, value: str) -> None:
    known = table.dropna(subset=[value])
    assert known[value].between(0, 1).all()
    assert (known.ci_low <= known[value] + 1e-12).all() and (known[value] <= known.ci_high + 1e-12).all()


def test_position_bins():
    mask = np.zeros((30, 30), bool)
    mask[0:6, 0:6] = True
    assert position_bin(mask) == "top-left"
    mask[:] = False
    mask[12:18, 24:30] = True
    assert position_bin(mask) == "middle-right"


def test_auc_interval_and_association_on_planted_data():
    rng = np.random.default_rng(0)
    y = np.repeat([False, True], 60)
    scores = y + rng.normal(0, 0.5, y.size)
    auc, low, high = auc_interval(y, scores)
    assert auc == pytest.approx(roc_auc_score(y, scores))
    assert 0.8 < low <= auc <= high <= 1
    assert np.isnan(auc_interval(np.zeros(5, bool), np.arange(5))[0])
    metrics = pd.DataFrame({"step": 0, "timestep": 1.0, "missing": y, "mixed": False, "prompt": np.arange(y.size),
                            "signal": y + rng.normal(0, 0.5, y.size), "noise": rng.normal(size=y.size)})
    table = failure_association(metrics, names=["signal", "noise"], n_boot=200).set_index(["outcome", "metric"])
    assert table.loc[("missing", "signal"), "ci_low"] > 0.8 and table.loc["mixed", "auc"].isna().all()
    assert table.loc[("missing", "noise"), "ci_low"] < 0.5 < table.loc[("missing", "noise"), "ci_high"]
    assert table.loc[("missing", ALL_METRICS), "auc"] > 0.8
    assert (table.loc["missing", "n_cases"] == 60).all() and (table.n_controls == 60).all()
    flipped = failure_association(metrics.assign(missing=False, mixed=y), names=["signal"], n_boot=50)
    assert flipped.set_index(["outcome", "metric"]).loc[("mixed", "signal"), "auc"] == pytest.approx(
        table.loc[("missing", "signal"), "auc"])  # mixing is measured the same way, against the same images
    # the same 120 images as 12 prompts of 10 look-alike seeds: the interval resamples prompts and widens
    prompt_scores = np.repeat(np.where(np.arange(12) < 6, 0.0, 1.0) + rng.normal(0, 0.8, 12), 10)
    alike = prompt_scores + rng.normal(0, 0.05, 120)
    clustered = auc_interval(y, alike, np.repeat(np.arange(12), 10), n_boot=400)
    plain = auc_interval(y, alike, n_boot=400)
    assert clustered[0] == plain[0] and clustered[2] - clustered[1] > 1.5 * (plain[2] - plain[1])
    # over several steps the chosen step's interval is Bonferroni-wide
    steps = pd.concat([metrics.assign(step=k, timestep=float(k)) for k in range(5)])
    table = failure_association(steps, names=["noise"], n_boot=300).query("metric == 'noise' and outcome == 'missing'")
    assert ((table.ci_high_adj - table.ci_low_adj) > (table.ci_high - table.ci_low)).all()


def test_examples_keep_the_first_of_each_outcome_once():
    blank = np.zeros((2, 2, 3), np.uint8)
    statuses = [("present", "present"), ("missing", "mixed"), ("mixed", "mixed"), ("present", "missing"),
                ("mixed", "present"), ("present", "present")]
    examples = [Example("p", seed, ("a", "b"), s, blank, np.zeros((2, 1, 1))) for seed, s in enumerate(statuses)]
    kept = _keep_examples([], examples[:3], per_class=1)
    kept = _keep_examples(kept, examples[3:], per_class=1)
    assert [e.seed for e in kept] == [0, 1]  # seed 1 is both missing and mixed, kept once; every class is then full
    assert [e.seed for e in _keep_examples([], examples, per_class=2)] == [0, 1, 2, 3, 5]


def test_probe_study_quick(tiny, tmp_path):
    study = probe_study(tiny, steps=STEPS, quick=True, out=tmp_path, progress=False)
    labels, table = study.labels, study.accuracy
    assert len(labels) == len(COLOURS) * len(SHAPES)
    assert set(labels.colour) == set(COLOURS) and set(labels["shape"]) == set(SHAPES)
    assert list(labels.prompt) == [f"a {c} {s}" for c, s in zip(labels.colour, labels["shape"])]
    assert list(table.columns) == [*COLUMNS, "given_by_prompt", *SEARCH_COLUMNS]  # the search's columns appended
    nested = table[table.search == "nested"]
    assert len(nested) == nested.groupby(["target", "kind", "feature"]).ngroups  # one nested row per target and arm
    assert nested.groupby("target").n_candidates.nunique().eq(1).all()  # every arm searched as many set-ups
    assert {"colour", "shape"} <= set(table.target) <= set(PROBE_TARGETS)
    assert table.given_by_prompt.eq(table.target.isin(["colour", "shape"])).all()
    assert set(table.kind) == {"cross", "self"} and set(table.step_bin) == {"early", "middle", "late"}
    _check_intervals(table, "accuracy")
    colour = table[table.target == "colour"]
    assert (colour.chance == 1 / len(COLOURS)).all() and (colour.n == len(labels)).all()
    headline = probe_headline(table)
    assert len(headline) == table.groupby(["target", "kind", "feature"]).ngroups
    found = labels.dropna(subset=["area"])
    assert found.area.gt(0).all() and set(found.extent) <= {"wide", "tall", "even"}
    if found.area.nunique() >= 3:  # terciles of the drawn areas: larger objects never in a smaller class
        areas = found.groupby("size").area
        assert areas.max()["small"] <= areas.min()["medium"] and areas.max()["medium"] <= areas.min()["large"]
        assert found["size"].value_counts().max() - found["size"].value_counts().min() <= 1  # terciles
    assert (tmp_path / "probe_accuracy.png").stat().st_size > 0


def test_overlap_study_quick(tiny, tmp_path):
    study = overlap_study(tiny, steps=STEPS, quick=True, out=tmp_path, judge=_alternating_judge, progress=False)
    metrics, table = study.metrics, study.association
    assert len(metrics) == 16 * STEPS and set(METRICS) <= set(metrics.columns)
    assert np.isfinite(metrics[list(METRICS)].to_numpy()).all()
    assert metrics.soft_iou.between(0, 1).all() and metrics.com_distance.between(0, 1).all()
    assert metrics.ae_loss.between(0, 1).all() and (metrics.kl_sym >= 0).all()
    assert 0 < metrics.missing.mean() < 1 and not metrics.mixed.any()
    assert set(table.metric) == {*METRICS, ALL_METRICS} and set(table.outcome) == {"missing", "mixed"}
    assert len(table) == 2 * (len(METRICS) + 1) * STEPS
    _check_intervals(table, "auc")
    assert table[table.outcome == "missing"].auc.notna().all() and table[table.outcome == "mixed"].auc.isna().all()
    for (outcome, metric, step), row in table.set_index(["outcome", "metric", "step"]).iterrows():
        at = metrics[metrics.step == step]
        assert row.n_cases == at[outcome].sum()
        if outcome == "missing" and metric != ALL_METRICS:
            assert row.auc == pytest.approx(roc_auc_score(at.missing, at[metric]))
    headline = overlap_headline(table)  # step 10 of 50 scaled to 3 steps (step 1), and the last step beside it
    assert len(headline) == 2 * 2 * (len(METRICS) + 1) and headline.iloc[0].step == 1 and headline.iloc[0].primary
    assert set(headline[~headline.primary].step) == {STEPS - 1}
    assert all(e.missing or e.all_present for e in study.examples)
    for name in ("overlap_auc", "overlap_examples"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


# -- guidance, self-cross, editing, everything -------------------------------------------------------------------------

CHEAP = Schedule(max_refinement=2)  # A&E's schedule with at most two refinement iterations (a random model never
SHORT_INITNO = InitNO(rounds=1, steps=1, final_steps=1)  # reaches the thresholds)
RATE_COLUMNS = ("rate", "ci_low", "ci_high")


def _parity_judge(image, prompt):
    """A stand-in judge with every outcome on a random model: by pixel-sum parity the last subject is missing and
    the first mixed, so mixing and missing both vary."""
    total = int(image.sum())
    statuses = ["present"] * len(parse_prompt(prompt))
    if total % 2:
        statuses[-1] = "missing"
    if total // 2 % 2:
        statuses[0] = "mixed"
    return [SimpleNamespace(status=s, detection=None) for s in statuses]


def _check_rates(summary: pd.DataFrame, outcome: str) -> None:
    rate, low, high = (summary[f"{outcome}_{c}"] for c in RATE_COLUMNS)
    assert rate.between(0, 1).all()
    assert (low <= rate + 1e-12).all() and (rate <= high + 1e-12).all()


def test_scaled_schedule_and_overlap_steps():
    assert scaled_schedule(50) == Schedule()
    assert dict(scaled_schedule(20).thresholds) == {0: 0.05, 4: 0.5, 8: 0.8}
    assert dict(scaled_schedule(2).thresholds) == {0: 0.05, 1: 0.8}  # 0 and 10 land on 0: the stricter stays
    assert scaled_schedule(20, CHEAP).max_refinement == 2
    assert overlap_steps(50) == {"t10": 10, "end": 49} and overlap_steps(4) == {"t10": 1, "end": 3}


def test_real_pass_maps_keep_only_the_pipelines_own_pass():
    layer = Layer("a.attn2", "cross", (2, 2), 2)
    capture = RealPassMaps([layer], steps=[3])
    call = Call(layer, step=3, timestep=1.0, pass_="cfg", batch=2)
    assert capture.wants(call) and not capture.wants(Call(layer, 4, 1.0, "cfg", 2))
    assert not capture.wants(Call(layer, 3, 1.0, "guidance", 1))  # guidance's own pass is told apart
    capture.on_probs(call, torch.cat([torch.full((1, 2, 4, 5), 1.0), torch.full((1, 2, 4, 5), 3.0)]))
    torch.testing.assert_close(capture.maps[3]["cross"], torch.full((4, 5), 3.0))  # the conditional half


def test_real_pass_maps_equal_the_recorded_maps(tiny):
    """Unguided, the maps the guidance study reads are the layer-and-head mean maps that ``record`` keeps."""
    prompt, steps, seed = "a red circle and a blue square", 3, 5
    grid = nearest_grid(tiny)
    layers = [layer for layer in attention_layers(tiny) if layer.grid[0] == grid]
    capture = RealPassMaps(layers, steps=[0, 2])
    generate(tiny, prompt, subjects=["circle", "square"], seed=seed, steps=steps, schedule=NO_GUIDANCE_SCHEDULE,
             consumers=[capture], progress=False, output_type="np")
    tree = record(tiny, prompt, seeds=[seed], steps=steps, layers=[grid], keep_steps=[0, 2], progress=False)
    cross, _ = attn_tensor(tree["cross"][f"res{grid}"])
    selfattn, _ = attn_tensor(tree["self"][f"res{grid}"])
    for j, step in enumerate((0, 2)):
        found = capture.maps[step]
        tokens = cross.shape[-1]
        torch.testing.assert_close(found["cross"].reshape(grid, grid, -1)[..., :tokens], cross[0, j].mean(0),
                                   atol=2e-3, rtol=0)
        torch.testing.assert_close(found["self"].reshape(grid, grid, grid, grid), selfattn[0, j].mean(0),
                                   atol=2e-3, rtol=0)


def test_subject_metrics_softmax_runs_over_the_words_wherever_padding_puts_them():
    """Left padding: the words sit at 8–10 of 12 slots; A&E's loss of each subject is 1 − the peak of its smoothed
    map after softmax(100·A) over those slots alone (the start, end and padding slots take no part)."""
    from probe.analysis.maps import gaussian_smooth

    generator = torch.Generator().manual_seed(0)
    cross = torch.rand(8, 8, 12, generator=generator) * 0.01
    cross[2, 3, 8] = 0.5  # the first subject is attended at one patch
    cross[..., 0] = 5.0  # padding and the start token dominate the raw mass
    words, subjects = [8, 9, 10], [[8], [10]]
    values = subject_metrics(cross, torch.full((8, 8, 64), 1 / 64), subjects, words)
    soft = torch.softmax(100 * cross[..., words], dim=-1)
    peaks = [float(gaussian_smooth(soft[..., words.index(s[0])][None])[0].max()) for s in subjects]
    assert values["ae_loss"] == pytest.approx(max(1 - p for p in peaks), abs=1e-6)
    assert values["ae_loss"] < 0.9  # softmaxing over the padding slots instead would give 1


def test_paired_difference_and_pooled_family_on_planted_data():
    n = 30
    rows = [{"method": m, "initno": False, "prompt": f"p{i}", "seed": 0, "missing": m == "ae",
             "soft_iou_t10": {"ae": 0.5, "none": 0.6}.get(m, 0.2)}
            for i in range(n) for m in ("ae", "iou", "kl", "none")]
    table = versus_baseline(pd.DataFrame(rows), n_boot=200).set_index("method")
    assert set(table.index) == {"iou", "kl", "none", POOLED}  # both lowered soft IoU against none: pooled
    assert table.loc["iou", "difference"] == -1 and table.loc["iou", "ci_high"] == -1
    assert table.loc[POOLED, "verdict"] == "less missing than ae"
    assert table.loc["iou", "overlap_difference"] == pytest.approx(-0.3)
    rate, low, high = mean_interval(np.arange(10) < 3, n_boot=500)
    assert rate == pytest.approx(0.3) and 0 <= low < 0.3 < high <= 0.7
    family = comparison_table(pd.DataFrame(rows), {False: ("iou", "kl")}, ("missing",), n_boot=200)
    np.testing.assert_allclose(family.p_holm.to_numpy(), holm(family.p_value.to_numpy()))  # against A&E and none
    assert table.loc["iou", "p_holm"] == family.set_index(["method", "reference"]).p_holm["iou", "ae"]


def test_comparisons_resample_prompts_and_holm_reads_the_verdict():
    """Two seeds per prompt: the interval and the sign-flip p-value are those of whole prompts (each its own object
    set here), recomputed from the per-image rows; the p-value Holm reads is McNemar's on the 0/1 pairs."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        for seed in (0, 1):
            base = bool(rng.random() < 0.5)
            for method in ("ae", "iou", "kl"):
                worse = method == "iou" and i < 3  # iou loses a subject on three prompts only
                rows.append({"method": method, "initno": False, "prompt": f"p{i}", "seed": seed,
                             "missing": base or worse, "soft_iou_t10": 0.3})
    images = pd.DataFrame(rows)
    table = versus_baseline(images, n_boot=400, pooled=()).set_index("method")
    wide = images.pivot_table(index=["prompt", "seed"], columns="method", values="missing", aggfunc="mean")
    diffs = wide["iou"] - wide["ae"]
    prompts = wide.index.get_level_values("prompt")
    mean, low, high = clustered_bootstrap(diffs.to_numpy(), prompts, 400, 0.95, 0)
    assert table.loc["iou", ["difference", "ci_low", "ci_high"]].tolist() == pytest.approx([mean, low, high])
    assert table.loc["iou", "p_sign_flip"] == pytest.approx(cluster_sign_flip(diffs.to_numpy(), prompts))
    assert table.loc["iou", "p_value"] == pytest.approx(mcnemar(wide["ae"] > 0.5, wide["iou"] > 0.5))  # 0/1 pairs
    assert table.loc["iou", "n_prompts"] == 12 and table.loc["iou", "n_paired"] == 24
    assert table.loc["kl", "p_value"] == 1.0  # no differences at all
    assert table.loc["iou", "p_holm"] == pytest.approx(min(1.0, 2 * table.loc["iou", "p_value"]))  # Holm of two
    expected = "more missing than ae" if table.loc["iou", "p_holm"] < 0.05 else "no clear difference from ae"
    assert table.loc["iou", "verdict"] == expected
    assert table.loc["kl", "difference"] == 0 and table.loc["kl", "verdict"] == "no clear difference from ae"


def test_guidance_study_quick(tiny, tmp_path):
    study = guidance_study(tiny, n_images=2, steps=STEPS, quick=True, out=tmp_path, schedule=CHEAP,
                           initno_settings=SHORT_INITNO, progress=False)
    images, summary = study.images, study.summary
    configs = {("none", False), ("ae", False), ("ae", True), ("iou", False), ("iou", True)}  # no INITNO for none
    assert set(zip(images.method, images.initno)) == configs and len(images) == 2 * len(configs)
    assert set(images.set) == set(GUIDANCE_SETS)
    assert (images.n_subjects == [len(parse_prompt(p)) for p in images.prompt]).all()
    assert (images.missing == (images.n_missing > 0)).all() and (images.n_missing <= images.n_subjects).all()
    for at in ("t10", "end"):
        values = images[[f"{m}_{at}" for m in (*METRICS, "intensity_mean")]].to_numpy()
        assert np.isfinite(values).all()
        assert images[f"soft_iou_{at}"].between(0, 1).all() and images[f"com_distance_{at}"].between(0, 1).all()
        assert (images[f"kl_sym_{at}"] >= 0).all() and (images[f"intensity_mean_{at}"] > 0).all()
    for proxy in ("quality", "precision"):
        assert images[proxy].dropna().between(0, 1).all()
    assert (images.seconds > 0).all()
    assert images[images.method == "none"].loss_start.isna().all()
    assert images[images.method != "none"].loss_start.notna().all()
    assert len(summary) == len(configs) and (summary.n == 2).all()
    for outcome in ("all_present", "missing", "mixed"):  # one exclusive outcome per image
        _check_rates(summary, outcome)
    np.testing.assert_allclose(summary[["all_present_rate", "missing_rate", "mixed_rate"]].sum(axis=1), 1.0)
    rates = summary.set_index(["method", "initno"]).missing_rate
    versus = study.versus_ae.set_index(["method", "initno"])  # the earlier layout: missing against A&E
    assert set(versus.index) == {("none", False), ("iou", False), ("iou", True)}
    for key, row in versus.iterrows():
        assert row.difference == pytest.approx(rates[key] - rates["ae", key[1]])
        assert row.ci_low <= row.difference <= row.ci_high
    by_config = summary.set_index(["method", "initno"])
    for key in (("iou", False), ("iou", True)):  # every outcome against A&E on the same images, and against none
        for outcome, reference in (("all_present", "ae"), ("mixed", "ae"), ("missing", "none")):
            base = (reference, key[1] if reference == "ae" else False)
            assert by_config.loc[key, f"{outcome}_vs_{reference}"] == pytest.approx(
                by_config[f"{outcome}_rate"][key] - by_config[f"{outcome}_rate"][base])
    assert set(study.comparisons.outcome) == {"all_present", "missing", "mixed"}
    assert set(zip(study.comparisons.method, study.comparisons.reference)) == {
        ("ae", "none"), ("iou", "ae"), ("iou", "none")}
    steps = summary.set_index(["method", "initno"]).step_size
    assert steps["none"].isna().all()
    for method in ("ae", "iou"):  # calibrated on pilot prompts
        assert steps[method].eq(chosen_steps(study.step_sizes)[method]).all()
    assert set(study.step_sizes.method) == {"ae", "iou"} and not set(study.step_sizes.scale_factor) - {20.0, 0.2}
    assert len(guidance_headline(summary)) == len(summary)
    for name in ("guidance_missing", "guidance_overlap_vs_missing"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_step_calibration_pairs_each_candidate_with_unguided_images(tiny):
    """The calibration's changes against no guidance are recomputed from separately generated images at each step
    size; A&E's chosen step is the one that lowers missing most, an overlap objective's the one that lowers soft IoU
    at step 10 most; pilot prompts are the sets' next prompts, never the study's."""
    study = study_prompts(GUIDANCE_SETS, 2, 1)
    pilot = pilot_prompts(GUIDANCE_SETS, study, 1)
    assert [p["set"] for p in pilot] == list(GUIDANCE_SETS)
    assert not {p["prompt"] for p in pilot} & {p["prompt"] for p in study}
    assert pilot == study_prompts(GUIDANCE_SETS, 4, 1)[2:]
    options = {"steps": STEPS, "schedule": CHEAP}
    table = calibrate_steps(tiny, ["none", "ae", "iou"], pilot, [0], candidates=(20.0, 0.2), progress=False,
                            **options)
    assert list(zip(table.method, table.scale_factor)) == [("ae", 20.0), ("iou", 20.0), ("ae", 0.2), ("iou", 0.2)]
    assert list(table.criterion) == ["missing_vs_none", "iou_t10_vs_none"] * 2
    plain = guided_images(tiny, pilot, [0], [("none", False)], progress=False, **options)
    for row in table.itertuples():
        guided = guided_images(tiny, pilot, [0], [(row.method, False)], progress=False,
                               step_sizes={row.method: row.scale_factor}, **options)
        for at in ("t10", "end"):
            expected = (guided[f"soft_iou_{at}"] - plain[f"soft_iou_{at}"]).mean()
            assert getattr(row, f"iou_{at}_vs_none") == pytest.approx(expected, abs=1e-6)
        assert row.missing_vs_none == pytest.approx((guided.missing.astype(float) - plain.missing).mean())
        assert row.loss_fell == pytest.approx((guided.loss_end < guided.loss_start).mean())
    expected = {}
    for method, rows in table.groupby("method"):
        score = rows[rows.criterion.iloc[0]]
        ties = rows[score == score.min()]
        expected[method] = ties.scale_factor.max()  # the larger step on a tie
    assert table.chosen.sum() == 2 and chosen_steps(table) == expected
    kept = calibrate_steps(tiny, ["ae", "iou"], pilot[:1], [0], candidates=(0.2,), keep=("ae",), progress=False,
                           **options)
    assert list(kept.method) == ["iou"]
    with pytest.raises(ValueError, match="do not run"):
        guided_images(tiny, pilot, [0], [("none", False)], progress=False, step_sizes={"iou": 1.0}, **options)


def test_study_prompts_take_turns_so_a_smaller_study_is_a_prefix():
    small, large = study_prompts(GUIDANCE_SETS, 20, 5), study_prompts(GUIDANCE_SETS, 60, 5)
    assert [row["set"] for row in small] == list(GUIDANCE_SETS) * 2
    assert large[:len(small)] == small and len(large) == 12


def test_guided_images_resume_from_their_store(tiny, tmp_path, monkeypatch):
    import probe.studies.guided as experiments

    made = []

    def counting_generate(pipe, prompt, **kwargs):
        made.append((prompt, kwargs["seed"]))
        return generate(pipe, prompt, **kwargs)

    monkeypatch.setattr(experiments, "generate", counting_generate)
    prompts, store = study_prompts(GUIDANCE_SETS, 2, 1), tmp_path / "images.csv"
    configs = [("none", False), ("ae", False)]
    settings = {"steps": STEPS, "schedule": CHEAP, "progress": False, "store": store}
    first = guided_images(tiny, prompts[:1], [0], configs, **settings)
    assert len(made) == 2 and len(pd.read_csv(store)) == 2
    both = guided_images(tiny, prompts, [0], configs, **settings)  # only the second prompt's images are new
    assert len(made) == 4 and [p for p, _ in made[2:]] == [prompts[1]["prompt"]] * 2
    numeric = first.select_dtypes("number").columns
    pd.testing.assert_frame_equal(both.iloc[:2][numeric].reset_index(drop=True), first[numeric], rtol=1e-5)
    assert list(both.method) == ["none", "ae"] * 2 and both.settings_id.nunique() == 1
    assert both.attrs["reused_seconds"] == pytest.approx(first.seconds.sum(), rel=1e-5)
    # a smaller run: the table keeps its rows alone (its headline's), the larger run's others wait beside it
    again = guided_images(tiny, prompts[:1], [0], configs, **settings)
    aside = store.with_name(f"images.settings-{both.settings_id.iloc[0]}.csv")
    assert len(made) == 4 and len(again) == 2 and len(pd.read_csv(store)) == 2 and len(pd.read_csv(aside)) == 2
    guided_images(tiny, prompts[:1], [0], configs, **{**settings, "step_sizes": {"ae": 0.5}})  # another step:
    assert len(made) == 5 and made[-1] == (prompts[0]["prompt"], 0)  # only the guided image is made again
    assert sorted(pd.read_csv(store).step_size.dropna()) == [0.5]
    assert sorted(pd.read_csv(aside).step_size.dropna()) == [CHEAP.scale_factor]  # the other prompt's kept
    with pytest.warns(UserWarning, match="2 of 2 stored rows were made with other settings"):  # made anew
        guided_images(tiny, prompts[:1], [0], configs, **{**settings, "steps": STEPS + 1})
    assert len(made) == 7 and len(pd.read_csv(store)) == 2 and len(pd.read_csv(aside)) == 4  # none lost


def test_weights_id_changes_with_any_weight(tiny):
    before = weights_id(tiny)
    with torch.no_grad():
        parameter = next(tiny.vae.parameters()).view(-1)
        kept = parameter[0].clone()
        parameter[0] += 1e-3
        assert weights_id(tiny) != before
        parameter[0] = kept
    assert weights_id(tiny) == before


def test_self_cross_study_quick(tiny, tmp_path):
    study = self_cross_study(tiny, n_images=2, steps=STEPS, quick=True, out=tmp_path, judge=_parity_judge,
                             schedule=CHEAP, progress=False)
    images, summary = study.images, study.summary
    configs = {(m, i) for m in SELF_CROSS_METHODS for i in (False, True) if not (m == "none" and i)}
    assert set(zip(images.method, images.initno)) == configs  # with and without INITNO, as in Self-Cross's paper
    assert len(images) == 2 * len(configs) and set(images.set) == {"shapes-similar"}
    assert images.quality.isna().all()  # the stand-in judge has no detections
    assert set(zip(summary.method, summary.initno)) == configs
    mixed = summary.set_index(["method", "initno"])
    for initno in (False, True):  # each compared with A&E at the same initno, and with none (without INITNO)
        for outcome in ("all_present", "missing", "mixed"):
            assert mixed.loc[("self_cross", initno), f"{outcome}_vs_ae"] == pytest.approx(
                mixed.loc[("self_cross", initno), f"{outcome}_rate"] - mixed.loc[("ae", initno), f"{outcome}_rate"])
            assert mixed.loc[("self_cross", initno), f"{outcome}_vs_none"] == pytest.approx(
                mixed.loc[("self_cross", initno), f"{outcome}_rate"] - mixed.loc[("none", False), f"{outcome}_rate"])
    for outcome in ("all_present", "missing", "mixed"):
        _check_rates(summary, outcome)
    headline = self_cross_headline(summary)
    assert len(headline) == len(configs) and {"mixed_vs_ae", "all_present_vs_none_p_holm"} <= set(headline)
    assert set(study.comparisons.outcome) == {"all_present", "missing", "mixed"}
    assert (tmp_path / "self_cross_mixing.png").stat().st_size > 0


def test_edit_summary_pairs_each_injection_with_no_injection_on_planted_rows():
    def row(inject, seed, iou, fraction=0.8):
        return {"edit": "colour", "origin": "rendered", "seed": seed, "inject": inject,
                "fraction": float("nan") if inject == "none" else fraction,
                "layer_set": "none" if inject == "none" else "all", "success": True, "iou": iou,
                "displacement": 1.0, "leaked": False, "source_present": True}

    results = pd.DataFrame([row("none", 0, 0.5), row("none", 1, 0.6), row("none", 2, 0.7),
                            row("self", 0, 0.5), row("self", 1, 0.8), row("self", 2, np.nan),  # seed 2: not found
                            row("cross", 0, 0.9), row("cross", 1, 1.0), row("cross", 2, 1.0)])
    summary = edit_summary(results, n_boot=200).set_index("inject")
    assert summary.loc["self", "iou_vs_none"] == pytest.approx(0.1)  # (0 + 0.2) / 2, seed 2 left out
    assert summary.loc["self", "iou_vs_none_ci_low"] == pytest.approx(0.0)
    assert summary.loc["self", "iou_vs_none_ci_high"] == pytest.approx(0.2)
    assert summary.loc["cross", "iou_vs_none"] == pytest.approx((0.4 + 0.4 + 0.3) / 3)
    assert np.isnan(summary.loc["none", "iou_vs_none"])


def test_edit_study_quick(tiny, tmp_path):
    study = edit_study(tiny, steps=2, quick=True, out=tmp_path, progress=False)
    results, summary = study.results, study.summary
    assert len(summary) == results.groupby(EDIT_KEYS, dropna=False).ngroups and (summary.n == 1).all()
    assert summary.success_rate.between(0, 1).all()
    assert (summary.success_ci_low <= summary.success_rate).all()
    assert (summary.success_rate <= summary.success_ci_high).all()
    assert summary.iou.dropna().between(0, 1).all() and (summary.displacement.dropna() >= 0).all()
    headline = edit_headline(summary)
    assert len(headline) == 2 * 2 * 3  # edits × origins × (self, cross, none)
    assert set(headline[headline.inject != "none"].fraction) == {0.8}
    assert set(headline[headline.inject != "none"].layer_set) == {"coarser than latent"}
    assert (tmp_path / "edit_success.png").stat().st_size > 0


def test_run_all_quick_writes_every_figure_and_table(tiny, tmp_path):
    sizes = {"probe": {"steps": 3}, "overlap": {"steps": 3, "n_images": 4}, "editing": {"steps": 2},
             "guidance": {"n_images": 2, "steps": 2, "methods": ("none", "iou"), "initno": (False,)},
             "self_cross": {"n_images": 1, "steps": 2, "methods": ("none", "ae"), "schedule": CHEAP}}
    headlines = run_all(tiny, quick=True, out=tmp_path, sizes=sizes, progress=False)
    assert list(headlines) == [*STUDIES, "timing"]
    assert all(len(headlines[name]) for name in STUDIES)
    figures = ("probe_accuracy", "overlap_auc", "overlap_examples", "edit_success", "guidance_missing",
               "guidance_overlap_vs_missing", "self_cross_mixing")
    tables = ("probe_labels", "probe_accuracy", "overlap_metrics.csv.gz", "overlap_association", "edit_results",
              "edit_summary", "guidance_images", "guidance_summary", "guidance_comparisons", "self_cross_images",
              "self_cross_summary", "self_cross_comparisons", "timing", *(f"headline_{name}" for name in STUDIES))
    for name in figures:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    for name in tables:
        assert (tmp_path / (name if name.endswith(".gz") else f"{name}.csv")).stat().st_size > 0
    assert not (tmp_path / "overlap_metrics.csv").exists()  # per-step rows: compressed
    assert len(pd.read_csv(tmp_path / "guidance_images.csv")) == 2 * 2
    index = (tmp_path / "README.md").read_text()
    for name in STUDIES:  # each study's section: its rerun command, figures and headline numbers
        recorded = json.loads(json.dumps(sizes[name], default=str))  # as timing.csv keeps them
        assert study_command(name, tmp_path, True, recorded, "tiny") in index
        assert "--quick --model tiny" in study_command(name, tmp_path, True, recorded, "tiny")
        first = pd.read_csv(tmp_path / f"headline_{name}.csv").iloc[0]
        assert "| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in first) + " |" in index
    assert all(f"({name}.png)" in index for name in figures)
    assert set(pd.read_csv(tmp_path / "timing.csv").model) == {"tiny"}
    assert headline_differences(tmp_path) == []  # every headline number reproduces from the per-image tables
    images = pd.read_csv(tmp_path / "guidance_images.csv")
    images.loc[images.method == "iou", "missing"] = ~images.loc[images.method == "iou", "missing"].astype(bool)
    images.to_csv(tmp_path / "guidance_images.csv", index=False)  # a changed row shows in the recomputed headline
    assert any(p.startswith("guidance") and "missing_rate" in p for p in headline_differences(tmp_path))
    with pytest.raises(ValueError, match="unknown studies"):
        run_all(tiny, quick=True, out=tmp_path, sizes={"nope": {}})


def test_committed_headlines_reproduce_from_the_committed_per_image_tables():
    """The full-size runs in ``figures/``: each headline number, recomputed from the rows beside it."""
    assert headline_differences(Path(__file__).parents[1] / "figures") == []


def test_study_command_settings_read_back_as_given():
    """The index's rerun command gives the study the same settings once the CLI parses its ``--set`` items."""
    import shlex

    from probe.cli import _setting, parser

    settings = {"n_images": 64, "steps": 25, "initno": (False,), "methods": ["none", "ae"], "step_sizes": {"iou": 0.2}}
    given = {**settings, "sets": ("animals", "mine.txt"), "judge": "judge(clip:./clip@0.2)"}
    args = parser().parse_args(shlex.split(study_command("guidance", "figures", False, given, "./my-sd"))[1:])
    assert dict(_setting(item) for item in args.set) == settings
    assert (args.name, args.out, args.quick, args.model) == ("guidance", "figures", False, "./my-sd")
    assert (args.prompts, args.judge) == (["animals", "mine.txt"], "clip:./clip@0.2")


def test_weights_id_is_the_same_at_any_thread_count():
    """A resumed or sharded study may run with another number of threads: its rows must still be found. (A CPU
    sum's rounding follows the thread count; the built-in model's id differed at 1, 2 and 4 threads.)"""
    from probe.models import load

    pipe = load("shapes")
    threads = torch.get_num_threads()
    try:
        ids = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            ids.add(weights_id(pipe))
            assert torch.get_num_threads() == n  # left as the caller set it
    finally:
        torch.set_num_threads(threads)
    assert len(ids) == 1
