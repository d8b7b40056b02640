"""The recording's schema: one batch's arrays as the datasets of its groups, the root attributes, and the checks that a
tree read back has that shape and says nothing contradictory."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import torch
import xarray as xr

from probe.record.plan import Plan
from probe.tap import Layer
from probe.tap.layers import KINDS

COMPLETE = "all_chunks_written"  # root attribute of a recording whose every chunk was written (fill values too)


def _step_and_layer_coords(plan: Plan, layers: list[Layer], sample: dict, timesteps) -> dict:
    """The coordinates every group shares: the samples, the kept steps with their timesteps, the layers."""
    return {**sample, "step": plan.steps, "timestep": ("step", [float(timesteps[s]) for s in plan.steps]),
            "layer": np.array([layer.name for layer in layers], dtype=object),
            "block": ("layer", np.array([layer.block for layer in layers], dtype=object))}


def batch_datasets(plan: Plan, batch: slice, arrays: dict[str, np.ndarray], images: np.ndarray, timesteps) -> dict:
    """One batch as a dict group → xr.Dataset, with the coordinates of DESIGN's schema."""
    index = np.arange(batch.start, batch.stop)
    prompts = np.array([p for p, _ in plan.samples[batch]], dtype=object)
    seeds = np.array([s for _, s in plan.samples[batch]])
    sample = {"sample": index, "prompt": ("sample", prompts), "seed": ("sample", seeds)}
    out = {}
    for group, layers in plan.groups.items():
        h, w = layers[0].grid
        if plan.is_qk(group):
            out[group] = _qk_dataset(plan, group, batch, arrays, sample, timesteps)
            continue
        heads = plan.head_count(layers[0])
        kind = layers[0].kind
        dims = plan.dims(group)
        points = "point" in dims
        coords = {**_step_and_layer_coords(plan, layers, sample, timesteps),
                  **({"y": np.arange(h), "x": np.arange(w)} if "y" in dims else {})}
        if points:
            cells = plan.query_cells(layers[0])
            coords.update(point=np.arange(len(cells)), query_y=("point", [c[0] for c in cells]),
                          query_x=("point", [c[1] for c in cells]))
        if heads:
            coords["head"] = np.arange(layers[0].heads) if plan.heads == "all" else plan.heads
        if kind != "self":
            coords.update(_token_coords(plan, batch))
            if kind == "text_text":
                coords["key_token"] = np.arange(plan.n_tokens)
            attrs = {}
        else:
            kh, kw = plan.key_grid(layers[0])
            coords["ky"], coords["kx"] = np.arange(kh), np.arange(kw)
            attrs = {"keys_pooled": int((kh, kw) != (h, w)), "query_points": int(points)}
        out[group] = xr.Dataset({"attn": (dims, arrays[group])}, coords=coords, attrs=attrs)
    out["images"] = xr.Dataset({"image": (("sample", "iy", "ix", "channel"), images)}, coords=sample)
    return out


def _token_coords(plan: Plan, batch: slice) -> dict:
    """The recorded tokens of each sample: ``token``, ``token_text`` and, where the text has several encoders,
    ``encoder`` (padding slots of a shorter prompt are empty)."""
    texts = [t + [""] * (plan.n_tokens - len(t)) for t in plan.tokens[batch]]
    coords = {"token": np.arange(plan.n_tokens), "token_text": (("sample", "token"), np.array(texts, dtype=object))}
    if len({e for es in plan.encoders for e in es}) > 1:
        encoders = [e + [""] * (plan.n_tokens - len(e)) for e in plan.encoders[batch]]
        coords["encoder"] = (("sample", "token"), np.array(encoders, dtype=object))
    return coords


def _qk_dataset(plan: Plan, group: str, batch: slice, arrays: dict[str, np.ndarray], sample: dict, timesteps
                ) -> xr.Dataset:
    """A self group stored as the q and k its scores are made of (:func:`probe.analysis.lazy.maps_from_qk` makes the
    maps). A UNet's on the image grid; a joint softmax's for every token (image tokens row by row, then the text
    keys in the model's order), with ``keys`` (which keys each softmax used), ``token_position`` (each recorded
    token's place among the text keys, −1 for padding slots) and ``joint`` (layer: its softmax holds text keys)."""
    layers = plan.groups[group]
    h, w = layers[0].grid
    heads, dim = plan.qk[group]
    coords = {**_step_and_layer_coords(plan, layers, sample, timesteps),
              "scale": ("layer", [plan.qk_scale[layer.name] for layer in layers]),
              "head": np.arange(heads), "y": np.arange(h), "x": np.arange(w), "dim": np.arange(dim)}
    attrs = {"self_store": "qk", "heads": plan.heads if isinstance(plan.heads, str) else ",".join(map(str, plan.heads)),
             "qk_dtype": "bfloat16" if plan.qk_dtype == "int16" else plan.qk_dtype}
    lead = ("sample", "step", "layer", "head")
    q, k = arrays[f"{group}/q"], arrays[f"{group}/k"]
    if not plan.qk_joint:
        coords.update(ky=np.arange(h), kx=np.arange(w))
        return xr.Dataset({"q": ((*lead, "y", "x", "dim"), q), "k": ((*lead, "ky", "kx", "dim"), k)}, coords=coords,
                          attrs=attrs)
    positions = [p + [-1] * (plan.n_tokens - len(p)) for p in plan.positions[batch]]
    keys = arrays[f"{group}/keys"]
    coords.update(_token_coords(plan, batch), query=np.arange(q.shape[-2]), key=np.arange(k.shape[-2]),
                  token_position=(("sample", "token"), np.array(positions, dtype=np.int64)),
                  joint=("layer", [layer.name in plan.qk_text_layers for layer in layers]))
    attrs.update(image_tokens=h * w, text_tokens=plan.qk_text)
    return xr.Dataset({"q": ((*lead, "query", "dim"), q), "k": ((*lead, "key", "dim"), k),
                       "keys": (("sample", "step", "layer", "key"), keys)}, coords=coords, attrs=attrs)


def recording_attrs(pipe, steps: int, guidance_scale: float, plan: Plan, kwargs: dict) -> dict:
    import diffusers
    import transformers

    import probe

    return {
        "model": str(pipe.config.get("_name_or_path") or type(pipe).__name__),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "heads": plan.heads if isinstance(plan.heads, str) else list(plan.heads),
        "height": plan.image_hw[0],
        "width": plan.image_hw[1],
        "negative_prompt": str(kwargs.get("negative_prompt") or ""),
        "probe_version": probe.__version__,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        COMPLETE: 1,
    }


def recording_schema_problems(tree: xr.DataTree) -> list[str]:
    """What keeps ``tree`` from being a probe recording or sweep store; empty when it is one.

    Why: a foreign file that happens to have a ``cross`` group would otherwise open and fail later, deep in an
    analysis, with an error about a missing variable. A recording has the root attribute ``probe_version`` (the
    writer's), attention groups ``cross/…``, ``self/…`` (``text_image``, ``text_text``) whose groups each hold
    ``attn`` (sample, step, …) or, for ``self_store="qk"``, ``q`` and ``k``, and ``token_text`` beside every
    text-key map.
    """
    problems = []
    if "probe_version" not in tree.attrs:
        problems.append("its root has no probe_version attribute (every recording and sweep store has one)")
    kinds = [name for name in tree.children if name in KINDS]
    if not kinds:
        problems.append(f"it has no attention groups ({', '.join(KINDS)}); its groups are "
                        f"{sorted(tree.children)}")
    for kind in kinds:
        groups = tree[kind].children
        if not groups:
            problems.append(f"/{kind} holds no groups (a recording has /{kind}/res<N>)")
        for name, node in groups.items():
            ds = node.ds
            variables = sorted(ds.data_vars)
            if "attn" in ds.data_vars:
                attn = ds["attn"]
                needed = ("sample", "step", "y", "x") if kind in ("cross", "self") else ("sample", "step")
                if kind == "self" and "point" in attn.dims:  # self_queries: chosen query points instead of y, x
                    needed = ("sample", "step", "point", "ky", "kx")
                missing = [d for d in needed if d not in attn.dims]
                if missing:
                    problems.append(f"/{kind}/{name}/attn has dims {attn.dims}, not a recording's (no "
                                    f"{', '.join(missing)})")
                if kind in ("cross", "text_text") and "token" in attn.dims and "token_text" not in ds.coords:
                    problems.append(f"/{kind}/{name} has no token_text coordinate, so its tokens cannot be named")
            elif not {"q", "k"} <= set(ds.data_vars):
                problems.append(f"/{kind}/{name} holds neither attn nor q and k (its variables: {variables})")
    return problems


def contradictions(tree: xr.DataTree) -> list[str]:
    """Where a recording's root attributes disagree with its data (steps, size, heads, samples)."""
    attrs, found = tree.attrs, []
    samples = {node.path: node.ds.sizes["sample"] for node in tree.subtree if "sample" in node.ds.dims}
    if len(set(samples.values())) > 1:
        found.append(f"its groups hold different numbers of samples ({samples})")
    for node in tree.subtree:
        ds = node.ds
        if "step" in ds.coords and "steps" in attrs and len(ds.step) and int(ds.step.max()) >= int(attrs["steps"]):
            found.append(f"{node.path} holds step {int(ds.step.max())} but the recording says it ran "
                         f"{attrs['steps']} steps")
        if "attn" in ds.data_vars and attrs.get("heads") == "mean" and "head" in ds.dims:
            found.append(f"{node.path} has a head dimension but the recording says heads were averaged")
        if "image" in ds.data_vars and "height" in attrs and (ds.sizes.get("iy"), ds.sizes.get("ix")) != (
                int(attrs["height"]), int(attrs["width"])):
            found.append(f"its images are {ds.sizes.get('iy')}×{ds.sizes.get('ix')} px but the recording says "
                         f"{attrs['height']}×{attrs['width']}")
    return found


