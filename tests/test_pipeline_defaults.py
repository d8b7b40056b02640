"""Where the caller gives no steps or guidance scale, record, generate and edit run the model's own (the pipeline's
``__call__`` defaults, or its folder's ``probe.json``): ``record(pipe, prompt, seeds=[s])`` is ``pipe(prompt, …)``."""

import functools
import inspect
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import probe
from probe.models import Generation, generation
from probe.record import RecordSettings
from probe.steer.edit import edit
from probe.steer.guide import Schedule, generate

PROMPT = "a cat and a dog"
# independent of probe: diffusers' own defaults, as its pipelines' signatures state them
CALL_DEFAULTS = {"tiny": (50, 7.5), "tiny-sd3": (28, 7.0), "tiny-flux": (28, 3.5)}


def _signature_defaults(pipe) -> tuple[int, float]:
    parameters = inspect.signature(type(pipe).__call__).parameters
    return parameters["num_inference_steps"].default, parameters["guidance_scale"].default


def _plain(pipe, seed: int, **kwargs) -> np.ndarray:
    image = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(int)


def _recorded(pipe, seed: int, **kwargs):
    tree = probe.record(pipe, PROMPT, seeds=[seed], kinds=("cross",), progress=False, **kwargs)
    return tree, tree["images"]["image"].values[0].astype(int)


@pytest.mark.parametrize("name", sorted(CALL_DEFAULTS))
def test_record_makes_the_pipelines_own_image(name):
    pipe = probe.load(name)
    assert _signature_defaults(pipe) == CALL_DEFAULTS[name]  # the table above is diffusers' own
    tree, image = _recorded(pipe, 3)
    steps, scale = CALL_DEFAULTS[name]
    assert tree.attrs["steps"] == steps and tree.attrs["guidance_scale"] == scale
    assert tree["cross"].children and all(node.sizes["step"] == steps for node in tree["cross"].children.values())
    np.testing.assert_array_equal(image, _plain(pipe, 3))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_the_former_fixed_default_makes_another_image(name):
    """The test above can fail: at probe's former 50 steps and 7.5 these pipelines draw other images."""
    pipe = probe.load(name)
    _, former = _recorded(pipe, 3, steps=50, guidance_scale=7.5)
    assert not np.array_equal(former, _plain(pipe, 3))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_an_explicit_value_wins(name):
    pipe = probe.load(name)
    tree, image = _recorded(pipe, 1, steps=3, guidance_scale=1.5)
    assert tree.attrs["steps"] == 3 and tree.attrs["guidance_scale"] == 1.5
    assert np.abs(image - _plain(pipe, 1, num_inference_steps=3, guidance_scale=1.5)).max() == 0
    tree, image = _recorded(pipe, 1, steps=3)  # the scale not given: the pipeline's
    assert tree.attrs["guidance_scale"] == CALL_DEFAULTS[name][1]
    assert np.abs(image - _plain(pipe, 1, num_inference_steps=3)).max() == 0
    settings = RecordSettings(steps=2, guidance_scale=2.0, kinds=("cross",))
    tree = probe.record(pipe, PROMPT, seeds=[0], settings=settings, progress=False)
    assert (tree.attrs["steps"], tree.attrs["guidance_scale"]) == (2, 2.0)


def test_record_says_what_it_used(caplog):
    with caplog.at_level(logging.INFO, logger="probe.models"):
        _recorded(probe.load("tiny-sd3"), 0, steps=2)
    assert "record: guidance_scale 7 from StableDiffusion3Pipeline.__call__'s defaults; pass guidance_scale= to " \
           "choose" in caplog.messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="probe.models"):
        _recorded(probe.load("tiny-sd3"), 0, steps=2, guidance_scale=2.0)
    assert not caplog.messages  # the caller chose both: nothing to say


def test_generate_runs_the_pipelines_own_steps_and_scale():
    kwargs = dict(subjects=["cat", "dog"], seed=0, schedule=Schedule(alter_fraction=0.1, thresholds={}),
                  output_type="latent", progress=False)
    pipe = probe.load("tiny-flux")
    own = generate(pipe, PROMPT, **kwargs)
    assert len(own.history) == 3  # a tenth of FLUX's own 28 steps guided
    steps, scale = CALL_DEFAULTS["tiny-flux"]
    assert torch.equal(own.latents, generate(pipe, PROMPT, steps=steps, guidance_scale=scale, **kwargs).latents)
    assert not torch.equal(own.latents, generate(pipe, PROMPT, steps=50, **kwargs).latents)
    pipe = probe.load("tiny-sd3")
    own = generate(pipe, PROMPT, steps=3, **kwargs)
    assert torch.equal(own.latents, generate(pipe, PROMPT, steps=3, guidance_scale=7.0, **kwargs).latents)
    assert not torch.equal(own.latents, generate(pipe, PROMPT, steps=3, guidance_scale=7.5, **kwargs).latents)


def test_edit_runs_the_pipelines_own_steps_and_scale():
    pipe = probe.load("tiny-sd3")
    result = edit(pipe, "a cat", "a dog", seed=0, output_type="np")
    settings = result.settings
    assert (settings.num_inference_steps, settings.guidance_scale) == CALL_DEFAULTS["tiny-sd3"]
    assert settings.steps == tuple(range(round(0.8 * 28)))  # the injected share of the pipeline's 28
    explicit = edit(pipe, "a cat", "a dog", seed=0, steps=2, guidance_scale=3.0, output_type="np").settings
    assert (explicit.num_inference_steps, explicit.guidance_scale) == (2, 3.0)


# -- a model folder's own: probe.json -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    probe.load("tiny").save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved_tiny, tmp_path) -> Path:
    return Path(shutil.copytree(saved_tiny, tmp_path / "model"))


def _with_generation(folder: Path, entry: dict) -> Path:
    (folder / "probe.json").write_text(json.dumps({"generation": entry}))
    return folder


def test_a_folders_generation_entry_wins_over_the_pipeline_and_says_so(folder):
    pipe = probe.load(_with_generation(folder, {"steps": 3, "guidance_scale": 2.0, "source": "a pilot of mine"}))
    with pytest.warns(UserWarning, match=r"^record: 3 steps and guidance_scale 2 from .*probe\.json \(a pilot of "
                                         r"mine\); pass steps=, guidance_scale= to override$"):
        tree, image = _recorded(pipe, 0)
    assert (tree.attrs["steps"], tree.attrs["guidance_scale"]) == (3, 2.0)
    assert np.abs(image - _plain(pipe, 0, num_inference_steps=3, guidance_scale=2.0)).max() == 0
    with pytest.warns(UserWarning, match=r"^record: guidance_scale 2 from "):
        tree, _ = _recorded(pipe, 0, steps=2)  # the caller's steps, the folder's scale
    assert (tree.attrs["steps"], tree.attrs["guidance_scale"]) == (2, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generation(pipe, 2, 1.0, caller="record") == Generation(2, 1.0)  # the caller's, silently


def test_a_folder_that_gives_only_steps_keeps_the_pipelines_scale(folder):
    pipe = probe.load(_with_generation(folder, {"steps": 4}))
    with pytest.warns(UserWarning, match=r"^edit: 4 steps from "):
        assert generation(pipe, caller="edit") == Generation(4, 7.5)


@pytest.mark.parametrize("entry", [{"steps": 0}, {"steps": 2.5}, {"guidance_scale": -1}, {"guidance_scale": "7"},
                                   {"steps": 4, "scale": 1.0}, [4, 0.0]])
def test_a_broken_generation_entry_is_a_clear_error(folder, entry):
    pipe = probe.load(_with_generation(folder, entry))
    with pytest.raises(ValueError, match=r"probe\.json: 'generation' "):
        generation(pipe, caller="record")


# -- reading a pipeline's signature ---------------------------------------------------------------------------------


class _QwenLike:
    """A pipeline whose classifier-free guidance is ``true_cfg_scale`` (``guidance_scale`` is for distilled ones)."""

    def __call__(self, prompt=None, true_cfg_scale: float = 4.0, num_inference_steps: int = 50,
                 guidance_scale: float | None = None):
        raise AssertionError("not called")


class _NoDefaults:
    def __call__(self, prompt=None, num_inference_steps=None, **kwargs):
        raise AssertionError("not called")


def test_a_guidance_keyword_of_another_name_is_read_from_the_signature():
    run = generation(_QwenLike(), caller="record")
    assert run == Generation(50, 4.0, "true_cfg_scale")
    assert run.pipeline_kwargs() == {"num_inference_steps": 50, "true_cfg_scale": 4.0}
    assert generation(_QwenLike(), 8, 2.0, caller="record").pipeline_kwargs() == {"num_inference_steps": 8,
                                                                                  "true_cfg_scale": 2.0}


def test_a_pipeline_without_defaults_asks_for_them():
    with pytest.raises(ValueError, match=r"^generate: _NoDefaults.__call__ has no default for steps or "
                                         r"guidance_scale; pass steps=, guidance_scale=$"):
        generation(_NoDefaults(), caller="generate")
    assert generation(_NoDefaults(), 5, 1.0, caller="generate") == Generation(5, 1.0)


@pytest.mark.parametrize("steps, scale", [(0, None), (2.5, None), (None, -1.0), (None, float("nan"))])
def test_bad_values_are_refused_before_defaults_are_read(steps, scale):
    with pytest.raises((TypeError, ValueError)):
        generation(_QwenLike(), steps, scale, caller="record")


def test_record_generate_and_edit_pass_the_scale_by_the_pipelines_own_keyword(monkeypatch):
    """Qwen-Image's classifier-free guidance is ``true_cfg_scale``: the scale given (or its default) goes there."""
    pipe = probe.load("tiny-qwen-image")
    calls = []
    original = type(pipe).__call__

    @functools.wraps(original)  # the signature stays the pipeline's: record checks keywords against it
    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    size = {"height": 32, "width": 32, "max_sequence_length": 16}
    probe.record(pipe, PROMPT, seeds=[0], steps=2, guidance_scale=2.5, kinds=("cross",), progress=False, **size)
    generate(pipe, PROMPT, subjects=["cat", "dog"], seed=0, steps=2, output_type="latent", progress=False, **size)
    edit(pipe, "a cat", "a dog", seed=0, steps=2, guidance_scale=1.5, output_type="latent", **size)
    assert [(c["num_inference_steps"], c["true_cfg_scale"]) for c in calls] == [(2, 2.5), (2, 4.0), (2, 1.5)]
    assert all("guidance_scale" not in c for c in calls)
