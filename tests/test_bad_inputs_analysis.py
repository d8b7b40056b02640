"""Bad inputs to analysis, the explorer, the studies and the command line: each is refused with one clear error
(what was wrong, what was expected, what to do) before anything is generated, or does what was meant."""

import sys

import numpy as np
import pytest
import torch
import xarray as xr

import probe
from probe.analysis import lazy
from probe.analysis.maps import gaussian_smooth, word_map
from probe.cli import main, parser
from probe.prompts import subjects_of
from probe.ui.explore import ViewModel

SD3_PROMPTS = ["a cat and a dog", "a cat and a cat"]


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "rec.zarr"
    probe.record(probe.load("tiny-sd3"), SD3_PROMPTS, seeds=[0], steps=2, out=path, progress=False)
    return path


@pytest.fixture(scope="module")
def sd3_tree(sd3_store):
    return probe.open_recording(sd3_store)


def _copies(group, sample: int, word: str, occurrence: int = 0) -> list[int]:
    """Independently of probe.prompts: the token indices of the word's ``occurrence``-th copy in each encoder."""
    texts = [str(t) for t in group["token_text"].values[sample]]
    encoders = [str(e) for e in group["encoder"].values[sample]]
    found = []
    for encoder in ("clip", "t5"):
        hits = [i for i, (t, e) in enumerate(zip(texts, encoders)) if e == encoder and t == word]
        found.append(hits[occurrence])
    return found


def _mean_of_tokens(group, sample: int, indices: list[int]) -> np.ndarray:
    attn = group["attn"].isel(sample=sample).values.astype(np.float32)  # (step, layer, y, x, token)
    return attn[..., indices].mean(-1)


# -- 1. SD3: a word means its CLIP and its T5 copy; word#k names an occurrence ------------------------------------


def test_sd3_word_map_reads_the_clip_and_the_t5_copy(sd3_tree):
    group = sd3_tree["cross/res8"]
    indices = _copies(group, 0, "dog")
    assert set(group["encoder"].values[0][indices]) == {"clip", "t5"}
    np.testing.assert_allclose(word_map(group, 0, "dog").values, _mean_of_tokens(group, 0, indices), rtol=1e-6)


def test_word_map_takes_an_occurrence_and_refuses_an_ambiguous_word(sd3_tree):
    group = sd3_tree["cross/res8"]
    second = _copies(group, 1, "cat", occurrence=1)
    np.testing.assert_allclose(word_map(group, 1, "cat#2").values, _mean_of_tokens(group, 1, second), rtol=1e-6)
    with pytest.raises(ValueError, match=r"'cat' occurs 2 times .* say which with cat#1 … cat#2"):
        word_map(group, 1, "cat")


def test_explorer_and_lazy_subjects_read_both_copies_on_sd3(sd3_tree):
    group = sd3_tree["cross/res8"]
    model = ViewModel(sd3_tree)
    assert model.subjects(0) == [("cat", _copies(group, 0, "cat")), ("dog", _copies(group, 0, "dog"))]
    assert model.subjects(1) == [("cat", _copies(group, 1, "cat", 0)), ("cat", _copies(group, 1, "cat", 1))]
    maps = lazy.subject_maps(group).compute()
    attn = group["attn"].values.astype(np.float32).mean(2)  # (sample, step, y, x, token): layer mean
    np.testing.assert_allclose(maps.isel(sample=0, subject=1).values, attn[0][..., _copies(group, 0, "dog")].mean(-1),
                               rtol=1e-5)
    # the A&E view softmaxes over the words of both copies: not CLIP's end token nor T5's own start and end
    texts = [str(t) for t in group["token_text"].values[0]]
    words = [i for i, t in enumerate(texts) if t in ("a", "cat", "and", "dog")]
    soft = torch.softmax(100 * torch.from_numpy(attn[0][..., words]), -1)
    dog = [words.index(i) for i in _copies(group, 0, "dog")]
    expected = gaussian_smooth(soft[..., dog].mean(-1))
    ae = lazy.subject_maps(group, view="ae").compute()
    np.testing.assert_allclose(ae.isel(sample=0, subject=1).values, expected.numpy(), rtol=1e-4, atol=1e-7)


def test_show_draws_a_named_occurrence_and_refuses_an_unrecorded_step(sd3_store, tmp_path, capsys):
    assert main(["show", str(sd3_store), "--token", "cat#2", "--sample", "1", "--out", str(tmp_path / "c.png")]) == 0
    assert main(["show", str(sd3_store), "--token", "dog", "--step", "99", "--out", str(tmp_path / "d.png")]) == 2
    assert "step 99 was not recorded; the recorded steps are [0, 1]" in capsys.readouterr().err


# -- 2. analysis and the explorer ----------------------------------------------------------------------------------


def test_overlap_table_needs_two_subjects(sd3_store):
    with pytest.raises(ValueError, match="overlap_table .* needs at least two subject words, got subjects=\\[\\]"):
        lazy.overlap_table(sd3_store, subjects=[])


def test_explorer_refuses_a_recording_without_samples(sd3_tree):
    empty = sd3_tree.isel(sample=[], missing_dims="ignore")
    with pytest.raises(ValueError, match="holds no samples .* record at least one prompt and seed"):
        probe.explore(empty)


def test_explorer_without_ipywidgets_says_how_to_install_it(sd3_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError, match='ipywidgets, which is not installed.*pip install "probe\\[notebooks\\]"'):
        probe.explore(sd3_tree)


# -- 3. the command line -------------------------------------------------------------------------------------------


def _parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_prompts_file_missing_or_empty(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["study", "guidance", "--model", "tiny", "--prompts", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"probe study: prompt file '{missing}' does not exist; give the path of a .txt file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["study", "guidance", "--model", "tiny", "--prompts", "animals", str(empty)]) == 2
    assert f"prompt file '{empty}' holds no prompts; write one prompt per line" in capsys.readouterr().err


def test_set_refuses_unknown_keywords_and_unparsable_values(capsys):
    assert main(["study", "guidance", "--model", "tiny", "--set", "n_imags=2"]) == 2
    err = capsys.readouterr().err
    assert "guidance_study has no keyword 'n_imags'; did you mean n_images?" in err and "seeds_per_prompt" in err
    assert main(["study", "guidance", "--model", "tiny", "--set", "methods=('none', 'ae'"]) == 2
    assert "is neither a Python literal" in capsys.readouterr().err
    assert main(["study", "guidance", "--model", "tiny", "--set", "n_images=abc"]) == 2
    assert "n_images='abc': guidance_study's n_images takes int | None" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [
    ("clip@x", "the threshold after '@' must be a number from -1 to 1"),
    ("foo", "unknown judge 'foo'; give exact, clip"),
    ("exact@0.5", "the exact judge takes no model and no threshold"),
    ("detector@2", "the threshold after '@' must be a number from 0 to 1"),
])
def test_malformed_judge_is_refused_before_any_model_loads(spec, message, capsys):
    assert message in _parse_error(["study", "guidance", "--judge", spec], capsys)


@pytest.mark.parametrize("shard", ["3/2", "a/b", "1", "2/2"])
def test_malformed_shard_is_refused(shard, capsys):
    argv = ["sweep", "--prompt", "a cat", "--out", "x", "--shard", shard]
    assert f"argument --shard: give I/N, share I of N counted from 0 (0 ≤ I < N, e.g. 0/4 … 3/4), not '{shard}'" in (
        _parse_error(argv, capsys))
    assert parser().parse_args([*argv[:-1], "1/2"]).shard == (1, 2)


def test_edit_out_without_an_image_extension_is_refused_before_generating(capsys):
    err = _parse_error(["edit", "--source", "a red circle", "--target", "a blue circle", "--out", "e9"], capsys)
    assert "cannot write the image to 'e9': it has no file extension; give a name such as e9.png" in err


def test_max_mb_must_be_positive(capsys):
    err = _parse_error(["record", "--prompt", "a cat", "--out", "r.zarr", "--max-mb", "0"], capsys)
    assert "argument --max-mb: give a positive size in MB (e.g. 500), not '0'" in err


def test_study_sizes_below_one_are_refused(tiny):
    from probe.studies import guidance_study, self_cross_study

    with pytest.raises(ValueError, match="n_images=-3: n_images is the number of .* must be at least 1"):
        guidance_study(tiny, n_images=-3, steps=1, quick=True, methods=("none",), initno=(False,), progress=False)
    with pytest.raises(ValueError, match="seeds_per_prompt=0: seeds_per_prompt is the number of seeds"):
        self_cross_study(tiny, n_images=1, seeds_per_prompt=0, steps=1, methods=("none",), initno=(False,),
                         progress=False)


# -- 4. the exact judge on a model that is not the shapes world ----------------------------------------------------


def test_exact_judge_refuses_a_users_model_and_warns_on_a_test_model(tiny):
    from probe.shapes.judge import judge as exact_judge
    from probe.shapes.judge import model_world, require_shapes_world
    from probe.studies import probe_study

    users = probe.load("tiny")
    users.register_to_config(_name_or_path="/home/me/my-sd15")
    with pytest.raises(ValueError, match="not a shapes-world model.*--judge clip:DIR or --judge detector:DIR"):
        probe_study(users, steps=1, quick=True, progress=False)
    with pytest.warns(UserWarning, match="random test model, with the shapes world's exact judge"):
        require_shapes_world(tiny, exact_judge, "guidance")
    require_shapes_world(users, lambda image, prompt: [], "guidance")  # another judge: no check
    assert model_world(probe.load("shapes")) == "shapes"


def test_judge_from_spec_refuses_a_threshold_for_the_exact_judge():
    from probe.judges import judge_from_spec

    with pytest.raises(ValueError, match="'exact@0.5': the exact judge takes no model and no threshold"):
        judge_from_spec("exact@0.5")


# -- 5. guessed subjects -------------------------------------------------------------------------------------------


def test_subjects_are_not_guessed_from_an_adverb():
    with pytest.raises(ValueError, match="cannot find the subject nouns of 'running quickly': 'quickly'.* give the "
                                         "subjects yourself"):
        subjects_of("running quickly")
    assert subjects_of("an apple and a banana and an orange") == ["apple", "banana", "orange"]
    assert subjects_of("a horse and a donkey and zebra") == ["horse", "donkey", "zebra"]


# -- 6. a foreign file with a `cross` group ------------------------------------------------------------------------


def test_recording_schema_problems_of_a_foreign_file(sd3_tree, tmp_path):
    foreign = xr.DataTree.from_dict({"/": xr.Dataset(attrs={"title": "weather"}),
                                     "/cross/res8": xr.Dataset({"temperature": ("time", np.arange(3.0))})})
    foreign.to_netcdf(tmp_path / "foreign.nc", engine="h5netcdf")
    problems = lazy.recording_schema_problems(xr.open_datatree(tmp_path / "foreign.nc", engine="h5netcdf"))
    assert problems == ["its root has no probe_version attribute (every recording and sweep store has one)",
                        "/cross/res8 holds neither attn nor q and k (its variables: ['temperature'])"]
    assert lazy.recording_schema_problems(sd3_tree) == []
