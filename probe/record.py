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
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from probe.checks import disk_full, head_choice, room_for, step_count, text_to_image
from probe.models import Layer, attention_layers, denoiser, latent_size, load, select_layers
from probe.prompts import TextLayout, text_layout
from probe.tap import Call, Consumer, Tap, TapError, family_of
from probe.tap.layers import TEXT_QUERIES

BYTES_PER_VALUE = 2  # float16 storage
PIXEL_BYTES = 1


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


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple, range, np.ndarray)) else [x]


def _tokens(pipe, prompt: str, keep_padding: bool, max_sequence_length: int | None) -> TextLayout:
    """The recorded tokens: texts, their positions among the denoiser's text keys, and their encoders."""
    tok = pipe.tokenizer
    ids = tok(prompt, truncation=False).input_ids
    if len(ids) > tok.model_max_length:
        raise ValueError(
            f"prompt {prompt!r} has {len(ids)} tokens; the text encoder takes at most {tok.model_max_length} "
            "(start and end tokens included). Shorten the prompt."
        )
    return text_layout(pipe, prompt, keep_padding, max_sequence_length)


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
    """Validate a recording's request and describe it (no generation)."""
    pipe = load(pipe)
    text_to_image(pipe)
    steps = step_count(steps)
    heads = head_choice(heads)
    prompts, seeds = _as_list(prompts), [int(s) for s in _as_list(seeds)]
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    samples = [(p, s) for p in prompts for s in seeds]
    layouts = [_tokens(pipe, p, keep_padding, max_sequence_length) for p, _ in samples]
    tokens, positions = [t.texts for t in layouts], [t.positions for t in layouts]
    encoders = [t.encoders for t in layouts]
    chosen = select_layers(attention_layers(pipe, height, width), layers, tuple(kinds))
    if not chosen:
        raise ValueError(f"no attention layers of kinds {tuple(kinds)} in this model")
    groups: dict[str, list[Layer]] = {}
    for layer in chosen:
        groups.setdefault(layer.group, []).append(layer)
    kept = list(range(steps)) if keep_steps is None else sorted({int(s) for s in _as_list(keep_steps)})
    if not kept or kept[0] < 0 or kept[-1] >= steps:
        raise ValueError(f"keep_steps must lie in 0 … {steps - 1}, got {keep_steps}")
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
    if family_of(net).name != "unet":
        raise ValueError("self_store='qk' records a UNet's self-attention; a joint softmax (SD3, FLUX) normalises "
                         "over the text keys too, so record its maps (self_store='maps')")
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
    **pipeline_kwargs,
) -> xr.DataTree:
    """Generate every (prompt, seed) sample and record its attention maps.

    ``layers``: None (all), or names / globs / ``re:`` patterns / resolutions (see
    :func:`probe.models.select_layers`). ``heads``: ``"mean"``, ``"all"`` or a list of indices.
    ``keep_steps``: step indices to keep (default all). ``out``: a ``.zarr`` path written batch by
    batch (the tree returned then reads lazily from it) or a ``.nc`` path written at the end.
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
        out = Path(out)
        if out.suffix not in (".zarr", ".nc"):
            raise ValueError(f"out must end in .zarr or .nc, got {out}")
        room_for(out, p.nbytes)
    device = pipe._execution_device
    zarr_tmp = out.with_name(out.name + ".partial") if out is not None and out.suffix == ".zarr" else None
    if zarr_tmp is not None and zarr_tmp.exists():
        shutil.rmtree(zarr_tmp)
    attrs = _attrs(pipe, steps, guidance_scale, p, pipeline_kwargs)
    batches: list[dict] = []
    bar = tqdm(total=len(p.samples), desc="recording", unit="sample", disable=not progress)
    try:
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
            if zarr_tmp is not None:
                _append_zarr(zarr_tmp, groups, attrs, first=start == 0)
            else:
                batches.append(groups)
            bar.update(batch.stop - batch.start)
    except BaseException as err:
        if zarr_tmp is not None and zarr_tmp.exists():
            shutil.rmtree(zarr_tmp)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise disk_full(err, out) from err
        raise
    finally:
        bar.close()
    if zarr_tmp is not None:
        if out.exists():
            shutil.rmtree(out)
        zarr_tmp.rename(out)
        return open_recording(out)
    tree = xr.DataTree.from_dict(
        {"/": xr.Dataset(attrs=attrs), **{g: xr.concat([b[g] for b in batches], "sample") for g in batches[0]}}
    )
    if out is not None:
        save(tree, out)
    return tree


def _append_zarr(path: Path, groups: dict[str, xr.Dataset], attrs: dict, first: bool) -> None:
    if first:
        xr.Dataset(attrs=attrs).to_zarr(path, mode="w", consolidated=False)
    for group, ds in groups.items():
        if first:
            # one chunk per (sample, step): a viewer moving through steps reads only the step it shows
            chunks = {v: {"chunks": (1, 1, *ds[v].shape[2:])} for v in ("attn", "q", "k") if v in ds}
            ds.to_zarr(path, group=group, mode="a", encoding=chunks, consolidated=False)
        else:
            ds.to_zarr(path, group=group, append_dim="sample", consolidated=False)


def save(tree: xr.DataTree, path: str | Path) -> Path:
    """Write a recording to ``.zarr`` or ``.nc`` (netCDF4 through h5netcdf)."""
    path = Path(path)
    if path.suffix == ".zarr":
        tree.to_zarr(path, mode="w", consolidated=False)
    elif path.suffix == ".nc":
        tree.to_netcdf(path, engine="h5netcdf")
    else:
        raise ValueError(f"save to a .zarr or .nc path, got {path}")
    return path


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


def open_recording(path: str | Path) -> xr.DataTree:
    """Open a recording lazily (dask arrays; nothing is read until used)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no recording at {path}")
    engine = "zarr" if path.suffix == ".zarr" or path.is_dir() else "h5netcdf"
    kwargs = {"consolidated": False} if engine == "zarr" else {}
    try:
        tree = xr.open_datatree(path, engine=engine, chunks={}, **kwargs)
    except Exception as err:  # zarr's GroupNotFoundError, h5py's OSError, a truncated file's ValueError …
        raise ValueError(f"{path} is not a readable recording ({type(err).__name__}: {err}). A recording is "
                         "written to a '.partial' folder and renamed only when complete, so this one was made "
                         "elsewhere or damaged afterwards: record it again") from err
    if not any(name.startswith(("cross", "self")) for name in tree.children):
        raise ValueError(f"{path} opens but holds no attention groups (cross/…, self/…): it is not a probe "
                         f"recording (its groups: {sorted(tree.children)})")
    return tree
