"""Linear probes: planted signals are found, shuffled labels stay at chance, a real recording gives sane numbers."""

import numpy as np
import pytest
import xarray as xr
from sklearn.base import clone

import probe
from probe.analysis.maps import word_map
from probe.analysis.probes import (
    COLUMNS,
    MEAN_LAYER,
    FeatureKey,
    LinearProbe,
    probe_features,
    probe_recording,
    step_bins,
    subject_features,
    wilson_interval,
)

GRID = 8
TOKENS = ["<|startoftext|>", "a", "cat", "<|endoftext|>"]
LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn", "up_blocks.1.attentions.0.transformer_blocks.0.attn"]


def _planted_tree(labels: np.ndarray, steps: int = 2, seed: int = 0) -> xr.DataTree:
    """A recording-like tree whose "cat" map and self-attention keys light up a 2×2 patch that depends on the label."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    cross = rng.uniform(0.0, 1.0, (n, steps, len(LAYERS), GRID, GRID, len(TOKENS)))
    keys = rng.uniform(0.0, 1.0, (n, steps, len(LAYERS), GRID, GRID, GRID, GRID))
    for i, label in enumerate(labels):
        y, x = divmod(int(label) * 2, GRID)
        cross[i, :, :, y : y + 2, x : x + 2, 2] += 3.0
        keys[i, ..., y : y + 2, x : x + 2] += 3.0
    keys /= keys.sum((-2, -1), keepdims=True)
    sample = {"sample": np.arange(n), "prompt": ("sample", ["a cat"] * n), "seed": ("sample", np.arange(n))}
    common = {**sample, "step": np.arange(steps), "timestep": ("step", np.linspace(900, 100, steps)),
              "layer": [f"{name}{k}" for name, k in zip(LAYERS, (2, 2))], "y": np.arange(GRID), "x": np.arange(GRID)}
    cross_ds = xr.Dataset(
        {"attn": (("sample", "step", "layer", "y", "x", "token"), cross.astype(np.float16))},
        coords={**common, "token": np.arange(len(TOKENS)), "token_text": (("sample", "token"), [TOKENS] * n)},
    )
    self_common = {**common, "layer": [f"{name}1" for name in LAYERS], "ky": np.arange(GRID), "kx": np.arange(GRID)}
    self_ds = xr.Dataset({"attn": (("sample", "step", "layer", "y", "x", "ky", "kx"), keys.astype(np.float16))},
                         coords=self_common)
    return xr.DataTree.from_dict({"/": xr.Dataset(), f"cross/res{GRID}": cross_ds, f"self/res{GRID}": self_ds})


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_step_bins_split_the_schedule_into_early_middle_late():
    assert step_bins(50, per_bin=2) == {"early": [7, 8], "middle": [24, 25], "late": [41, 42]}
    assert step_bins([0, 1, 2, 3]) == {"early": [0, 1], "middle": [2], "late": [3]}
    assert step_bins(2) == {"steps 0-0": [0], "steps 1-1": [1]}


def test_probe_is_a_scikit_learn_estimator():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    X = rng.normal(size=(60, 5)) + y[:, None]
    probe_ = clone(LinearProbe(C=0.5, folds=3))
    assert probe_.get_params()["C"] == 0.5 and probe_.fit(X, y).score(X, y) > 0.8
    score = probe_.cross_validate(X, y)
    assert score.folds == 3 and score.chance == 0.5 and score.ci_low <= score.accuracy <= score.ci_high


def test_planted_signal_is_recovered_by_every_feature():
    labels = np.tile(np.arange(3), 20)
    table = probe_recording(_planted_tree(labels), {"label": labels}, words="cat", bins=1)
    assert list(table.columns) == COLUMNS
    assert set(zip(table.kind, table.feature)) == {("cross", "map"), ("self", "mean"), ("self", "aggregated")}
    assert set(table.layer) == {MEAN_LAYER, *(name[:-len(".attn")] for name in LAYERS)}
    assert (table.accuracy >= 0.95).all(), table[["kind", "feature", "layer", "accuracy"]]
    assert np.allclose(table.chance, 1 / 3) and (table.n == 60).all()


def test_shuffled_labels_stay_at_chance():
    labels = np.tile(np.arange(3), 50)
    shuffled = np.random.default_rng(1).permutation(labels)
    table = probe_recording(_planted_tree(labels), {"label": shuffled}, words="cat", bins=1, kinds=("cross",),
                            per_layer=False)
    assert len(table) == 1
    row = table.iloc[0]
    assert row.ci_low <= row.chance <= row.ci_high and row.accuracy < 0.6


def test_missing_labels_and_rare_classes_are_left_out():
    labels = np.tile(np.arange(3), 10)
    target = labels.astype(object)
    target[:4] = None  # no label where the judge found nothing
    target[4] = "rare"  # a class with one sample cannot be cross-validated
    features = {FeatureKey("cross", "map", GRID, MEAN_LAYER, "all"): np.eye(30)[labels] * 5}
    table = probe_features(features, {"target": target, "constant": ["x"] * 30})
    assert list(table.target) == ["target"]  # one class only: no probe
    assert table.n.iloc[0] == 25


@pytest.fixture(scope="module")
def recording(tiny):
    prompts = ["a red circle", "a blue circle", "a red square", "a blue square"]
    return probe.record(tiny, prompts, seeds=range(5), steps=3, batch_size=20, progress=False)


def test_features_match_independent_reductions(recording):
    nouns = [str(p).split()[-1] for p in recording["images"]["prompt"].values]
    features = subject_features(recording, nouns, {"early": [0], "late": [1, 2]})
    cross = word_map(recording["cross/res16"], 3, nouns[3]).sel(step=[1, 2]).mean(("step", "layer"))
    np.testing.assert_allclose(features[FeatureKey("cross", "map", 16, MEAN_LAYER, "late")][3], cross.values.ravel(),
                               rtol=1e-5)
    attn = recording["self/res8"]["attn"].isel(sample=7, layer=1).sel(step=[0]).values.astype(np.float64)
    layer = str(recording["self/res8"]["layer"].values[1]).rsplit(".", 1)[0]
    expected = attn.mean(axis=(0, 1, 2)).ravel()  # mean over the bin's steps and the query pixels (y, x)
    np.testing.assert_allclose(features[FeatureKey("self", "mean", 8, layer, "early")][7], expected, rtol=1e-4)
    aggregated = features[FeatureKey("self", "aggregated", 16, MEAN_LAYER, "late")]
    assert aggregated.shape == (20, 256) and np.isfinite(aggregated).all()
    np.testing.assert_allclose(aggregated.sum(-1), 1.0, atol=1e-2)  # a weighted mean of attention rows


def test_probes_on_a_real_recording_give_sane_numbers(recording):
    prompts = [str(p) for p in recording["images"]["prompt"].values]
    colour = [p.split()[1] for p in prompts]
    judged = [c if i % 3 else None for i, c in enumerate(colour)]  # as if the judge missed every third object
    table = probe_recording(recording, {"colour": colour, "judged": judged}, [p.split()[-1] for p in prompts])
    assert set(table.resolution) == {16, 8} and set(table.step_bin) == {"early", "middle", "late"}
    assert table.accuracy.between(0, 1).all() and (table.ci_low <= table.accuracy).all()
    assert (table.accuracy <= table.ci_high).all() and table.ci_low.ge(0).all() and table.ci_high.le(1).all()
    kept = [c for c in judged if c is not None]
    majority = max(kept.count(c) for c in set(kept)) / len(kept)
    by_target = table.groupby("target")
    assert by_target.n.unique().to_dict() == {"colour": [20], "judged": [len(kept)]}
    assert table[table.target == "judged"].chance.eq(majority).all()
    assert table[table.target == "colour"].chance.eq(0.5).all()


def test_grouped_cross_validation_never_splits_a_group():
    """Labels carried only by a group identity: with groups kept together a probe cannot memorise them."""
    from probe.analysis.probes import LinearProbe

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 5)
    y = np.where(groups % 2 == 0, "a", "b")  # the label is a function of the group …
    X = rng.normal(size=(20, 40))[groups] + rng.normal(0, 0.01, (100, 40))  # … and X identifies the group only
    plain = LinearProbe().cross_validate(X, y)
    grouped = LinearProbe().cross_validate(X, y, groups)
    assert plain.accuracy > 0.9  # images of a seen group leak its label across the split
    assert grouped.accuracy < 0.8  # unseen groups: no better than the group-level signal allows
    assert plain.chance == grouped.chance == 0.5  # the majority class's share of samples, whether grouped or not


def test_nested_cross_validation_of_a_part_too_small_to_split_again_chooses_the_first_set_up():
    """Two samples per class: each outer training part holds one of each, too few for inner folds; the choice
    falls back to the first set-up (fixed in advance), and the score is that set-up's out-of-fold accuracy."""
    from probe.analysis.probes import LinearProbe

    rng = np.random.default_rng(0)
    y = np.array(["a", "a", "b", "b", "c", "c"])
    blocks = [rng.normal(size=(6, 4)), rng.normal(size=(6, 4))]
    probe = LinearProbe(folds=2)
    found = probe.nested_cross_validate(blocks, y)
    assert found.chosen_folds == found.score.folds  # the first set-up in every outer fold
    plain = probe.cross_validate(blocks[0], y)
    assert found.score.accuracy == pytest.approx(plain.accuracy)
