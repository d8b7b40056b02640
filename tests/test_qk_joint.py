"""A q/k store of joint attention (SD3, FLUX, Qwen-Image: one softmax over image and text keys): every relation's maps
made on read equal the maps recorded directly and the model's own softmax, and the size estimate is what is written."""

import numpy as np
import pytest
import torch
import xarray as xr

import probe
from probe.analysis.lazy import maps_from_qk
from probe.prompts import text_layout

PROMPTS = ["a cat and a dog", "a red circle"]
KINDS = ("cross", "self", "text_image", "text_text")
MAX_SEQ = 16
HALF = 2.0**-11  # float16's relative precision: the recorded maps' rounding


MODELS = {  # FLUX.2's chat template is longer than MAX_SEQ tokens; Z-Image's own default size is 1024 px
    "tiny-sd3": {"max_sequence_length": MAX_SEQ}, "tiny-flux": {"max_sequence_length": MAX_SEQ}, "tiny-flux2": {},
    "tiny-qwen-image": {"max_sequence_length": MAX_SEQ}, "tiny-zimage": {"height": 32, "width": 32},
}


def _record(name, pipe, **kw):
    return probe.record(pipe, PROMPTS, seeds=[0], steps=2, kinds=KINDS, progress=False, batch_size=2, **MODELS[name],
                        **kw)


@pytest.fixture(scope="module", params=list(MODELS))
def both(request):
    """One model's recording of maps and of q and k, same prompts (of different lengths, in one batch) and seeds."""
    pipe = probe.load(request.param)
    return request.param, pipe, _record(request.param, pipe, heads="all"), _record(request.param, pipe, self_store="qk")


def test_every_relation_made_on_read_equals_the_recorded_maps(both):
    """Image and text queries, image and text keys, padded prompts in one batch (Qwen-Image and Z-Image mask the
    shorter prompt's padding keys; SD3's dual-attention attn2 and Z-Image's noise refiner have no text keys at all)."""
    _, pipe, maps, qk = both
    for kind in KINDS:
        for group in maps[kind].children:
            recorded = maps[f"{kind}/{group}"]["attn"]
            made = maps_from_qk(qk[f"self/{group}"], kind, heads="all")
            if kind != "self":  # the joint layers (Z-Image's context refiner, text alone, stays a map)
                joint = maps[f"cross/{group}"]["layer"].values
                assert list(made["layer"].values) == list(joint)
                recorded = recorded.sel(layer=joint)
            assert made.chunks is not None and made.dims == recorded.dims
            xr.testing.assert_identical(made.coords.to_dataset(), recorded.coords.to_dataset())
            np.testing.assert_array_equal(np.isnan(made.values), np.isnan(recorded.values))  # padding slots
            np.testing.assert_allclose(made.values, recorded.values.astype(np.float32), rtol=HALF, atol=1e-7)
            mean = maps_from_qk(qk[f"self/{group}"], kind).values
            np.testing.assert_allclose(mean, made.values.mean(3), rtol=1e-5, atol=1e-8)
            two = maps_from_qk(qk[f"self/{group}"], kind, heads=[1, 0]).values
            np.testing.assert_array_equal(two, made.values[:, :, :, [1, 0]])


def test_the_estimate_is_what_is_written(both, tmp_path):
    name, pipe, _, qk = both
    written = sum(node.ds[v].nbytes for node in qk.subtree for v in node.ds.data_vars)
    estimate = probe.estimate(pipe, PROMPTS, seeds=[0], steps=2, kinds=KINDS, self_store="qk", **MODELS[name])
    assert estimate == written
    probe.save(qk, tmp_path / "qk.zarr")
    back = probe.open_recording(tmp_path / "qk.zarr")
    group = next(iter(back["self"].children))
    for v in ("q", "k", "keys"):  # what was written reads back as it was kept
        np.testing.assert_array_equal(back[f"self/{group}"][v].values, qk[f"self/{group}"][v].values)


def _spied_step(pipe, prompt: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """q and k of every attention call of the transformer's first forward in a plain run, spied at the softmax."""
    spied, inside = [], []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if inside == [1]:
            spied.append((query.detach().clone(), key.detach().clone()))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    net = probe.tap.denoiser(pipe)
    hooks = [net.register_forward_pre_hook(lambda *a: inside.append(1)),
             net.register_forward_hook(lambda *a: inside.append(2))]
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            pipe(prompt, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=MAX_SEQ)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()
    return spied


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_the_store_keeps_what_the_model_scored_and_its_maps_are_the_models_softmax(name):
    """Against a plain run's own q and k and the documented token order (SD3: image first; FLUX: text first), in
    float64: the stored q and k are the very tensors, and the maps made from them its softmax to float32 precision."""
    pipe = probe.load(name)
    spied = _spied_step(pipe, PROMPTS[0])
    store = probe.record(pipe, PROMPTS[0], seeds=[0], steps=1, kinds=("self",), self_store="qk", progress=False,
                         max_sequence_length=MAX_SEQ)
    group = store["self/res8"].ds
    self_maps = maps_from_qk(group, "self", heads="all").values[0, 0]
    cross_maps = maps_from_qk(group, "cross", heads="all").values[0, 0]
    positions = text_layout(pipe, PROMPTS[0], max_sequence_length=MAX_SEQ).positions
    joint = list(group["layer"].values[group["joint"].values])
    n_image = 64
    for i, layer in enumerate(group["layer"].values):
        q, k = (t[-1].double() for t in spied[i])  # the conditional half (SD3's batch is [unconditional; conditional])
        n_text = k.shape[-2] - n_image
        image, text = (slice(0, n_image), slice(n_image, None)) if name == "tiny-sd3" else (slice(n_text, None),
                                                                                           slice(0, n_text))
        order = list(range(k.shape[-2]))
        order = order[image] + order[text]
        stored_q = group["q"].values[0, 0, i][:, : len(order)]
        np.testing.assert_array_equal(stored_q, q[:, order].float().numpy())
        np.testing.assert_array_equal(group["k"].values[0, 0, i][:, : len(order)], k[:, order].float().numpy())
        assert group["keys"].values[0, 0, i].sum() == len(order)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        expected = probs[:, image, image].reshape(self_maps.shape[1:])
        np.testing.assert_allclose(self_maps[i], expected.numpy(), rtol=1e-5, atol=1e-9)
        if layer in joint:
            columns = probs[:, image, text][..., positions].reshape(cross_maps.shape[1:])
            np.testing.assert_allclose(cross_maps[joint.index(layer)], columns.numpy(), rtol=1e-5, atol=1e-9)
    assert len(joint) < len(group["layer"]) if name == "tiny-sd3" else len(joint) == len(group["layer"])


def test_bfloat16_q_and_k_are_kept_bit_for_bit():
    """numpy has no bfloat16: the store keeps its 16 bits, and the maps read from them are the recorded ones to the
    recording's precision (probabilities of a bfloat16 model are bfloat16)."""
    from probe.families.flux import tiny_flux

    pipe = tiny_flux().to(torch.bfloat16)
    kw = {"seeds": [0], "steps": 1, "kinds": ("cross", "self"), "progress": False, "max_sequence_length": MAX_SEQ}
    maps, qk = probe.record(pipe, PROMPTS[0], **kw), probe.record(pipe, PROMPTS[0], self_store="qk", **kw)
    group = qk["self/res8"].ds
    assert group["q"].dtype == np.int16 and group.attrs["qk_dtype"] == "bfloat16"
    assert probe.estimate(pipe, PROMPTS[0], self_store="qk", **{k: v for k, v in kw.items() if k != "progress"}) == sum(
        node.ds[v].nbytes for node in qk.subtree for v in node.ds.data_vars)
    for kind in ("cross", "self"):
        recorded = maps[f"{kind}/res8"]["attn"].values.astype(np.float32)
        np.testing.assert_allclose(maps_from_qk(group, kind).values, recorded, rtol=2.0**-7, atol=1e-6)


def test_families_and_requests_a_q_k_store_cannot_serve_are_refused():
    with pytest.raises(ValueError, match="linear attention"):
        probe.estimate("tiny-sana", PROMPTS[0], seeds=[0], steps=1, self_store="qk")
    with pytest.raises(ValueError, match="needs self-attention layers"):
        probe.estimate("tiny-flux", PROMPTS[0], seeds=[0], steps=1, kinds=("cross",), self_store="qk")
    store = probe.record("tiny-flux", PROMPTS[0], seeds=[0], steps=1, kinds=("self",), self_store="qk",
                         progress=False, max_sequence_length=MAX_SEQ)
    with pytest.raises(ValueError, match="kind must be one of"):
        maps_from_qk(store["self/res8"], "image_text")
    with pytest.raises(ValueError, match="heads must be"):
        maps_from_qk(store["self/res8"], "self", heads=[5])
    with pytest.raises(probe.tap.TapError, match="neither image nor text"):  # 6×6 image tokens, padded to 64
        probe.record("tiny-zimage", PROMPTS[0], seeds=[0], steps=1, kinds=("self",), self_store="qk", height=24,
                     width=24, progress=False)


def test_the_size_table_is_the_estimates_arithmetic():
    from probe.record import qk_layer_bytes, qk_size_table

    table = qk_size_table()
    flux = table.loc["FLUX.1 [dev], 1024² (bfloat16)"]
    assert flux["q/k MB"] == round((2 * 24 * 4608 * 128 * 2 + 4608) / 1e6, 1)
    assert flux["maps, per head MB"] == round(4608**2 * 24 * 2 / 1e6, 1)
    assert qk_layer_bytes(4096, 333, 24, 64, 2) == 2 * 24 * 4429 * 64 * 2 + 4429
