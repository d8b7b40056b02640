"""Out-of-core analysis: :mod:`probe.analysis.maps` and :mod:`probe.analysis.overlap` applied to a recording one sample
at a time.

Why: a sweep's store can be far larger than memory. Opened lazily (dask; recordings and sweeps store one sample per
chunk), each sample's subject maps and their statistics are computed by the same torch functions guidance uses,
chunk by chunk through ``xr.apply_ufunc(..., dask="parallelized")``, so memory stays flat in the store's size: what
is held at once is a chunk per dask worker, the scheduler's state for one batch of samples and the small per-sample
results (``tests/test_lazy.py`` analyses a store 4× its memory limit in the same peak as one 4× smaller).

>>> stats = lazy.overlap("runs/sweep/maps.zarr")           # lazy xr.Dataset (sample, step, pair | subject)
>>> table = lazy.overlap_table("runs/sweep/maps.zarr", step=-1, workers=2)   # computed, one row per sample × pair

Statistics are :mod:`probe.analysis.overlap`'s, pairs by :func:`probe.analysis.overlap.pair_overlap` as the overlap
study reads them
(centre distance and KL on min-max maps), on the subjects'
layer-and-head mean cross-attention maps (``maps``), their Attend-and-Excite view (token softmax over the prompt's
word tokens, Gaussian smoothing; :mod:`probe.analysis.subjects` makes both) and, where the store has the same grid's
self-attention, the Otsu-aggregated self-attention maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import torch
import xarray as xr

from probe.analysis.maps import aggregate_self_attention
from probe.analysis.overlap import (
    PAIR_STATISTICS,
    ae_response,
    aggregation_loss,
    intensity,
    pair_indices,
    pair_overlap,
    self_cross_overlap,
    spread,
)
from probe.analysis.subjects import REDUCED, VIEWS, softmax_tokens, word_tokens
from probe.analysis.subjects import subject_maps as _maps_of
from probe.prompts import subjects_of
from probe.record import full_self, recording_schema_problems, stored_chunks, zarr_encoding  # noqa: F401
from probe.writes import replacing

PAIR_STATS = PAIR_STATISTICS  # the pair statistics' names, in the order they are packed
SUBJECT_STATS = ("intensity", "spread", "aggregation", "ae")
BATCH = 64  # samples per dask computation when computing here

Subjects = None | Sequence[str] | Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]]


def open_store(path: str | Path) -> xr.DataTree:
    """A recording or a sweep (its folder or its ``maps.zarr``), opened lazily, one sample per dask chunk."""
    path = Path(path)
    if (path / "maps.zarr").is_dir():
        path = path / "maps.zarr"
    if not path.exists():
        raise FileNotFoundError(f"no recording at {path}")
    if path.suffix == ".nc":
        return xr.open_datatree(path, engine="h5netcdf", chunks={"sample": 1})
    return xr.open_datatree(path, engine="zarr", chunks={}, consolidated=False)  # stored one sample per chunk


def _dataset(group) -> xr.Dataset:
    return group.to_dataset() if hasattr(group, "to_dataset") else group


def _words(subjects: Subjects, prompt: str) -> list[str]:
    if subjects is None:
        return subjects_of(prompt)
    if isinstance(subjects, str):  # one word, not its letters
        return [subjects]
    if callable(subjects):
        return list(subjects(prompt))
    if isinstance(subjects, Mapping):
        return list(subjects[prompt])
    return list(subjects)


def subject_tokens(cross, subjects: Subjects = None) -> xr.Dataset:
    """Each sample's subject word pieces: ``pieces`` (sample, subject, piece) token indices (−1 pads), ``words``
    (sample, token) the prompt's word tokens (:func:`probe.prompts.recorded_words`, what the A&E view's softmax runs
    over), ``subject_word`` (sample, subject).

    ``subjects``: None (each prompt's nouns, :func:`probe.prompts.subjects_of`), one list for every sample, a
    mapping prompt → words or a callable of the prompt. Words become tokens by
    :func:`probe.prompts.recorded_subject_tokens` (every copy of a word, SD3's CLIP and T5 alike; a word listed twice
    takes its successive occurrences, ``cat#2`` names one). Reads only the coordinates (small), never the maps.
    """
    ds = _dataset(cross)
    prompts = [str(p) for p in ds["prompt"].values]
    texts = np.array([[str(t) for t in row] for row in ds["token_text"].values], dtype=object)
    encoders = ([[str(e) for e in row] for row in ds["encoder"].values] if "encoder" in ds.coords
                else [None] * len(prompts))
    found: list[list[list[int]]] = []
    words_per_sample = []
    for i, (prompt, row) in enumerate(zip(prompts, texts)):
        words = _words(subjects, prompt)
        if not words:
            raise ValueError(f"no subjects for sample {i} ({prompt!r}): the statistics are of subjects' maps; give "
                             "at least one subject word (subjects=None takes each prompt's nouns)")
        found.append(word_tokens(row, words, encoders[i], prompt))
        words_per_sample.append(words)
    n_subjects = max((len(w) for w in words_per_sample), default=0)
    n_pieces = max((len(p) for ps in found for p in ps), default=1)
    index = np.full((len(prompts), n_subjects, n_pieces), -1, dtype=np.int64)
    labels = np.full((len(prompts), n_subjects), "", dtype=object)
    for i, pieces in enumerate(found):
        for j, run in enumerate(pieces):
            index[i, j, : len(run)] = run
            labels[i, j] = words_per_sample[i][j]
    words = np.zeros(texts.shape, dtype=bool)
    for i, row in enumerate(texts):
        words[i, softmax_tokens(row)] = True
    sample = ds["sample"].values
    return xr.Dataset(
        {"pieces": (("sample", "subject", "piece"), index), "words": (("sample", "token"), words)},
        coords={"sample": sample, "subject": np.arange(n_subjects), "subject_word": (("sample", "subject"), labels),
                "token": ds["token"].values},
    )


def _reduced(attn: xr.DataArray) -> list[str]:
    return [d for d in REDUCED if d in attn.dims]


def _mean_of(block: np.ndarray, n_reduced: int, first: int) -> torch.Tensor:
    """float32 torch tensor of a numpy chunk, averaged over ``n_reduced`` axes starting at ``first``."""
    x = torch.from_numpy(np.asarray(block, dtype=np.float32))
    return x.mean(tuple(range(first, first + n_reduced))) if n_reduced else x


def _maps_block(attn: np.ndarray, pieces: np.ndarray, words: np.ndarray, *, n_reduced: int, view: str
                ) -> np.ndarray:
    """(s, step, [layer, head], y, x, token) → (s, step, subject, y, x): one chunk's subject maps
    (:func:`probe.analysis.subjects.subject_maps`; NaN for a sample's missing subjects)."""
    cross = _mean_of(attn, n_reduced, 2)  # (s, step, y, x, T)
    n, steps, h, w, _ = cross.shape
    out = torch.full((n, steps, pieces.shape[1], h, w), float("nan"))
    for b in range(n):
        runs = [[int(i) for i in run if i >= 0] for run in pieces[b]]
        present = [j for j, run in enumerate(runs) if run]
        if present:
            out[b][:, present] = _maps_of(cross[b], [runs[j] for j in present], np.flatnonzero(words[b]).tolist(),
                                          view=view)
    return out.numpy()


def subject_maps(cross, subjects: Subjects = None, *, view: str = "maps", tokens: xr.Dataset | None = None
                 ) -> xr.DataArray:
    """Lazy subject maps (sample, step, subject, y, x), float32, from a cross-attention group.

    Layers and heads are averaged. ``view``: ``"maps"`` (each subject's mean over its word pieces,
    :func:`probe.analysis.maps.token_map`) or ``"ae"`` (Attend-and-Excite's: :func:`probe.analysis.maps.token_softmax`
    over the
    prompt's words, then :func:`probe.analysis.maps.gaussian_smooth`). Missing subjects (a prompt with fewer) are NaN.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    ds = _dataset(cross)
    attn = ds["attn"]
    tokens = subject_tokens(ds, subjects) if tokens is None else tokens
    reduced = _reduced(attn)
    core = ["step", *reduced, "y", "x", "token"]
    out = xr.apply_ufunc(
        _maps_block, _per_sample(attn), tokens["pieces"], tokens["words"],
        input_core_dims=[core, ["subject", "piece"], ["token"]], output_core_dims=[["step", "subject", "y", "x"]],
        kwargs={"n_reduced": len(reduced), "view": view}, dask="parallelized", output_dtypes=[np.float32],
    )
    return out.assign_coords(subject_word=tokens["subject_word"]).rename(f"subject_{view}")


def _pair_stats(m: torch.Tensor, aggregated: torch.Tensor | None) -> torch.Tensor:
    """(…, subject, y, x) maps (and their aggregated self-attention) → (…, pair, pair stat)."""
    first, second = (list(side) for side in zip(*pair_indices(m.shape[-3]))) if m.shape[-3] > 1 else ([], [])
    a, b = m[..., first, :, :], m[..., second, :, :]
    overlap = pair_overlap(a, b)
    values = [overlap[name] for name in PAIR_STATS[:-1]]
    if aggregated is not None:
        pair = torch.stack([a, b], -3)  # (…, pair, 2, y, x): self_cross of each pair on its own
        pair_self = torch.stack([aggregated[..., first, :, :], aggregated[..., second, :, :]], -3)
        values.append(self_cross_overlap(pair, pair_self))
    else:
        values.append(torch.full_like(values[0], float("nan")))
    return torch.stack(values, -1)


def _subject_stats(m: torch.Tensor, ae: torch.Tensor) -> torch.Tensor:
    """(…, subject, y, x) maps and their A&E view → (…, subject, subject stat)."""
    return torch.stack([intensity(m), spread(m), aggregation_loss(m), ae_response(ae)], -1)


def _stats_block(attn: np.ndarray, pieces: np.ndarray, words: np.ndarray, *self_block: np.ndarray, n_reduced: int,
                 n_self_reduced: int) -> np.ndarray:
    """Everything of one chunk in one task, so no per-sample intermediate outlives it: cross (and self) attention
    → (s, step, slot), the pair statistics then the subject statistics, flattened."""
    maps = torch.from_numpy(_maps_block(attn, pieces, words, n_reduced=n_reduced, view="maps"))
    ae = torch.from_numpy(_maps_block(attn, pieces, words, n_reduced=n_reduced, view="ae"))
    aggregated = None
    if self_block:
        keys = _mean_of(self_block[0], n_self_reduced, 2)  # (s, step, y, x, ky, kx)
        h, w = keys.shape[2:4]
        aggregated = aggregate_self_attention(maps, keys.reshape(*keys.shape[:2], 1, h, w, h * w))
    pairs, own = _pair_stats(maps, aggregated), _subject_stats(maps, ae)
    out = torch.cat([pairs.flatten(-2), own.flatten(-2)], -1).numpy()
    del maps, ae, aggregated, pairs, own
    _release_freed_memory()
    return out


def _release_freed_memory() -> None:
    """Hand the chunk's freed temporaries back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Why: once glibc's dynamic mmap threshold has risen to a chunk's size, its multi-MB temporaries come from the
    heap, and the small results allocated above them keep that heap from shrinking, so resident memory would creep
    with the number of chunks analysed instead of staying at a chunk per worker.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def _select_steps(ds: xr.Dataset, step) -> xr.Dataset:
    if step is None:
        return ds
    steps = [step] if np.isscalar(step) else list(step)
    return ds.isel(step=steps)


def _per_sample(a: xr.DataArray) -> xr.DataArray:
    """One dask chunk per sample, whatever the store's chunks along the other dims (a recording stores one per step)."""
    return a.chunk({d: 1 if d == "sample" else -1 for d in a.dims})


def _packed(attn: xr.DataArray, tokens: xr.Dataset, self_attn: xr.DataArray | None) -> xr.DataArray:
    """The statistics of these samples, lazily, one task per chunk: (sample, step, slot)."""
    attn = _per_sample(attn)
    self_attn = None if self_attn is None else _per_sample(self_attn)
    inputs = [attn, tokens["pieces"], tokens["words"]]
    cores = [["step", *_reduced(attn), "y", "x", "token"], ["subject", "piece"], ["token"]]
    n_self_reduced = 0
    if self_attn is not None:
        own_dims = {d: f"self_{d}" for d in _reduced(self_attn)}  # the self layers are other modules
        self_attn = self_attn.drop_vars([c for c in self_attn.coords if set(self_attn[c].dims) & set(own_dims)])
        n_self_reduced = len(own_dims)
        inputs.append(self_attn.rename(own_dims))
        cores.append(["step", *own_dims.values(), "y", "x", "ky", "kx"])
    n_subjects = tokens.sizes["subject"]
    n_slots = len(pair_indices(n_subjects)) * len(PAIR_STATS) + n_subjects * len(SUBJECT_STATS)
    return xr.apply_ufunc(
        _stats_block, *inputs, input_core_dims=cores, output_core_dims=[["step", "slot"]],
        kwargs={"n_reduced": len(_reduced(attn)), "n_self_reduced": n_self_reduced}, dask="parallelized",
        output_dtypes=[np.float32], dask_gufunc_kwargs={"output_sizes": {"slot": n_slots}},
    )


def overlap(source, subjects: Subjects = None, *, group: str | None = None, self_group: str | None = "auto",
            step=None, compute: bool = False, workers: int | None = None, batch: int = BATCH) -> xr.Dataset:
    """Overlap statistics of every sample: pair statistics (sample, step, pair) and per-subject ones
    (sample, step, subject), as :data:`PAIR_STATS` and :data:`SUBJECT_STATS` variables; lazy unless ``compute``.

    ``source``: a path (recording or sweep) or an opened tree. ``group``: the cross-attention group (default the
    finest); ``self_group``: ``"auto"`` the self-attention group of the same grid when recorded (for
    ``self_cross``), a group name, or None. ``step``: step indices to keep (default all). Nothing is read until
    the result is computed; then one sample's chunks at a time per dask worker, each chunk in one task.
    ``compute``: compute here, ``batch`` samples per dask computation on ``workers`` threads, so that the
    scheduler's own bookkeeping (a few kB per task) stays bounded too and only the results grow with the store.
    """
    tree = open_store(source) if isinstance(source, (str, Path)) else source
    crosses = sorted((n for n in tree["cross"].children), key=lambda n: -int(n.removeprefix("res")))
    group = group or f"cross/{crosses[0]}"
    ds = _select_steps(_dataset(tree[group]), step)
    if self_group == "auto":
        candidate = group.replace("cross/", "self/", 1)
        self_group = candidate if "self" in tree.children and candidate.split("/")[1] in tree["self"].children else None
    self_attn = (_select_steps(full_self(_dataset(tree[self_group]), "the overlap analysis"), step)["attn"]
                 if self_group is not None else None)
    tokens = subject_tokens(ds, subjects)
    if not compute:
        packed = _packed(ds["attn"], tokens, self_attn)
    else:
        parts = []
        with dask.config.set(scheduler="threads", num_workers=workers):
            for start in range(0, ds.sizes["sample"], batch):
                part = {"sample": slice(start, start + batch)}
                parts.append(_packed(ds["attn"].isel(part), tokens.isel(part),
                                     None if self_attn is None else self_attn.isel(part)).compute())
        packed = xr.concat(parts, "sample")
    n_subjects = tokens.sizes["subject"]
    n_pairs = len(pair_indices(n_subjects))

    def unpacked(offset: int, count: int, width: int, k: int, dim: str) -> xr.DataArray:
        return packed.isel(slot=[offset + i * width + k for i in range(count)]).rename(slot=dim)

    out = xr.Dataset({name: unpacked(0, n_pairs, len(PAIR_STATS), k, "pair") for k, name in enumerate(PAIR_STATS)})
    offset = n_pairs * len(PAIR_STATS)
    out = out.assign({name: unpacked(offset, n_subjects, len(SUBJECT_STATS), k, "subject")
                      for k, name in enumerate(SUBJECT_STATS)})
    first = [i for i, _ in pair_indices(n_subjects)]
    second = [j for _, j in pair_indices(n_subjects)]
    if self_group is None:
        out = out.drop_vars("self_cross")
    keep = [c for c in ("prompt", "seed", "source", "method", "timestep") if c in ds.coords]
    out = out.assign_coords({c: ds[c].compute() if compute else ds[c] for c in keep})
    out = out.assign_coords(subject_word=tokens["subject_word"], pair_first=("pair", first),
                            pair_second=("pair", second))
    out.attrs.update({"group": group, "self_group": self_group or ""})
    return out


def overlap_table(source, subjects: Subjects = None, *, group: str | None = None, self_group: str | None = "auto",
                  step=None, workers: int | None = None) -> pd.DataFrame:
    """:func:`overlap` computed (dask's threads, ``workers`` of them) into one row per sample, step and pair."""
    if isinstance(subjects, str) or (isinstance(subjects, Sequence) and len(subjects) < 2):
        raise ValueError(f"overlap_table gives one row per pair of subjects, so it needs at least two subject words, "
                         f"got subjects={subjects!r}; give two or more (or subjects=None for each prompt's nouns), "
                         "or use overlap() for one subject's own statistics")
    stats = overlap(source, subjects, group=group, self_group=self_group, step=step, compute=True, workers=workers)
    if stats.sizes["pair"] == 0:
        raise ValueError("overlap_table gives one row per pair of subjects, and no prompt here has two: give two or "
                         "more subject words per prompt, or use overlap() for one subject's own statistics")
    pair_vars = [v for v in stats.data_vars if "pair" in stats[v].dims]
    frame = stats[pair_vars].to_dataframe().reset_index()
    words = stats["subject_word"].values
    index = {s: i for i, s in enumerate(stats["sample"].values)}
    frame["subject_a"] = [words[index[s], a] for s, a in zip(frame["sample"], frame["pair_first"])]
    frame["subject_b"] = [words[index[s], b] for s, b in zip(frame["sample"], frame["pair_second"])]
    return frame


def _qk_tensor(block: np.ndarray) -> torch.Tensor:
    """A stored q or k chunk as float32: bfloat16 is stored as its 16 bits (int16), the rest as the model scored it."""
    x = torch.from_numpy(np.ascontiguousarray(block))
    return (x.view(torch.bfloat16) if x.dtype == torch.int16 else x).float()


def _maps_from_qk(q: np.ndarray, k: np.ndarray, scale: np.ndarray, *, mean: bool) -> np.ndarray:
    """softmax(q·kᵀ·scale) of blocks (…, head, y, x, dim) and (…, head, ky, kx, dim) → (…, [head], y, x, ky, kx)."""
    qt, kt = _qk_tensor(q), _qk_tensor(k)
    *lead, heads, h, w, dim = qt.shape
    s = torch.from_numpy(np.broadcast_to(np.asarray(scale, np.float32), lead).copy()).reshape(*lead, 1, 1, 1)
    probs = ((qt.reshape(*lead, heads, h * w, dim) * s) @ kt.reshape(*lead, heads, -1, dim).transpose(-1, -2))
    probs = probs.softmax(-1)
    probs = probs.mean(-3) if mean else probs
    return probs.reshape(*probs.shape[:-2], h, w, *kt.shape[-3:-1]).numpy()


QK_KINDS = ("cross", "self", "text_image", "text_text")  # the relations a joint q/k store makes maps of


def _joint_block(q: np.ndarray, k: np.ndarray, keys: np.ndarray, scale: np.ndarray, positions: np.ndarray, *,
                 kind: str, n_image: int, heads) -> np.ndarray:
    """One chunk of a joint q/k store → one relation's maps: (…, head, query, dim), (…, head, key, dim), (…, key)
    used keys, (…) scale, (…, token) recorded tokens' text positions → (…, [head], queries, keys), the softmax over
    every key the model used, its rows and columns those of ``kind`` (image tokens, or the recorded tokens with NaN at
    padding slots). Row by row of the leading dims and head by head, so a chunk's scores are one head's at a time."""
    qt, kt = _qk_tensor(q), _qk_tensor(k)
    lead = qt.shape[:-3]
    used = torch.from_numpy(np.broadcast_to(keys, (*lead, keys.shape[-1])).copy())
    s = np.broadcast_to(np.asarray(scale, np.float32), lead)
    pos = torch.from_numpy(np.broadcast_to(positions, (*lead, positions.shape[-1])).copy())
    text_rows, text_cols = kind in ("text_image", "text_text"), kind in ("cross", "text_text")
    chosen = range(qt.shape[-3]) if heads in ("mean", "all") else list(heads)
    out = []
    for j in np.ndindex(*lead):
        tokens = n_image + pos[j].clamp(min=0)  # padding slots read token 0, then become NaN
        rows = tokens if text_rows else torch.arange(n_image)
        cols = tokens if text_cols else torch.arange(n_image)
        per_head = []
        for h in chosen:
            scores = (qt[j][h, rows] * float(s[j])) @ kt[j][h].T
            probs = scores.masked_fill(~used[j], float("-inf")).softmax(-1)[:, cols]
            per_head.append(probs)
        maps = torch.stack(per_head).mean(0) if heads == "mean" else torch.stack(per_head)
        pad = pos[j] < 0
        if text_rows:
            maps[..., pad, :] = float("nan")
        if text_cols:
            maps[..., pad] = float("nan")
        out.append(maps)
    return torch.stack(out).reshape(*lead, *out[0].shape).numpy()


def maps_from_qk(group, kind: str = "self", heads: str | Sequence[int] = "mean") -> xr.DataArray:
    """One relation's maps of a group recorded with ``self_store="qk"``, made on read, lazily (one dask task per
    sample, step and layer), as the ``attn`` a group of that kind holds when recorded as maps, in float32.

    A UNet's store makes its self-attention: softmax(q·kᵀ·scale). A joint softmax's store (SD3, FLUX, FLUX.2,
    Qwen-Image …) keeps every token's q and every key the model scored, so any relation of it is made with the model's
    own normalisation over all keys: ``kind`` ``"self"`` (image → image: (…, y, x, ky, kx)), ``"cross"`` (image → text:
    (…, y, x, token)), ``"text_image"`` (…, token, y, x) and ``"text_text"`` (…, token, key_token) of the recorded
    tokens (NaN at a shorter prompt's padding slots, as recorded); the text relations of the layers whose softmax holds
    text (``joint``). ``heads``: "mean" (the default), "all" or a list of head indices."""
    ds = _dataset(group)
    if "q" not in ds.data_vars:
        raise ValueError("this group holds maps, not q and k (it was recorded with self_store='maps')")
    if not (heads in ("mean", "all") or (isinstance(heads, (list, tuple)) and heads
                                          and all(isinstance(h, int) and 0 <= h < ds.sizes["head"] for h in heads))):
        raise ValueError(f"heads must be 'mean', 'all' or head indices below {ds.sizes['head']}, got {heads!r}")
    if "key" not in ds.dims:
        if kind != "self":
            raise ValueError(f"a UNet's q/k store holds its self-attention alone (its own softmax), not {kind!r}")
        return _unet_from_qk(ds, heads)
    if kind not in QK_KINDS:
        raise ValueError(f"kind must be one of {QK_KINDS}, got {kind!r}")
    if kind != "self":
        ds = ds.isel(layer=np.flatnonzero(ds["joint"].values))
        if not ds.sizes["layer"]:
            raise ValueError(f"no layer of this group has text in its softmax, so it has no {kind!r} maps")
    h, w = ds.sizes["y"], ds.sizes["x"]
    n = ds.sizes["token"]
    cores = {"cross": ["y", "x", "token"], "self": ["y", "x", "ky", "kx"], "text_image": ["token", "y", "x"],
             "text_text": ["token", "key_token"]}[kind]
    flat = {"cross": (h * w, n), "self": (h * w, h * w), "text_image": (n, h * w), "text_text": (n, n)}[kind]
    out_core = (["head"] if heads != "mean" else []) + ["query_out", "key_out"]
    chunks = {"sample": 1, "step": 1, "layer": 1}
    q = ds["q"].chunk({**chunks, "head": -1, "query": -1, "dim": -1})
    k = ds["k"].chunk({**chunks, "head": -1, "key": -1, "dim": -1})
    used = ds["keys"].chunk({**chunks, "key": -1})
    sizes = {"query_out": flat[0], "key_out": flat[1]}
    if heads != "mean":
        sizes["head"] = ds.sizes["head"] if heads == "all" else len(heads)
    made = xr.apply_ufunc(
        _joint_block, q, k, used, ds["scale"], ds["token_position"].drop_vars(["token_text", "encoder"],
                                                                              errors="ignore"),
        input_core_dims=[["head", "query", "dim"], ["head", "key", "dim"], ["key"], [], ["token"]],
        output_core_dims=[out_core], exclude_dims={"head"},
        kwargs={"kind": kind, "n_image": h * w, "heads": heads}, dask="parallelized", output_dtypes=[np.float32],
        dask_gufunc_kwargs={"output_sizes": sizes, "allow_rechunk": True},
    )
    size = {"y": h, "x": w, "ky": h, "kx": w, "token": n, "key_token": n}
    made = made.transpose("sample", "step", "layer", *out_core)
    data = made.data.reshape(*made.shape[:-2], *[size[d] for d in cores])
    dims = ("sample", "step", "layer", *out_core[:-2], *cores)
    store_only = ("query", "key", "dim", "scale", "joint", "token_position")
    coords = {c: v for c, v in ds.coords.items() if set(v.dims) <= set(dims) and c not in store_only}
    coords.update({"ky": np.arange(h), "kx": np.arange(w)} if kind == "self" else {})
    coords.update({"key_token": np.arange(n)} if kind == "text_text" else {})
    if heads not in ("mean", "all"):
        coords["head"] = list(heads)
    elif heads == "mean":
        coords.pop("head", None)
    return xr.DataArray(data, dims=dims, coords=coords, name="attn")


def _unet_from_qk(ds: xr.Dataset, heads) -> xr.DataArray:
    if heads not in ("mean", "all"):
        ds = ds.isel(head=list(heads))
    core = ["head", "y", "x", "dim"]
    q = ds["q"].chunk({d: -1 for d in core}) if ds["q"].chunks else ds["q"]
    k = ds["k"].chunk({d: -1 for d in ("head", "ky", "kx", "dim")}) if ds["k"].chunks else ds["k"]
    out_core = (["head"] if heads != "mean" else []) + ["y", "x", "ky", "kx"]
    return xr.apply_ufunc(
        _maps_from_qk, q, k, ds["scale"], input_core_dims=[core, ["head", "ky", "kx", "dim"], []],
        output_core_dims=[out_core], kwargs={"mean": heads == "mean"}, dask="parallelized",
        output_dtypes=[np.float32], dask_gufunc_kwargs={"allow_rechunk": False},
    ).transpose("sample", "step", "layer", *out_core).rename("attn")


def self_from_qk(group, heads: str | Sequence[int] = "mean") -> xr.DataArray:
    """The self-attention maps of a group recorded with ``self_store="qk"`` (:func:`maps_from_qk`'s ``"self"``)."""
    return maps_from_qk(group, "self", heads)


def synthetic_store(path: str | Path, samples: int, like: xr.DataTree, seed: int = 0) -> int:
    """Write a store with ``like``'s layout (a recording: its groups, dims, coordinates, one sample per chunk) but
    ``samples`` samples of random maps normalised like attention; its size on disk in bytes.

    Why: to see whether an analysis fits a machine's memory at a size no sweep has reached yet. Written chunk by chunk
    by dask, so writing it needs no more memory than reading it. Prompts and token texts repeat ``like``'s samples.
    """
    path = Path(path)
    with replacing(path, suffixes=(".zarr",), what="synthetic store") as tmp:
        _write_synthetic(tmp, samples, like, seed)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_synthetic(path: Path, samples: int, like: xr.DataTree, seed: int) -> None:
    import zlib

    import dask.array as da

    xr.Dataset(attrs=like.attrs).to_zarr(path, mode="w", consolidated=False)
    for node in like.subtree:
        ds = node.to_dataset()
        if not ds.data_vars or "sample" not in ds.dims:
            continue
        for var in ds.data_vars:
            shape = (samples, *ds[var].shape[1:])
            rng = da.random.default_rng([seed, zlib.crc32(f"{node.path}/{var}".encode())])
            chunks = stored_chunks(ds[var].dims, shape)
            if ds[var].dtype == np.uint8:
                data = rng.integers(0, 256, shape, chunks=chunks, dtype=np.uint8)
            else:
                raw = rng.random(shape, chunks=chunks, dtype=np.float32)
                keys = tuple(i - ds[var].ndim for i, d in enumerate(ds[var].dims) if d in ("token", "ky", "kx"))
                data = (raw / raw.sum(axis=keys, keepdims=True)).astype(ds[var].dtype)
            pick = np.arange(samples) % ds.sizes["sample"]
            coords = {k: v for k, v in ds.coords.items() if "sample" not in v.dims}
            coords["sample"] = np.arange(samples)
            coords.update({k: (v.dims, v.values[pick]) for k, v in ds.coords.items()
                           if "sample" in v.dims and k != "sample"})
            coords["seed"] = ("sample", np.arange(samples))
            out = xr.Dataset({var: (ds[var].dims, data)}, coords=coords)
            out.to_zarr(path, group=node.path.lstrip("/"), mode="a", consolidated=False, encoding=zarr_encoding(out),
                        write_empty_chunks=True)
