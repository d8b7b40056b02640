"""Record attention maps of a generation into an ``xarray.DataTree``.

Schema (see the README): ``/cross/res{N}`` holds ``attn(sample, step, layer, [head], y, x, token)``
and ``/self/res{N}`` holds ``attn(sample, step, layer, [head], y, x, ky, kx)``, float16, only the
conditional half of classifier-free guidance; ``/images`` holds ``image(sample, iy, ix, channel)``.
Reductions (head mean, CFG half, padding tokens) happen on the device; each batch is copied to
the host once, and with ``out=`` written to zarr batch by batch, so memory does not grow with
the number of samples.
"""

from __future__ import annotations

import errno
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from probe import checks
from probe.checks import disk_full, head_choice, prompt_fits, room_for, step_count, text_to_image
from probe.models import Layer, attention_layers, denoiser, latent_size, load, select_layers
from probe.prompts import TextLayout, text_layout
from probe.tap import Call, Consumer, Tap, TapError, family_of
from probe.tap.layers import KINDS, TEXT_QUERIES
from probe.writes import check_out, recover, replacing

BYTES_PER_VALUE = 2  # float16 storage
PIXEL_BYTES = 1
COMPLETE = "all_chunks_written"  # root attribute of a recording whose every chunk was written (fill values too)


@dataclass
class Plan:
    """What a recording will hold, known before anything is generated."""

    samples: list[tuple[str, int]]  # (prompt, seed)
    tokens: list[list[str]]  # per sample, padding dropped unless kept
    positions: list[list[int]]  # per sample, where those tokens sit in the text encoder's sequence
    n_tokens: int
    groups: dict[str, list[Layer]]
    steps: list[int]  # kept step indices
    heads: str | list[int]
    image_hw: tuple[int, int]
    encoders: list[list[str]]  # per sample and token: which text encoder ("clip", "t5")
    self_keys: int | None = None  # self-attention keys summed onto a self_keys² grid (None: every key)
    self_queries: tuple[tuple[float, float], ...] | None = None  # only these query points (fractions y, x)
    qk: dict[str, tuple[int, int]] | None = None  # self groups stored as q and k: group → (heads, head dim)
    qk_scale: dict[str, float] | None = None  # layer name → the scale its scores use

    def is_qk(self, group: str) -> bool:
        return self.qk is not None and group in self.qk

    def key_grid(self, layer: Layer) -> tuple[int, int]:
        """The self-attention key grid kept for a layer: its own, or pooled to ``self_keys`` per side."""
        h, w = layer.grid
        return (h, w) if self.self_keys is None or self.self_keys >= max(h, w) else (self.self_keys, self.self_keys)

    def query_cells(self, layer: Layer) -> list[tuple[int, int]]:
        """The query cells of ``self_queries`` on a layer's grid (a point's cell at that resolution)."""
        h, w = layer.grid
        return [(min(int(fy * h), h - 1), min(int(fx * w), w - 1)) for fy, fx in self.self_queries or ()]

    def head_count(self, layer: Layer) -> int | None:
        if self.heads == "mean":
            return None
        return layer.heads if self.heads == "all" else len(self.heads)

    def group_shape(self, group: str) -> tuple[int, ...]:
        """Per-sample shape of a group's ``attn``, in the order of :meth:`dims` (sample dropped)."""
        layer = self.groups[group][0]
        (h, w), (kh, kw) = layer.grid, self.key_grid(layer) if layer.kind == "self" else layer.grid
        size = {"step": len(self.steps), "layer": len(self.groups[group]), "head": self.head_count(layer),
                "point": len(self.self_queries or ()), "token": self.n_tokens, "key_token": self.n_tokens,
                "y": h, "x": w, "ky": kh, "kx": kw}
        return tuple(size[d] for d in self.dims(group)[1:])

    def dims(self, group: str) -> tuple[str, ...]:
        """The dims of a group's ``attn``, sample first: (sample, step, layer, [head], queries, keys) with queries
        y, x (image), point (chosen self-attention queries) or token (text), keys token, ky, kx (self) or y, x
        (text_image)."""
        layers = self.groups[group]
        kind = layers[0].kind
        heads = ("head",) if self.head_count(layers[0]) else ()
        queries = (("point",) if kind == "self" and self.self_queries is not None
                   else ("token",) if kind in TEXT_QUERIES else ("y", "x"))
        keys = {"cross": ("token",), "self": ("ky", "kx"), "text_image": ("y", "x"), "text_text": ("key_token",)}
        return ("sample", "step", "layer", *heads, *queries, *keys[kind])

    def qk_shape(self, group: str) -> tuple[int, ...]:
        """Per-sample shape of a q/k group's ``q`` and of its ``k``: (step, layer, head, y | ky, x | kx, dim)."""
        heads, dim = self.qk[group]
        return (len(self.steps), len(self.groups[group]), heads, *self.groups[group][0].grid, dim)

    def group_bytes(self) -> dict[str, int]:
        per = {g: (2 * int(np.prod(self.qk_shape(g))) if self.is_qk(g) else int(np.prod(self.group_shape(g))))
               * BYTES_PER_VALUE * len(self.samples) for g in self.groups}
        per["images"] = self.image_hw[0] * self.image_hw[1] * 3 * PIXEL_BYTES * len(self.samples)
        return per

    @property
    def nbytes(self) -> int:
        return sum(self.group_bytes().values())


def _tokens(pipe, prompt: str, keep_padding: bool, max_sequence_length: int | None) -> TextLayout:
    """The recorded tokens: texts, their positions among the denoiser's text keys, and their encoders."""
    return text_layout(pipe, prompt_fits(pipe, prompt), keep_padding, max_sequence_length)


def plan(
    pipe,
    prompts,
    *,
    seeds,
    steps: int = 50,
    kinds=("cross", "self"),
    layers=None,
    heads="mean",
    keep_steps=None,
    keep_padding: bool = False,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int | None = None,
    self_keys: int | None = None,
    self_queries=None,
    self_store: str = "maps",
) -> Plan:
    """Validate a recording's request and describe it (no generation). ``kinds``: one kind (``"cross"``) or several;
    each (prompt, seed) sample is recorded once, so a repeated prompt or seed is refused."""
    pipe = load(pipe)
    text_to_image(pipe)
    steps = step_count(steps)
    heads = head_choice(heads)
    kinds = checks.attention_kinds(kinds)
    layers = checks.layer_patterns(layers)
    height, width = checks.image_side(height, "height"), checks.image_side(width, "width")
    max_sequence_length = checks.sequence_length(max_sequence_length)
    prompts = [checks.prompt_text(p, "prompts") for p in checks.as_list(prompts)]
    seeds = checks.seed_list(seeds)
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    checks.distinct(prompts, "prompts")
    samples = [(p, s) for p in prompts for s in seeds]
    by_prompt = {p: _tokens(pipe, p, keep_padding, max_sequence_length) for p in prompts}
    layouts = [by_prompt[p] for p, _ in samples]
    tokens, positions = [t.texts for t in layouts], [t.positions for t in layouts]
    encoders = [t.encoders for t in layouts]
    chosen = select_layers(attention_layers(pipe, height, width), layers, kinds)
    if not chosen:
        raise ValueError(f"no attention layers of kinds {kinds} in this model")
    groups: dict[str, list[Layer]] = {}
    for layer in chosen:
        groups.setdefault(layer.group, []).append(layer)
    kept = list(range(steps)) if keep_steps is None else checks.step_indices(keep_steps, steps, "keep_steps")
    if heads not in ("mean", "all"):
        most = min(layer.heads for layer in chosen)
        if not heads or min(heads) < 0 or max(heads) >= most:
            raise ValueError(f"heads must be 'mean', 'all' or indices below {most}, got {heads}")
    self_keys, self_queries = _self_scope(self_keys, self_queries, [la for la in chosen if la.kind == "self"])
    lh, lw = latent_size(pipe, height, width)
    scale = getattr(pipe, "vae_scale_factor", 8)
    qk, qk_scale = _qk_store(pipe, self_store, groups, self_keys, self_queries)
    return Plan(samples, tokens, positions, max(map(len, tokens)), groups, kept, heads, (lh * scale, lw * scale),
                encoders, self_keys, self_queries, qk, qk_scale)


def _qk_store(pipe, self_store: str, groups: dict[str, list[Layer]], self_keys, self_queries):
    """For ``self_store="qk"``: each self group's (heads, head dim) and each layer's score scale; checks that the
    maps can be rebuilt from q and k alone (a UNet's self-attention: every key is an image token, no mask)."""
    if self_store not in ("maps", "qk"):
        raise ValueError(f"self_store must be 'maps' or 'qk', got {self_store!r}")
    if self_store == "maps":
        return None, None
    net = denoiser(pipe)
    if not family_of(net).self_qk:
        raise ValueError(f"self_store='qk' records self-attention that is its own softmax (a UNet's); "
                         f"{family_of(net).title}'s joint softmax normalises over the text keys too, so record its "
                         "maps (self_store='maps')")
    if self_keys is not None or self_queries is not None:
        raise ValueError("self_store='qk' keeps every query and key (maps are made on read); drop self_keys / "
                         "self_queries, or record maps")
    qk, scales = {}, {}
    for group, layers in groups.items():
        if layers[0].kind != "self":
            continue
        shapes = set()
        for layer in layers:
            module = net.get_submodule(layer.name)
            shapes.add((module.heads, module.to_q.out_features // module.heads))
            scales[layer.name] = float(module.scale)
        if len(shapes) > 1:
            raise ValueError(f"the layers of {group} have different head shapes {sorted(shapes)}; record them apart")
        qk[group] = shapes.pop()
    if not qk:
        raise ValueError("self_store='qk' needs self-attention layers among the recorded kinds")
    return qk, scales


def _self_scope(self_keys, self_queries, layers: list[Layer]):
    """Check the affordable forms of self-attention: keys pooled to a grid that divides every finer layer's grid,
    query points given as (y, x) fractions of the image in [0, 1)."""
    if self_keys is not None:
        if isinstance(self_keys, bool) or not isinstance(self_keys, int) or self_keys < 1:
            raise ValueError(f"self_keys is the side of the pooled key grid (an int ≥ 1, e.g. 16), got {self_keys!r}")
        bad = sorted({la.grid for la in layers if max(la.grid) > self_keys
                      and (la.grid[0] % self_keys or la.grid[1] % self_keys)})
        if bad:
            raise ValueError(f"self_keys={self_keys} does not divide the self-attention grids {bad}; pick a divisor "
                             "of them (keys are summed over whole cells)")
    if self_queries is not None:
        try:
            points = tuple((float(y), float(x)) for y, x in self_queries)
        except (TypeError, ValueError) as err:
            raise ValueError("self_queries takes (y, x) pairs, fractions of the image height and width in [0, 1), "
                             f"e.g. [(0.5, 0.25)]; got {self_queries!r}") from err
        if not points or not all(0 <= v < 1 for point in points for v in point):
            raise ValueError(f"self_queries must be one or more (y, x) fractions in [0, 1), got {self_queries!r}")
        self_queries = points
    return self_keys, self_queries


def estimate(pipe, prompts, *, seeds, **kwargs) -> int:
    """Bytes a recording with these arguments will take (float16 maps plus images)."""
    return plan(pipe, prompts, seeds=seeds, **kwargs).nbytes


class Recorder(Consumer):
    """Tap consumer that keeps the requested maps of one batch in device buffers."""

    def __init__(self, plan: Plan, batch: slice, device: torch.device, steps: int):
        self.plan, self.device, self.steps = plan, device, steps
        self.mean_heads = plan.heads == "mean"
        self.n = batch.stop - batch.start
        self.step_pos = {s: i for i, s in enumerate(plan.steps)}
        self.where: dict[tuple[str, str], tuple[str, int]] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for group, layers in plan.groups.items():
            for i, layer in enumerate(layers):
                self.where[layer.key] = (group, i)
            if plan.is_qk(group):
                for part in ("q", "k"):
                    self.buffers[f"{group}/{part}"] = torch.full((self.n, *plan.qk_shape(group)), float("nan"),
                                                                 dtype=torch.float16, device=device)
                continue
            self.buffers[group] = torch.full(
                (self.n, *plan.group_shape(group)), float("nan"), dtype=torch.float16, device=device
            )
        n_real = [len(t) for t in plan.tokens[batch]]
        slots = torch.arange(plan.n_tokens, device=device)
        self.padding = slots[None, :] >= torch.tensor(n_real, device=device)[:, None]
        self.positions = torch.tensor([p + [0] * (plan.n_tokens - len(p)) for p in plan.positions[batch]],
                                      device=device)  # (n, n_tokens): encoder positions of the recorded tokens

    def wants(self, call: Call) -> bool:
        """The pipeline's own passes at the kept steps; guidance's, inversion's and correction passes are not the
        generation's, and an unconditional half alone is not recorded."""
        if call.pass_ not in ("cfg", "cond") or call.layer.key not in self.where:
            return False
        if not 0 <= call.step < self.steps:
            raise TapError(f"{call.layer.name}: a {call.pass_} pass at step {call.step}, but this recording has "
                           f"steps 0 … {self.steps - 1}; was the pipeline called with another num_inference_steps?")
        return call.step in self.step_pos

    @torch.no_grad()
    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        group, i = self.where[call.layer.key]
        x = call.conditional(probs.detach())  # (n, heads, q, k)
        if x.shape[0] != self.n:
            raise TapError(f"{call.layer.name}: a {call.pass_} pass with {x.shape[0]} conditional rows at step "
                           f"{call.step}, but this recording's batch has {self.n} samples")
        if self.plan.heads == "mean":
            x = x.float().mean(1)
        elif self.plan.heads != "all":
            x = x[:, self.plan.heads]
        h, w = call.layer.grid
        kind = call.layer.kind
        if kind in TEXT_QUERIES:  # the recorded tokens' rows, padding rows NaN
            x = self._tokens(x.transpose(-1, -2)).transpose(-1, -2)
        if kind in ("cross", "text_text"):
            x = self._tokens(x)
        if kind == "cross":
            x = x.reshape(*x.shape[:-2], h, w, x.shape[-1])
        elif kind == "text_image":
            x = x.reshape(*x.shape[:-1], h, w)
        elif kind == "self":
            if self.plan.self_queries is not None:  # only the chosen query cells, before anything is copied
                x = x[..., [qy * w + qx for qy, qx in self.plan.query_cells(call.layer)], :]
            keys = x.reshape(*x.shape[:-1], h, w)
            kh, kw = self.plan.key_grid(call.layer)
            if (kh, kw) != (h, w):  # each pooled key cell holds the attention mass of the keys inside it
                keys = keys.reshape(*keys.shape[:-2], kh, h // kh, kw, w // kw).sum((-3, -1))
            x = keys if self.plan.self_queries is not None else keys.reshape(*x.shape[:-2], h, w, kh, kw)
        self.buffers[group][:, self.step_pos[call.step], i] = x.to(torch.float16)
        return None

    def reads_qk(self, call: Call) -> bool:
        return self.plan.is_qk(call.layer.group)

    @torch.no_grad()
    def on_qk(self, call: Call, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        group, i = self.where[call.layer.key]
        h, w = call.layer.grid
        for part, x in (("q", query), ("k", key)):
            x = call.conditional(x.detach())  # (n, heads, tokens, dim)
            self.buffers[f"{group}/{part}"][:, self.step_pos[call.step], i] = (
                x.reshape(*x.shape[:2], h, w, x.shape[-1]).to(torch.float16))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The recorded tokens' columns of (n, …, text slots): each sample's own positions, padding NaN."""
        index = self.positions.view(self.n, *([1] * (x.ndim - 2)), -1).expand(*x.shape[:-1], -1)
        pad = self.padding.view(self.n, *([1] * (x.ndim - 2)), -1)
        return x.gather(-1, index).masked_fill(pad, float("nan"))

    def to_host(self) -> dict[str, np.ndarray]:
        return {g: b.cpu().numpy() for g, b in self.buffers.items()}


def _step_and_layer_coords(plan: Plan, layers: list[Layer], sample: dict, timesteps) -> dict:
    """The coordinates every group shares: the samples, the kept steps with their timesteps, the layers."""
    return {**sample, "step": plan.steps, "timestep": ("step", [float(timesteps[s]) for s in plan.steps]),
            "layer": np.array([layer.name for layer in layers], dtype=object),
            "block": ("layer", np.array([layer.block for layer in layers], dtype=object))}


def _datasets(plan: Plan, batch: slice, arrays: dict[str, np.ndarray], images: np.ndarray, timesteps) -> dict:
    """One batch as a dict group → xr.Dataset, with the coordinates of DESIGN's schema."""
    index = np.arange(batch.start, batch.stop)
    prompts = np.array([p for p, _ in plan.samples[batch]], dtype=object)
    seeds = np.array([s for _, s in plan.samples[batch]])
    sample = {"sample": index, "prompt": ("sample", prompts), "seed": ("sample", seeds)}
    out = {}
    for group, layers in plan.groups.items():
        h, w = layers[0].grid
        if plan.is_qk(group):
            out[group] = _qk_dataset(plan, group, arrays, sample, timesteps)
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
            texts = [t + [""] * (plan.n_tokens - len(t)) for t in plan.tokens[batch]]
            coords["token"] = np.arange(plan.n_tokens)
            coords["token_text"] = (("sample", "token"), np.array(texts, dtype=object))
            if len({e for es in plan.encoders for e in es}) > 1:
                encoders = [e + [""] * (plan.n_tokens - len(e)) for e in plan.encoders[batch]]
                coords["encoder"] = (("sample", "token"), np.array(encoders, dtype=object))
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


def _qk_dataset(plan: Plan, group: str, arrays: dict[str, np.ndarray], sample: dict, timesteps) -> xr.Dataset:
    """A self group stored as the q and k its scores are made of (:func:`probe.lazy.self_from_qk` makes the maps)."""
    layers = plan.groups[group]
    h, w = layers[0].grid
    heads, dim = plan.qk[group]
    coords = {**_step_and_layer_coords(plan, layers, sample, timesteps),
              "scale": ("layer", [plan.qk_scale[layer.name] for layer in layers]),
              "head": np.arange(heads), "y": np.arange(h), "x": np.arange(w), "ky": np.arange(h), "kx": np.arange(w),
              "dim": np.arange(dim)}
    lead = ("sample", "step", "layer", "head")
    return xr.Dataset({"q": ((*lead, "y", "x", "dim"), arrays[f"{group}/q"]),
                       "k": ((*lead, "ky", "kx", "dim"), arrays[f"{group}/k"])}, coords=coords,
                      attrs={"self_store": "qk", "heads": plan.heads if isinstance(plan.heads, str)
                             else ",".join(map(str, plan.heads))})


def _attrs(pipe, steps: int, guidance_scale: float, plan: Plan, kwargs: dict) -> dict:
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


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """As diffusers' ``numpy_to_pil`` does: round(x·255)."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def record(
    pipe,
    prompts,
    *,
    seeds,
    steps: int = 50,
    guidance_scale: float = 7.5,
    kinds=("cross", "self"),
    layers=None,
    heads="mean",
    keep_steps=None,
    out: str | Path | None = None,
    max_bytes: int | None = None,
    batch_size: int = 1,
    keep_padding: bool = False,
    progress: bool = True,
    self_keys: int | None = None,
    self_queries=None,
    self_store: str = "maps",
    force: bool = False,
    **pipeline_kwargs,
) -> xr.DataTree:
    """Generate every (prompt, seed) sample and record its attention maps.

    ``layers``: None (all), or names / globs / ``re:`` patterns / resolutions (see
    :func:`probe.models.select_layers`). ``heads``: ``"mean"``, ``"all"`` or a list of indices.
    ``keep_steps``: step indices to keep (default all). ``out``: a ``.zarr`` path written batch by
    batch (the tree returned then reads lazily from it) or a ``.nc`` path written at the end; either is written
    beside ``out`` and swapped in when complete (a failed or killed run leaves ``out`` as it was), ``out`` is checked
    before anything is generated, and a file or folder there that is not a probe recording is replaced only with
    ``force=True``.
    Self-attention at a size one can afford (a FLUX layer's image→image map is 4,096² per head and step):
    ``self_keys=16`` sums each query's attention onto a 16×16 grid of key cells (rows still sum to their mass),
    ``self_queries=[(0.5, 0.25), …]`` keeps only those query points ((y, x) fractions of the image; dims
    ``point``, ``ky``, ``kx`` with the cell of each point in ``query_y``, ``query_x``). Both reduce on the device.
    ``self_store="qk"`` (UNets) keeps a self layer's q and k as the model scores them instead of its maps
    (h·w·2·dim values per head instead of (h·w)²: 50× smaller per head at Stable Diffusion's 64², and no extra
    arithmetic while generating); :func:`probe.lazy.self_from_qk` makes the maps on read, lazily.
    Other keywords (height, width, negative_prompt …) go to the pipeline call.
    """

    pipe = load(pipe)
    checks.pipeline_keywords(pipe, pipeline_kwargs, "record", {
        "prompt": "from prompts=", "generator": "each sample's from its seed", "output_type": "images are stored",
        "num_images_per_prompt": "one image per (prompt, seed) sample: give more seeds",
        "latents": "the seed draws each sample's initial noise, so latents= would give every seed the same one; for "
                   "noise of your own use probe.guide.generate(pipe, prompt, ..., init_noise=tensor)"}, own=record)
    guidance_scale = checks.cfg_scale(guidance_scale)
    batch_size = checks.whole_number(batch_size, "batch_size", "the number of samples generated together")
    max_bytes = checks.byte_limit(max_bytes)
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    p = plan(pipe, prompts, seeds=seeds, steps=steps, kinds=kinds, layers=layers, heads=heads,
             keep_steps=keep_steps, keep_padding=keep_padding, height=height, width=width,
             max_sequence_length=pipeline_kwargs.get("max_sequence_length"), self_keys=self_keys,
             self_queries=self_queries, self_store=self_store)
    if max_bytes is not None and p.nbytes > max_bytes:
        parts = ", ".join(f"{g}: {b / 1e6:.1f} MB" for g, b in sorted(p.group_bytes().items(), key=lambda kv: -kv[1]))
        raise MemoryError(
            f"this recording needs an estimated {p.nbytes / 1e6:.1f} MB, over max_bytes={max_bytes / 1e6:.1f} MB "
            f"({parts}). Drop the largest groups (kinds=('cross',), layers=[16] …), keep fewer steps "
            "(keep_steps=…), average heads (heads='mean') or record fewer samples."
        )
    if out is not None:
        out = check_out(out, (".zarr", ".nc"), force=force)
        room_for(out, p.nbytes)
    attrs = _attrs(pipe, steps, guidance_scale, p, pipeline_kwargs)
    try:
        with replacing(out, suffixes=(".zarr", ".nc"), force=force, what="recording") if out else nullcontext() as tmp:
            zarr_tmp = tmp if out is not None and out.suffix == ".zarr" else None
            tree = _generate(pipe, p, steps, guidance_scale, batch_size, progress, attrs, zarr_tmp, pipeline_kwargs)
            if out is not None and zarr_tmp is None:
                _write_netcdf(tree, tmp)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise disk_full(err, out) from err
        raise
    return open_recording(out) if out is not None and out.suffix == ".zarr" else tree


def _generate(pipe, p: Plan, steps: int, guidance_scale: float, batch_size: int, progress: bool, attrs: dict,
              zarr_path: Path | None, pipeline_kwargs: dict) -> xr.DataTree | None:
    """Run every batch of the plan; each batch appended to ``zarr_path`` as it finishes, or all kept in memory and
    returned as one tree."""
    height, width = pipeline_kwargs.get("height"), pipeline_kwargs.get("width")
    device = pipe._execution_device
    batches: list[dict] = []
    with tqdm(total=len(p.samples), desc="recording", unit="sample", disable=not progress) as bar:
        for start in range(0, len(p.samples), batch_size):
            batch = slice(start, min(start + batch_size, len(p.samples)))
            recorder = Recorder(p, batch, device, steps)
            with Tap(pipe, [recorder], height=height, width=width) as tap:
                result = pipe(
                    prompt=[prompt for prompt, _ in p.samples[batch]],
                    generator=[torch.Generator(device).manual_seed(s) for _, s in p.samples[batch]],
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    output_type="np",
                    **pipeline_kwargs,
                )
                timesteps = [tap.timestep_of(s) for s in range(steps)]
            groups = _datasets(p, batch, recorder.to_host(), _to_uint8(result.images), timesteps)
            if zarr_path is not None:
                _append_zarr(zarr_path, groups, attrs, first=start == 0)
            else:
                batches.append(groups)
            bar.update(batch.stop - batch.start)
    if zarr_path is not None:
        return None
    return xr.DataTree.from_dict(
        {"/": xr.Dataset(attrs=attrs), **{g: xr.concat([b[g] for b in batches], "sample") for g in batches[0]}}
    )


MAP_VARIABLES = ("attn", "q", "k", "image")


def stored_chunks(dims, shape) -> tuple[int, ...]:
    """A recording's chunks: one per sample, and per step for maps (a viewer moving through steps reads only the
    step it shows)."""
    return tuple(1 if d in ("sample", "step") else n for d, n in zip(dims, shape))


def zarr_encoding(ds: xr.Dataset) -> dict:
    """How a group's maps are stored: :func:`stored_chunks`, zstd, and a CRC-32C checksum in every chunk, so a
    damaged chunk is an error when read instead of wrong numbers."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {v: {"chunks": stored_chunks(ds[v].dims, ds[v].shape), "compressors": [ZstdCodec(), Crc32cCodec()]}
            for v in MAP_VARIABLES if v in ds.data_vars}


def _append_zarr(path: Path, groups: dict[str, xr.Dataset], attrs: dict, first: bool) -> None:
    if first:
        xr.Dataset(attrs=attrs).to_zarr(path, mode="w", consolidated=False)
    for group, ds in groups.items():
        if first:
            ds.to_zarr(path, group=group, mode="a", encoding=zarr_encoding(ds), consolidated=False,
                       write_empty_chunks=True)
        else:
            ds.to_zarr(path, group=group, append_dim="sample", consolidated=False, write_empty_chunks=True)


def _write_netcdf(tree: xr.DataTree, path: Path) -> None:
    """netCDF4 through h5netcdf, a Fletcher-32 checksum on every chunk of the maps (HDF5 checks it on each read)."""
    encoding = {node.path: {v: {"fletcher32": True} for v in MAP_VARIABLES if v in node.ds.data_vars}
                for node in tree.subtree if any(v in node.ds.data_vars for v in MAP_VARIABLES)}
    tree.to_netcdf(path, engine="h5netcdf", encoding=encoding)


def save(tree: xr.DataTree, path: str | Path, *, force: bool = False) -> Path:
    """Write a recording to ``.zarr`` or ``.nc`` (netCDF4 through h5netcdf), whole or not at all.

    The new store is written beside ``path`` and swapped in when complete, so a failure or a kill leaves what was
    at ``path`` as it was, and saving a lazily opened recording over its own store works (it is read before the
    swap). ``force=True`` replaces a file or folder at ``path`` that is not a probe recording.
    """
    tree = tree.copy(deep=False)
    tree.attrs = {**tree.attrs, COMPLETE: 1}  # every chunk is written, so a missing one is a damaged store
    with replacing(path, suffixes=(".zarr", ".nc"), force=force, what="recording") as tmp:
        if Path(path).suffix == ".zarr":
            encoding = {node.path: zarr_encoding(node.ds) for node in tree.subtree}
            tree.to_zarr(tmp, mode="w-", consolidated=False, encoding={k: v for k, v in encoding.items() if v},
                         write_empty_chunks=True)
        else:
            _write_netcdf(tree, tmp)
    return Path(path)


def full_self(ds: xr.Dataset, reader: str) -> xr.Dataset:
    """A self-attention group that holds every query and every key, or a clear error for a reader that needs that
    (a recording made with ``self_keys`` or ``self_queries`` keeps less)."""
    if "q" in ds.data_vars:
        raise ValueError(f"{reader} needs self-attention maps, and this group holds the q and k they are made of "
                         "(self_store='qk'): make them with probe.lazy.self_from_qk(group) first")
    kept = [what for what, flag in (("pooled keys", ds.attrs.get("keys_pooled")),
                                    ("chosen query points", ds.attrs.get("query_points") or "point" in ds.dims))
            if flag]
    if kept:
        raise ValueError(f"{reader} needs full self-attention maps, but this recording kept {' and '.join(kept)} "
                         "(self_keys= / self_queries=); record again without them for this use")
    return ds


def open_recording(path: str | Path, *, verify: bool = False) -> xr.DataTree:
    """Open a recording lazily (dask arrays; nothing is read until used).

    Every chunk the writer made must be there (a deleted chunk would read as NaN maps or a black image); with
    ``verify=True`` every chunk is also read and checked against the checksum the writer stored in it (zarr:
    CRC-32C, netCDF: Fletcher-32), which reads the whole recording once.
    """
    path = Path(path)
    recover(path)
    if not path.exists():
        raise FileNotFoundError(f"no recording at {path}")
    engine = "zarr" if path.suffix == ".zarr" or path.is_dir() else "h5netcdf"
    kwargs = {"consolidated": False} if engine == "zarr" else {}
    try:
        tree = xr.open_datatree(path, engine=engine, chunks={}, **kwargs)
    except Exception as err:  # zarr's GroupNotFoundError, h5py's OSError, a truncated file's ValueError …
        raise ValueError(f"{path} is not a readable recording ({type(err).__name__}: {err}). A recording is "
                         "written beside its path and renamed only when complete, so this one was made "
                         "elsewhere or damaged afterwards: record it again") from err
    if not any(name.startswith(("cross", "self")) for name in tree.children):
        raise ValueError(f"{path} opens but holds no attention groups (cross/…, self/…): it is not a probe "
                         f"recording (its groups: {sorted(tree.children)})")
    foreign = recording_schema_problems(tree)
    if foreign:
        raise ValueError(f"{path} opens but is not a probe recording: {'; '.join(foreign[:5])}")
    problems = contradictions(tree) + damaged_chunks(path, read=verify)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{path} is damaged: {'; '.join(problems[:5])}{more}. It was complete when written, so it "
                         "changed afterwards: restore it from a copy or record it again")
    return tree


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


def damaged_chunks(path: str | Path, read: bool = False) -> list[str]:
    """The chunks of a written recording that are missing (zarr: every chunk of its maps and images is written, so
    a missing one was deleted), and with ``read=True`` those whose stored checksum does not match."""
    path = Path(path)
    if not path.is_dir():
        return _damaged_netcdf(path) if read else []
    import zarr

    if not zarr.open_group(str(path), mode="r").attrs.get(COMPLETE):
        return []  # older recordings skipped chunks of fill values; a sweep's items are checked by their markers
    found = []
    for group_path, array in _arrays(zarr.open_group(str(path), mode="r")):
        if group_path.rsplit("/", 1)[-1] not in MAP_VARIABLES:
            continue
        grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks)]
        for coords in np.ndindex(*[len(g) for g in grid]):
            key = array.metadata.encode_chunk_key(coords)
            if not (path / group_path / key).is_file():
                found.append(f"chunk {group_path}/{key} is missing")
            elif read:
                try:
                    array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks))]
                except Exception as err:  # zarr's checksum mismatch, a codec's error on a truncated chunk
                    found.append(f"chunk {group_path}/{key} is damaged ({err})")
    return found


def _arrays(group, prefix: str = ""):
    for name, member in group.members():
        import zarr

        if isinstance(member, zarr.Array):
            yield f"{prefix}{name}", member
        else:
            yield from _arrays(member, f"{prefix}{name}/")


def _damaged_netcdf(path: Path) -> list[str]:
    import h5py

    found = []
    with h5py.File(path, "r") as f:
        def check(name, obj):
            if isinstance(obj, h5py.Dataset):
                try:
                    obj[()]
                except OSError as err:  # HDF5's Fletcher-32 mismatch, a truncated file
                    found.append(f"{name} is damaged ({err})")
        f.visititems(check)
    return found
