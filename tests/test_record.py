"""Recordings against independent computations."""

import numpy as np
import pytest
import torch
import xarray as xr

import probe
from probe.prompts import token_indices

LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
SELF_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def _projections(pipe, names):
    """Forward hooks that keep each named module's to_q / to_k outputs, call by call."""
    kept, handles = {}, []
    for name in names:
        module = pipe.unet.get_submodule(name)
        for proj in ("to_q", "to_k"):
            handles.append(getattr(module, proj).register_forward_hook(
                lambda m, a, out, key=(name, proj): kept.setdefault(key, []).append(out.detach().clone())))
    return kept, handles


def _head_mean_softmax(attn, q, k):
    """softmax(q·kᵀ·scale) of a module's projections, conditional half, head mean: (queries, keys)."""
    b, heads = q.shape[0], attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[b // 2:].mean(1)[0]


def test_recorded_probabilities_equal_softmax_qk(tiny):
    kept, handles = _projections(tiny, [LAYER, SELF_LAYER])
    try:
        tree = probe.record(tiny, "a cat and a dog", seeds=3, steps=3, layers=[LAYER, SELF_LAYER],
                            keep_padding=True, progress=False)
    finally:
        for h in handles:
            h.remove()
    for name, group in ((LAYER, "cross/res16"), (SELF_LAYER, "self/res16")):
        attn = tiny.unet.get_submodule(name)
        rec = tree[group]["attn"].sel(layer=name).isel(sample=0)
        for step in range(3):
            probs = _head_mean_softmax(attn, kept[(name, "to_q")][step], kept[(name, "to_k")][step])
            got = torch.from_numpy(rec.isel(step=step).values.astype(np.float32)).reshape(probs.shape)
            torch.testing.assert_close(got, probs, atol=1e-3, rtol=0)
            torch.testing.assert_close(got.sum(-1), torch.ones(probs.shape[0]), atol=2e-3, rtol=0)


def test_left_padding_records_each_token_at_its_own_position(tiny_left):
    """With padding before the start token, the recorded token i is the encoder's position P − n + i."""
    kept, handles = _projections(tiny_left, [LAYER])
    try:
        tree = probe.record(tiny_left, "a cat and a dog", seeds=3, steps=2, kinds=("cross",), layers=[LAYER],
                            progress=False)
    finally:
        for h in handles:
            h.remove()
    ds = tree["cross/res16"]
    texts = list(ds.token_text.values[0])
    assert texts == ["<|startoftext|>", "a", "cat", "and", "a", "dog", "<|endoftext|>"]
    attn = tiny_left.unet.get_submodule(LAYER)
    total = tiny_left.tokenizer.model_max_length
    for step in range(2):
        probs = _head_mean_softmax(attn, kept[(LAYER, "to_q")][step], kept[(LAYER, "to_k")][step])
        expected = probs[:, total - len(texts):]
        got = torch.from_numpy(ds["attn"].isel(sample=0, step=step, layer=0).values.astype(np.float32))
        torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-3, rtol=0)


def test_coordinates_match_model_and_scheduler(tiny):
    tree = probe.record(tiny, "a red circle", seeds=0, steps=3, kinds=("cross",), progress=False)
    timesteps = tiny.scheduler.timesteps.numpy().astype(float)
    layers = {layer.name: layer for layer in probe.models.attention_layers(tiny) if layer.kind == "cross"}
    assert set(tree["cross"].children) == {"res16", "res8"}
    for res in ("res16", "res8"):
        ds = tree["cross"][res].ds
        assert list(ds.timestep.values) == list(timesteps)
        for name in ds.layer.values:
            assert layers[str(name)].grid == (ds.sizes["y"], ds.sizes["x"]) == ((16, 16) if res == "res16" else (8, 8))
        assert list(ds.token_text.values[0]) == ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"]
    assert tree.attrs["steps"] == 3 and tree.attrs["scheduler"] == "DDIMScheduler"
    assert "self" not in tree.children


def test_images_equal_the_plain_pipeline(tiny):
    tree = probe.record(tiny, "a cat", seeds=[5], steps=3, kinds=("cross",), progress=False)
    plain = tiny("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
    diff = np.abs(tree["images"]["image"].values[0].astype(int) - (plain[0] * 255).round().astype(int))
    assert diff.max() <= 1


def test_batched_prompts_keep_their_own_tokens(tiny):
    prompts = ["a cat and a dog", "a hippopotamus"]
    one = probe.record(tiny, prompts, seeds=[1], steps=2, kinds=("cross",), layers=[LAYER], progress=False)
    two = probe.record(tiny, prompts, seeds=[1], steps=2, kinds=("cross",), layers=[LAYER], batch_size=2,
                       progress=False)
    tokens = one["cross/res16"].token_text.values
    n_hippo = len(tiny.tokenizer("a hippopotamus").input_ids)
    assert list(tokens[0][:7]) == ["<|startoftext|>", "a", "cat", "and", "a", "dog", "<|endoftext|>"]
    assert list(two["cross/res16"].token_text.values[1]) == list(tokens[1])
    attn = two["cross/res16"]["attn"].values
    assert np.isnan(attn[0, ..., 7:]).all() and not np.isnan(attn[0, ..., :7]).any()
    assert not np.isnan(attn[1, ..., :n_hippo]).any()
    assert token_indices(list(tokens[1]), "hippopotamus") == list(range(2, n_hippo - 1))
    np.testing.assert_allclose(attn.astype(float), one["cross/res16"]["attn"].values.astype(float), atol=2e-3)


def test_same_seed_is_bit_identical(tiny):
    a, b = (probe.record(tiny, "a dog", seeds=[7], steps=2, progress=False) for _ in range(2))
    for group in ("cross/res16", "self/res8", "images"):
        xr.testing.assert_identical(a[group].ds, b[group].ds)


def test_heads_all_and_subset(tiny):
    full = probe.record(tiny, "a dog", seeds=[0], steps=2, kinds=("cross",), layers=[LAYER], heads="all",
                        progress=False)["cross/res16"]["attn"]
    sub = probe.record(tiny, "a dog", seeds=[0], steps=2, kinds=("cross",), layers=[LAYER], heads=[1, 3],
                       progress=False)["cross/res16"]["attn"]
    mean = probe.record(tiny, "a dog", seeds=[0], steps=2, kinds=("cross",), layers=[LAYER],
                        progress=False)["cross/res16"]["attn"]
    assert full.sizes["head"] == 4 and list(sub["head"].values) == [1, 3]
    np.testing.assert_array_equal(sub.values, full.sel(head=[1, 3]).values)
    np.testing.assert_allclose(full.astype(float).mean("head").values, mean.values.astype(float), atol=1e-3)


def test_pooled_keys_and_query_points_are_the_full_maps_reduced(tiny, tmp_path):
    kw = {"seeds": [1], "steps": 2, "kinds": ("self",), "heads": "all", "progress": False}
    full = probe.record(tiny, "a red circle", **kw)
    pooled = probe.record(tiny, "a red circle", self_keys=4, **kw)
    points = [(0.5, 0.25), (0.0, 0.99)]
    queried = probe.record(tiny, "a red circle", self_queries=points, self_keys=4, **kw)
    for group in full["self"].children:
        attn = full[f"self/{group}"]["attn"]
        h = attn.sizes["y"]
        side = min(4, h)
        blocks = attn.values.reshape(*attn.shape[:-2], side, h // side, side, h // side)
        expected = blocks.astype(np.float32).sum((-3, -1))  # the mass of each 4×4 cell of keys (16² → 4², 8² → 4²)
        np.testing.assert_allclose(pooled[f"self/{group}"]["attn"].values, expected, atol=2e-3, rtol=1e-2)
        got = queried[f"self/{group}"]
        cells = [(int(fy * h), int(fx * h)) for fy, fx in points]
        assert list(zip(got["query_y"].values, got["query_x"].values)) == cells
        for i, (y, x) in enumerate(cells):
            np.testing.assert_allclose(got["attn"].isel(point=i).values, expected[..., y, x, :, :], atol=2e-3,
                                       rtol=1e-2)
        assert got["attn"].dims == ("sample", "step", "layer", "head", "point", "ky", "kx")
    estimate = probe.estimate(tiny, "a red circle", self_queries=points, self_keys=4,
                              **{k: v for k, v in kw.items() if k != "progress"})
    assert estimate == sum(queried[f"self/{g}"]["attn"].size * 2 for g in queried["self"].children) + queried[
        "images"]["image"].size  # float16 maps, uint8 pixels
    path = tmp_path / "points.zarr"
    probe.record(tiny, "a red circle", self_queries=points, out=path, **kw)
    with pytest.raises(ValueError, match="needs full self-attention maps.*chosen query points"):
        probe.explore(probe.open_recording(path))
    for bad, match in (({"self_keys": 3}, "does not divide"), ({"self_keys": 0}, "an int ≥ 1"),
                       ({"self_queries": [(0.5, 1.0)]}, r"fractions in \[0, 1\)"),
                       ({"self_queries": [0.5]}, "takes \\(y, x\\) pairs")):
        with pytest.raises(ValueError, match=match):
            probe.record(tiny, "a red circle", **kw, **bad)


def test_a_qk_store_makes_the_recorded_maps_on_read(tiny, tmp_path):
    from probe.analysis import lazy

    kw = {"seeds": [0, 1], "steps": 2, "kinds": ("cross", "self"), "progress": False}
    maps = probe.record(tiny, "a red circle", **kw)
    path = tmp_path / "qk.zarr"
    qk = probe.record(tiny, "a red circle", self_store="qk", out=path, **kw)
    np.testing.assert_array_equal(qk["images"]["image"].values, maps["images"]["image"].values)
    xr.testing.assert_identical(qk["cross/res16"].ds.load(), maps["cross/res16"].ds.load())
    stored = 0
    for group in maps["self"].children:
        made = lazy.self_from_qk(qk[f"self/{group}"])
        assert made.chunks is not None and made.dims == maps[f"self/{group}"]["attn"].dims
        np.testing.assert_allclose(made.values, maps[f"self/{group}"]["attn"].values.astype(np.float32), atol=2e-3)
        ds = qk[f"self/{group}"].ds
        assert ds["q"].dtype == ds["k"].dtype == np.float32  # as the model scored them
        stored += ds["q"].nbytes + ds["k"].nbytes
        heads = lazy.self_from_qk(ds, heads="all").isel(sample=0, step=1, layer=0).values
        np.testing.assert_allclose(heads.sum((-2, -1)), 1, atol=1e-5)  # every head's rows are probabilities
        np.testing.assert_allclose(heads.mean(0), made.isel(sample=0, step=1, layer=0).values, atol=1e-6)
    q16 = qk["self/res16"]["q"]
    assert q16.sizes["head"] * q16.sizes["dim"] * 2 < 256  # 16²: q and k per query are smaller than a map row
    estimate = probe.estimate(tiny, "a red circle", self_store="qk", **{k: v for k, v in kw.items() if k != "progress"})
    cross = sum(qk[f"cross/{g}"]["attn"].size * 2 for g in qk["cross"].children)
    assert estimate == stored + cross + qk["images"]["image"].size
    with pytest.raises(ValueError, match="self_store='qk'"):
        probe.explore(probe.open_recording(path))
    with pytest.raises(ValueError, match="drop self_keys"):
        probe.record(tiny, "a red circle", self_store="qk", self_keys=4, **kw)
    with pytest.raises(ValueError, match="'maps' or 'qk'"):
        probe.record(tiny, "a red circle", self_store="q", **kw)


def test_zarr_stream_and_netcdf_round_trips(tiny, tmp_path):
    kwargs = dict(seeds=[0, 1, 2], steps=2, layers=[16], batch_size=2, progress=False)
    memory = probe.record(tiny, ["a cat", "a red circle"], **kwargs)
    streamed = probe.record(tiny, ["a cat", "a red circle"], out=tmp_path / "r.zarr", **kwargs)
    assert not (tmp_path / "r.zarr.partial").exists()
    for group in ("cross/res16", "self/res16", "images"):
        lazy = streamed[group].ds
        assert lazy[next(iter(lazy.data_vars))].chunks is not None  # dask: read on demand
        xr.testing.assert_equal(lazy.load(), memory[group].ds)
    probe.save(memory, tmp_path / "r.nc")
    back = probe.open_recording(tmp_path / "r.nc")
    for group in ("cross/res16", "self/res16", "images"):
        xr.testing.assert_equal(back[group].ds.load(), memory[group].ds)
    for reopened in (back, probe.open_recording(tmp_path / "r.zarr")):
        for key in ("model", "scheduler", "steps", "guidance_scale", "probe_version"):
            assert reopened.attrs[key] == memory.attrs[key]


def test_estimate_matches_the_recording(tiny):
    kwargs = dict(seeds=[0, 1], steps=2, keep_steps=[1], kinds=("cross", "self"))
    tree = probe.record(tiny, ["a cat", "a cat and a dog"], progress=False, **kwargs)
    stored = sum(node.ds[v].nbytes for node in tree.subtree for v in node.ds.data_vars)
    assert probe.estimate(tiny, ["a cat", "a cat and a dog"], **kwargs) == stored
    assert list(tree["cross/res8"].step.values) == [1]


def test_sdxl_records(tiny_xl):
    tree = probe.record(tiny_xl, "a cat and a dog", seeds=[0], steps=2, keep_padding=True, progress=False)
    ds = tree["cross/res8"].ds
    assert ds.sizes["layer"] == 8 and ds.sizes["token"] == 77
    np.testing.assert_allclose(ds["attn"].astype(float).sum("token").values, 1.0, atol=2e-3)
    assert tree["self/res8"]["attn"].shape == (1, 2, 8, 8, 8, 8, 8)
    plain = tiny_xl("a cat and a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # the record ran at the pipeline's own guidance scale (SDXL: 5.0)
    diff = np.abs(tree["images"]["image"].values[0].astype(int) - (plain[0] * 255).round().astype(int))
    assert diff.max() <= 1


def test_bad_input_is_refused_before_anything_is_written(tiny, tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(ValueError, match="matches no"):
        probe.record(tiny, "a cat", seeds=[0], steps=2, layers=["down_blocks.7.*"], out=out)
    with pytest.raises(ValueError, match="at most 77"):
        probe.record(tiny, "a cat " * 60, seeds=[0], steps=2, out=out)
    with pytest.raises(MemoryError, match="estimated .* MB"):
        probe.record(tiny, "a cat", seeds=[0, 1], steps=50, max_bytes=10_000, out=out)
    with pytest.raises(ValueError, match="keep_steps"):
        probe.record(tiny, "a cat", seeds=[0], steps=2, keep_steps=[5], out=out)
    assert not out.exists() and not (tmp_path / "r.zarr.partial").exists()
    with pytest.raises(ValueError, match=r"tokens are \['<\|startoftext\|>', 'a', 'cat'"):
        token_indices(["<|startoftext|>", "a", "cat", "<|endoftext|>"], "dog")


def test_plan_estimate_and_the_commands_take_the_pipelines_own_steps():
    """SD3's pipeline runs 28 steps by default: a plan, an estimate and the record and sweep commands left without
    steps mean those, as record itself does."""
    from probe.cli import parser
    from probe.record import plan

    kw = {"seeds": [0], "kinds": ("cross",), "max_sequence_length": 16}
    assert plan("tiny-sd3", "a cat", **kw).steps == list(range(28))
    own = probe.estimate("tiny-sd3", "a cat", **kw)
    assert own == probe.estimate("tiny-sd3", "a cat", steps=28, **kw) != probe.estimate("tiny-sd3", "a cat", steps=50,
                                                                                        **kw)
    for command in (["record", "--prompt", "a cat", "--out", "x.zarr"], ["sweep", "--prompt", "a cat", "--out", "x"]):
        args = parser().parse_args(command)
        assert args.steps is None and args.guidance is None
