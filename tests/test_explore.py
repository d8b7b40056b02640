"""The explorer shows what the recording holds: its maps and statistics against selections made here."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr.storage
from PIL import Image

import probe
from probe.analysis.maps import aggregate_self_attention, normalize, resize
from probe.analysis.overlap import (
    center_of_mass,
    com_distance,
    compactness,
    intensity,
    kl_divergence,
    self_cross_overlap,
    soft_iou,
    spread,
)
from probe.prompts import token_indices
from probe.ui.explore import ALL, Controls, Explorer, ViewModel

pytest.importorskip("ipywidgets")

PROMPTS = ["a red circle and a blue square", "a cat and a dog"]
KWARGS = dict(seeds=[0], steps=3, progress=False)
FINEST = (16, 16)


@pytest.fixture(scope="module")
def heads_tree(tiny):
    """Every head of every layer: the head control is shown."""
    return probe.record(tiny, PROMPTS, heads="all", **KWARGS)


@pytest.fixture(scope="module")
def stored(tiny, tmp_path_factory):
    """The same recording in memory and streamed to zarr, opened lazily."""
    path = tmp_path_factory.mktemp("explore") / "rec.zarr"
    memory = probe.record(tiny, PROMPTS, **KWARGS)
    probe.record(tiny, PROMPTS, out=path, **KWARGS)
    return memory, path


def _layer_maps(tree, kind, sample, step, head):
    """(group name, float32 attn (layer, y, x, …)) of every group of a kind at one sample and step, one head or
    their mean."""
    out = []
    for name in tree[kind].children:
        attn = tree[f"{kind}/{name}"]["attn"].isel(sample=sample).sel(step=step).astype("float32")
        attn = attn.sel(head=head) if head is not None else attn.mean("head") if "head" in attn.dims else attn
        out.append((name, attn))
    return out


def _cross(tree, sample, step, layer, head, token):
    """The token's map as the explorer should show it, selected and averaged here."""
    parts = []
    for name, attn in _layer_maps(tree, "cross", sample, step, head):
        group, _, single = layer.partition("/")
        if layer != ALL and group != name:
            continue
        if single:
            attn = attn.sel(layer=[single])
        for one in attn.isel(token=token).transpose("layer", "y", "x").values:
            parts.append(resize(torch.from_numpy(one), FINEST).numpy() if layer == ALL else one)
    return np.mean(parts, axis=0)


def _subject_maps(tree, sample, step, group, head=None):
    """Subject maps (2, H, W) of one group's layer mean and the group's full self-attention (H, W, ky, kx)."""
    cross = tree[f"cross/{group}"]["attn"].isel(sample=sample).sel(step=step)
    own = tree[f"self/{group}"]["attn"].isel(sample=sample).sel(step=step)
    if head is not None:
        cross, own = cross.sel(head=head), own.sel(head=head)
    cross = torch.from_numpy(cross.astype("float32").mean("layer").values)
    own = torch.from_numpy(own.astype("float32").mean("layer").values)
    tokens = [str(t) for t in tree[f"cross/{group}"]["token_text"].values[sample]]
    words = ["circle", "square"] if sample == 0 else ["cat", "dog"]
    maps = torch.stack([cross[..., token_indices(tokens, w)].mean(-1) for w in words])
    return maps, own


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer", [ALL, "res8", "res16/up_blocks.1.attentions.1.transformer_blocks.0.attn2"])
@pytest.mark.parametrize("head", [None, 2])
def test_cross_map_equals_the_recorded_selection(heads_tree, layer, head):
    ex = Explorer(heads_tree)
    ex.sample.value = 1
    ex.step.value = 1
    ex.layer.value = layer
    ex.head.value = "mean" if head is None else head
    tokens = list(heads_tree["cross/res16"]["token_text"].values[1])
    ex.token.value = tokens.index("dog")
    assert ex.view.token_text == "dog" and ex.view.controls == Controls(1, 1, layer, head, tokens.index("dog"),
                                                                        ex.view.controls.query)
    _close(ex.view.cross, _cross(heads_tree, 1, 1, layer, head, tokens.index("dog")))
    assert ex.cross_image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_click_shows_that_pixels_self_attention(heads_tree):
    pytest.importorskip("ipyevents")
    ex = Explorer(heads_tree)
    ex.layer.value = "res8"
    ex.head.value = 1
    width, height = Image.open(io.BytesIO(ex.cross_image.value)).size
    # a click a quarter across and three quarters down the image: query pixel (12, 4) of 16×16, (6, 2) of 8×8
    ex.click_events[0]._handle_mouse_msg(None, {"type": "click", "dataX": width * 0.25 + 1,
                                                "dataY": height * 0.75 + 1}, [])
    assert (ex.query_y.value, ex.query_x.value) == (12, 4) and ex.view.self_query == (6, 2)
    want = heads_tree["self/res8"]["attn"].isel(sample=0).sel(step=2, head=1, y=6, x=2).astype("float32").mean("layer")
    _close(ex.view.self_map, want.values)

    ex.layer.value = "res16/up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # the attn1 of the same block
    ex.query_y.value, ex.query_x.value = 3, 9  # the sliders do what a click does
    want = heads_tree["self/res16"]["attn"].isel(sample=0).sel(
        step=2, head=1, y=3, x=9, layer="up_blocks.1.attentions.1.transformer_blocks.0.attn1")
    _close(ex.view.self_map, want.astype("float32").values)

    ex.layer.value, ex.head.value = ALL, "mean"
    layers = []
    for _, attn in _layer_maps(heads_tree, "self", 0, 2, None):
        g = attn.sizes["y"]
        layers += list(resize(torch.from_numpy(attn.isel(y=3 * g // 16, x=9 * g // 16).values), FINEST).numpy())
    _close(ex.view.self_map, np.mean(layers, axis=0))


def test_statistics_are_probe_overlaps_of_the_shown_maps(heads_tree):
    ex = Explorer(heads_tree)
    ex.set(step=1, layer="res16", head=3)
    maps, own = _subject_maps(heads_tree, 0, 1, "res16", head=3)
    _close(ex.view.subject_maps, maps.numpy())
    a, b = maps
    row = ex.view.pairs.iloc[0]
    assert (row.a, row.b) == ("circle", "square")
    _close(row.soft_iou, soft_iou(a, b))
    fa, fb = normalize(a, "minmax"), normalize(b, "minmax")  # centres and KL without the floor
    _close(row.com_distance, com_distance(fa, fb))
    _close(row.kl_sym, kl_divergence(fa, fb, "sym"))
    _close(row.compactness, compactness(a, b))
    _close(row.self_cross, self_cross_overlap(maps, aggregate_self_attention(maps, own[None])))
    subjects = ex.view.subject_stats.set_index("subject")
    _close(subjects.intensity.values, intensity(maps))
    _close(subjects.spread.values, spread(maps))
    _close(subjects[["com_y", "com_x"]].values, center_of_mass(maps))
    shown = ex.stats.value

    ex.step.value = 2
    assert ex.stats.value != shown and "step 2" in ex.stats.value
    ex.layer.value = ALL  # several grids: maps resized to 16×16, no single self-attention to aggregate
    assert np.isnan(ex.view.pairs.self_cross.iloc[0])
    _close(ex.view.pairs.soft_iou.iloc[0], soft_iou(*torch.from_numpy(ex.view.subject_maps)))


def test_changing_sample_offers_its_tokens(heads_tree):
    ex = probe.explore(heads_tree, token="square", step=-1)
    assert ex.view.token_text == "square" and ex.view.controls.step == 2
    ex.sample.value = 1
    assert [label.split(": ", 1)[1] for label, _ in ex.token.options] == [
        "<|startoftext|>", "a", "cat", "and", "a", "dog", "<|endoftext|>"]
    assert ex.view.token_text == "cat" and ex.view.subjects == ["cat", "dog"] and ex.view.seed == 0
    ex.set(sample=0, step=0)  # "cat" is not in this prompt: its first subject instead
    assert (ex.view.token_text, ex.view.controls.step, ex.view.prompt) == ("circle", 0, PROMPTS[0])


def test_lazy_zarr_shows_the_same_and_a_slider_move_reads_one_slice(stored, monkeypatch):
    memory, path = stored
    lazy = probe.open_recording(path)
    eager, reader = ViewModel(memory), ViewModel(lazy)
    for c in (reader.default_controls(), Controls(1, 0, "res8", None, 5, (2, 13)), Controls(0, 1, "res16", None, 3)):
        a, b = eager.view(c), reader.view(c)
        for name in ("cross", "self_map", "subject_maps", "image"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        pd.testing.assert_frame_equal(a.pairs, b.pairs)

    read = []
    original = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        read.append(key)
        return await original(self, key, *args, **kwargs)

    ex = probe.explore(path, sample=1)
    store = zarr.open_group(path, mode="r")
    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)

    def slice_chunks(sample, step):
        """Keys of the attn chunks that hold (sample, step) of every group: one slice, whatever the chunking."""
        keys = set()
        for kind in ("cross", "self"):
            for group in lazy[kind].children:
                arr = store[f"{kind}/{group}/attn"]
                first = (sample // arr.chunks[0], step // arr.chunks[1])
                rest = [range(-(-n // c)) for n, c in zip(arr.shape[2:], arr.chunks[2:])]
                for index in np.ndindex(*[len(r) for r in rest]):
                    keys.add(f"{kind}/{group}/attn/c/" + "/".join(map(str, first + index)))
        return keys

    ex.step.value = 0
    assert sorted(read) == sorted(slice_chunks(1, 0))  # each chunk of the shown slice once, nothing else
    read.clear()
    ex.token.value = 2  # the slice is already read
    assert read == []
    assert lazy["cross/res16"]["attn"].chunks is not None  # still lazy
    np.testing.assert_array_equal(ex.view.cross, eager.view(ex.controls()).cross)


def test_export_button_saves_the_view(heads_tree, tmp_path):
    ex = Explorer(heads_tree)
    ex.export_path.value = str(tmp_path / "view.png")
    ex.export_button.click()
    image = Image.open(tmp_path / "view.png")
    assert image.format == "PNG" and image.size[0] > 800 and "saved" in ex.export_status.value


def test_a_recording_without_images_or_self_attention(stored, tmp_path):
    memory, _ = stored
    cross_only = xr.DataTree.from_dict({"/": xr.Dataset(attrs=memory.attrs),
                                        **{f"cross/{g}": memory[f"cross/{g}"].ds for g in memory["cross"].children}})
    ex = Explorer(cross_only)
    assert ex.view.image is None and ex.view.self_map is None and ex.head.layout.display == "none"
    _close(ex.view.cross, _cross(memory, 0, 2, ALL, None, ex.view.controls.token))
    assert np.isnan(ex.view.pairs.self_cross.iloc[0]) and "no self-attention" in ex.view.self_source
    assert ex.export(tmp_path / "alone.png").stat().st_size > 0
