"""Bad inputs to record, guide.generate, edit, inversion and load: each is refused with a clear error before anything is
generated, or does what the user meant (the README's "Bad inputs" table)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import probe
from probe.record import plan as record_plan
from probe.steer.edit import _edit_steps, edit, study
from probe.steer.guide import generate
from probe.steer.inversion import encode, invert

PROMPT = "a cat and a dog"
TARGET = "a cat and a fox"
LONG = "a cat " * 60  # 122 tokens: over CLIP's 77


@pytest.fixture(scope="module")
def tiny_sd3():
    return probe.load("tiny-sd3")


def _record(pipe, **kwargs):
    args = {"seeds": 0, "steps": 1, "progress": False, **kwargs}
    return probe.record(pipe, args.pop("prompts", PROMPT), **args)


def _generate(pipe, **kwargs):
    args = {"prompt": PROMPT, "subjects": ["cat", "dog"], "seed": 0, "steps": 1, "progress": False, **kwargs}
    return generate(pipe, args.pop("prompt"), **args)


def _edit(pipe, **kwargs):
    args = {"seed": 0, "steps": 1, **kwargs}
    return edit(pipe, args.pop("source", PROMPT), args.pop("target", TARGET), **args)


CALLS = {"record": _record, "generate": _generate, "edit": _edit}


# -- 1. guidance scale ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(("scale", "match"), [
    (math.nan, r"guidance_scale=nan: .*must be a finite number"),
    (math.inf, r"guidance_scale=inf: .*must be a finite number"),
    (-5, r"guidance_scale=-5 is negative: give a scale of at least 0"),
])
def test_guidance_scale_must_be_finite_and_not_negative(tiny, call, scale, match):
    with pytest.raises(ValueError, match=match):
        CALLS[call](tiny, guidance_scale=scale)


def test_guidance_scale_of_at_most_one_turns_guidance_off_and_is_allowed(tiny):
    tree = _record(tiny, guidance_scale=0.5, kinds="cross")
    assert tree.attrs["guidance_scale"] == 0.5


# -- 2. seeds ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "error", "match"), [
    (1.5, TypeError, r"seeds=1.5: a seed is a whole number \(int\) in 0 … 2\*\*63-1"),
    (math.nan, TypeError, r"seeds=nan: a seed is a whole number"),
    (None, TypeError, r"seeds=None: a seed is a whole number"),
    (True, TypeError, r"seeds=True: a seed is a whole number"),
    (2**63, ValueError, r"seeds=9223372036854775808: a seed is a whole number in 0 … 2\*\*63-1"),
    (-1, ValueError, r"seeds=-1: a seed is a whole number in 0 … 2\*\*63-1"),
])
def test_a_seed_is_a_whole_number_in_range(tiny, seed, error, match):
    with pytest.raises(error, match=match):
        _record(tiny, seeds=seed)
    with pytest.raises(error, match=match.replace("seeds=", "seed=")):
        _generate(tiny, seed=seed)
    if seed is not None:  # edit's seed=None means "a real image": its own error
        with pytest.raises(error, match=match.replace("seeds=", "seed=")):
            _edit(tiny, seed=seed)


def test_numpy_seeds_are_fine(tiny):
    plan = record_plan(tiny, PROMPT, seeds=np.array([3, 4]), steps=1)
    assert [s for _, s in plan.samples] == [3, 4] and all(type(s) is int for _, s in plan.samples)


def test_each_sample_is_recorded_once_and_from_its_seed(tiny):
    with pytest.raises(ValueError, match=r"seeds lists 0 more than once: each \(prompt, seed\) sample is generated"):
        _record(tiny, seeds=[0, 0])
    with pytest.raises(ValueError, match="prompts lists 'a cat' more than once"):
        _record(tiny, prompts=["a cat", "a cat"])
    latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"record sets latents= itself \(the seed draws .*init_noise=tensor"):
        _record(tiny, seeds=[0, 1], latents=latents)


# -- 3. keep_steps, kinds, layers, batch_size ------------------------------------------------------------------------


def test_record_request_shapes(tiny):
    with pytest.raises(TypeError, match=r"keep_steps takes whole step indices \(ints\) in 0 … 1, got 0.7"):
        _record(tiny, steps=2, keep_steps=[0.7])
    one = probe.estimate(tiny, PROMPT, seeds=0, steps=1, kinds="cross")  # one string is one kind, not its letters
    assert one == probe.estimate(tiny, PROMPT, seeds=0, steps=1, kinds=("cross",))
    with pytest.raises(ValueError, match=r"unknown attention kinds \['crosss'\]; give one or more of \('cross'"):
        _record(tiny, kinds=["crosss"])
    with pytest.raises(ValueError, match=r"layer pattern 're:attn\[' is not a valid regular expression"):
        _record(tiny, layers="re:attn[")


@pytest.mark.parametrize(("size", "error"), [(0, ValueError), (-2, ValueError), (1.5, TypeError)])
def test_batch_size_is_a_positive_whole_number(tiny, size, error):
    with pytest.raises(error, match=f"batch_size={size}: batch_size is the number of samples generated together"):
        _record(tiny, batch_size=size)


# -- 4. keywords -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_unknown_keywords_are_refused_with_close_matches(tiny, call):
    with pytest.raises(TypeError, match=f"{call} got an unknown keyword 'foo'"):
        CALLS[call](tiny, foo=1)
    with pytest.raises(TypeError, match="unknown keyword 'negative_promt'.*did you mean negative_prompt"):
        CALLS[call](tiny, negative_promt="blurry")


@pytest.mark.parametrize("call", ["record", "generate"])
def test_num_inference_steps_says_use_steps(tiny, call):
    with pytest.raises(TypeError, match=f"{call} takes the number of denoising steps as steps=.*use steps=3"):
        CALLS[call](tiny, num_inference_steps=3)


def test_edit_steps_is_the_number_of_steps_and_inject_steps_the_injected_ones(tiny):
    result = _edit(tiny, steps=2, inject_steps=[1], output_type="latent")
    assert result.settings.num_inference_steps == 2 and result.settings.steps == (1,)
    with pytest.warns(DeprecationWarning) as caught:  # the old names, one release long
        old = edit(tiny, PROMPT, TARGET, seed=0, steps=[1], num_inference_steps=2, output_type="latent")
    messages = [str(w.message) for w in caught]
    assert any("edit(num_inference_steps=2) is now edit(steps=2)" in m for m in messages)
    assert any("edit(steps=[1]) for the injected steps is now edit(inject_steps=[1])" in m for m in messages)
    assert old.settings == result.settings
    torch.testing.assert_close(old.edited, result.edited)
    with pytest.warns(DeprecationWarning, match=r"edit\(steps=0.5\) for the injected steps is now edit\(inject_steps"):
        assert _edit_steps(0.5, None, None) == (50, 0.5)
    assert _edit_steps(None, None, None) == (50, 0.8) and _edit_steps(10, [0], None) == (10, [0])
    with pytest.raises(TypeError, match="in its old meaning .* give the injected steps as inject_steps="):
        _edit_steps(0.5, 0.8, None)
    with pytest.warns(DeprecationWarning, match=r"study\(num_inference_steps=2\) is now study\(steps=2\)"):
        study(tiny, n_seeds=0, steps_fractions=(0.5,), num_inference_steps=2)


# -- 5. max_bytes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "error"), [(math.nan, ValueError), (-1, ValueError), ("1GB", TypeError)])
def test_max_bytes_is_a_size(tiny, limit, error):
    with pytest.raises(error, match=f"max_bytes={limit!r}: give the largest estimated size to record"):
        _record(tiny, max_bytes=limit)


# -- 6. prompt length ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["generate", "edit"])
def test_a_prompt_over_the_text_encoders_limit_is_refused_everywhere(tiny, call):
    key = "prompt" if call == "generate" else "source"
    with pytest.raises(ValueError, match="has 122 tokens; the text encoder takes at most 77.*Shorten the prompt"):
        CALLS[call](tiny, **{key: LONG}, **({"subjects": ["cat"]} if call == "generate" else {"target": LONG}))


# -- 7. types, devices, models ---------------------------------------------------------------------------------------


def test_prompts_and_subjects_are_text(tiny):
    for bad in (123, None):
        with pytest.raises(TypeError, match=f"prompts must be a string .*got {type(bad).__name__} {bad}"):
            _record(tiny, prompts=bad)
        with pytest.raises(TypeError, match="prompt must be a string"):
            _generate(tiny, prompt=bad)
        with pytest.raises(TypeError, match="source_prompt must be a string"):
            _edit(tiny, source=bad)
    with pytest.raises(TypeError, match=r"subjects are words of the prompt \(strings\).*got 1 in \[1, 2\]"):
        _generate(tiny, subjects=[1, 2])


@pytest.mark.parametrize("call", CALLS)
def test_a_float_size_is_refused(tiny, call):
    with pytest.raises(TypeError, match=r"height=32.0: give a whole number of pixels \(an int\); use height=32"):
        CALLS[call](tiny, height=32.0, width=32)


def test_load_refuses_what_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="device='meta' holds tensor shapes without data"):
        probe.load("tiny", device="meta")
    with pytest.raises(ValueError, match="load got an empty model name; give a built-in name"):
        probe.load("")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NopePipeline"}))
    with pytest.raises(ValueError, match="names the pipeline class 'NopePipeline', which diffusers .* does not have"):
        probe.load(tmp_path)


def test_max_sequence_length_is_at_least_one(tiny_sd3):
    with pytest.raises(ValueError, match="max_sequence_length=0: max_sequence_length is the number of T5 tokens"):
        _record(tiny_sd3, max_sequence_length=0)
    with pytest.raises(ValueError, match="max_sequence_length=0"):
        _edit(tiny_sd3, max_sequence_length=0)


# -- 8. objectives ---------------------------------------------------------------------------------------------------


def _nan_objective(maps):
    return maps.subjects.sum((-3, -2, -1)) * math.nan


def _detached_objective(maps):
    return maps.subjects.detach().sum((-3, -2, -1))


def _float_objective(maps):
    return 0.5


def test_objectives_that_cannot_guide_are_refused(tiny):
    with pytest.raises(ValueError, match=r"objective\['iou'\]=nan: .*the weight of that term and must be a finite"):
        _generate(tiny, objective={"ae": 1, "iou": math.nan})
    with pytest.raises(ValueError, match="objective '_nan_objective' gave a loss of nan at the first guided"):
        _generate(tiny, objective=_nan_objective)
    with pytest.raises(ValueError, match="objective '_detached_objective' returned a loss without a gradient"):
        _generate(tiny, objective=_detached_objective)
    with pytest.raises(TypeError, match="objective '_float_objective' returned float, not a tensor"):
        _generate(tiny, objective=_float_objective)


# -- 9. images to invert ---------------------------------------------------------------------------------------------


def _circle(size: int = 32) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 255, np.uint8)
    image[(y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / 4) ** 2] = (200, 30, 30)
    return image


def test_images_to_invert(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"float values lie in \[30, 255\] .* must lie in \[0, 1\]: divide by 255"):
        invert(tiny, _circle().astype(np.float32), "a red circle", 1)
    nan = _circle() / 255.0
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="the image holds 1 NaN or infinite values"):
        invert(tiny, nan, "a red circle", 1)
    chw = torch.from_numpy(_circle() / 255.0).permute(2, 0, 1)
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\), channels first: give H×W×3 \(channels last\)"):
        invert(tiny, chw, "a red circle", 1)
    # a path string is read with PIL: what the user meant
    path = tmp_path / "circle.png"
    Image.fromarray(_circle()).save(path)
    torch.testing.assert_close(encode(tiny, str(path)), encode(tiny, _circle()))
    with pytest.raises(FileNotFoundError, match="no image file at"):
        encode(tiny, str(tmp_path / "missing.png"))
