"""The README's catalogue of bad inputs: each row's input gives its error, and nothing is written half-way."""

from __future__ import annotations

import errno
import shutil
import sys

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import probe
from probe.prompts import subject_indices
from probe.steer.edit import edit
from probe.steer.guide import generate

PROMPT = "a cat and a dog"
rec = sys.modules["probe.record.run"]  # the module that appends each batch (probe.record is also the function)


def test_zero_steps(tiny):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        probe.record(tiny, PROMPT, seeds=0, steps=0)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        generate(tiny, PROMPT, subjects=["cat"], seed=0, steps=0)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        edit(tiny, PROMPT, "a cat and a fox", seed=0, num_inference_steps=0)


def test_unknown_heads(tiny):
    with pytest.raises(ValueError, match="heads must be 'mean', 'all' or a list of head indices"):
        probe.record(tiny, PROMPT, seeds=0, steps=2, heads="some")
    with pytest.raises(ValueError, match="indices below"):
        probe.record(tiny, PROMPT, seeds=0, steps=2, heads=[99])


def test_corrupt_store(tmp_path):
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable recording.*record it again"):
        probe.open_recording(broken)
    other = tmp_path / "other.zarr"
    import xarray as xr

    xr.Dataset({"a": ("x", [1, 2])}).to_zarr(other, consolidated=False)
    with pytest.raises(ValueError, match="holds no attention groups"):
        probe.open_recording(other)


def test_repeated_subject_word(tiny):
    prompt = "a cat and a cat"
    with pytest.raises(ValueError, match=r"occurs 2 times .* say which with cat#1 … cat#2"):
        subject_indices(tiny.tokenizer, prompt, ["cat"])
    with pytest.raises(ValueError, match="occurs 2 times"):
        generate(tiny, prompt, subjects=["cat"], seed=0, steps=2)
    first, second = subject_indices(tiny.tokenizer, prompt, ["cat", "cat"])
    assert subject_indices(tiny.tokenizer, prompt, ["cat#2"]) == [second]
    assert subject_indices(tiny.tokenizer, prompt, ["cat#2", "cat#1"]) == [second, first]
    assert second[0] - first[0] == 3  # "cat", "and", "a", "cat": the positions are the tokens', not guesses
    with pytest.raises(ValueError, match="cat#1 to cat#2"):
        subject_indices(tiny.tokenizer, prompt, ["cat#3"])
    with pytest.raises(ValueError, match="already takes"):
        subject_indices(tiny.tokenizer, prompt, ["cat#1", "cat#1"])


def test_nan_noise(tiny):
    from probe.steer.pipelines import initial_noise

    noise = initial_noise(tiny, torch.Generator().manual_seed(0), None, None)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        generate(tiny, PROMPT, subjects=["cat"], seed=0, steps=2, init_noise=noise)
    with pytest.raises(ValueError, match="starts from noise of shape"):
        generate(tiny, PROMPT, subjects=["cat"], seed=0, steps=2, init_noise=torch.zeros(3))


def test_unknown_scheduler():
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpm\+\+\+'"):
        probe.load("tiny", scheduler="dpm+++")
    with pytest.raises(ValueError, match="does not fit this model"):
        probe.load("tiny", scheduler="flow-euler")
    pipe = probe.load("tiny", scheduler="dpm++-karras")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_karras_sigmas


def test_wrong_pipeline_kind(tiny):
    img2img = StableDiffusionImg2ImgPipeline(**tiny.components)
    with pytest.raises(TypeError, match="takes image.*text-to-image"):
        probe.record(img2img, PROMPT, seeds=0, steps=2)
    with pytest.raises(TypeError, match="takes image"):
        generate(img2img, PROMPT, subjects=["cat"], seed=0, steps=2)
    with pytest.raises(TypeError, match="load takes a model name"):
        probe.load(tiny.unet)


def test_size_not_divisible(tiny):
    with pytest.raises(ValueError, match=r"height=36 px: .*multiples of 8 px.*use height=32"):
        probe.record(tiny, PROMPT, seeds=0, steps=2, height=36, width=32)
    with pytest.raises(ValueError, match="width=44 px"):
        generate(tiny, PROMPT, subjects=["cat"], seed=0, steps=2, height=32, width=44)


def test_over_budget(tiny):
    need = probe.estimate(tiny, PROMPT, seeds=[0, 1], steps=2)
    with pytest.raises(MemoryError, match="needs an estimated"):
        probe.record(tiny, PROMPT, seeds=[0, 1], steps=2, max_bytes=need - 1)


def test_disk_too_small(tiny, tmp_path, monkeypatch):
    out = tmp_path / "rec.zarr"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10))
    with pytest.raises(OSError, match="has 0.0 MB free") as err:
        probe.record(tiny, PROMPT, seeds=0, steps=2, out=out)
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


def test_disk_full_mid_write(tiny, tmp_path, monkeypatch):
    out = tmp_path / "rec.zarr"
    writes = []

    def fill(path, groups, attrs, first):
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        original(path, groups, attrs, first)

    original = rec.append_zarr
    monkeypatch.setattr(rec, "append_zarr", fill)
    with pytest.raises(OSError, match="the disk filled while writing .*nothing was kept"):
        probe.record(tiny, PROMPT, seeds=[0, 1], steps=2, out=out)
    assert writes and not list(tmp_path.iterdir())


def test_interrupted_write_keeps_the_old_recording(tiny, tmp_path, monkeypatch):
    out = tmp_path / "rec.zarr"
    before = probe.record(tiny, PROMPT, seeds=0, steps=2, out=out)["cross"].children
    calls = []

    def interrupt(path, groups, attrs, first):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(path, groups, attrs, first)

    original = rec.append_zarr
    monkeypatch.setattr(rec, "append_zarr", interrupt)
    with pytest.raises(KeyboardInterrupt):
        probe.record(tiny, PROMPT, seeds=[0, 1], steps=2, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.zarr"]  # no .partial left
    after = probe.open_recording(out)
    assert set(after["cross"].children) == set(before)
    assert all(after[f"cross/{g}"].sizes["sample"] == 1 for g in before)


def test_a_sweep_larger_than_the_free_disk_is_refused_before_it_starts(tiny, tmp_path, monkeypatch):
    from probe.record import sweep as sweeps

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10))
    with pytest.raises(OSError, match="needs an estimated .* MB but .* MB free"):
        sweeps.sweep(tiny, [PROMPT], seeds=[0, 1], out=tmp_path / "s", steps=2, kinds=("cross",), shard=(0, 1),
                     progress=False)
    assert not (tmp_path / "s" / "maps.zarr").exists()
