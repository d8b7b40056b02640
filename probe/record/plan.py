"""What a recording will hold, before anything is generated: its samples, layers, groups and their shapes, and its
size (:func:`plan`, :func:`estimate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe import checks
from probe.checks import head_choice, prompt_fits, step_count, text_to_image
from probe.models import load
from probe.prompts import TextLayout, text_layout
from probe.record.config import RecordSettings
from probe.tap import Layer, attention_layers, denoiser, family_of, latent_size, select_layers
from probe.tap.layers import TEXT_QUERIES, refuse_unmapped

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


def _tokens(pipe, prompt: str, keep_padding: bool, max_sequence_length: int | None) -> TextLayout:
    """The recorded tokens: texts, their positions among the denoiser's text keys, and their encoders."""
    return text_layout(pipe, prompt_fits(pipe, prompt), keep_padding, max_sequence_length)


def plan(pipe, prompts, *, seeds, settings: RecordSettings | None = None, height: int | None = None,
         width: int | None = None, max_sequence_length: int | None = None, **fields) -> Plan:
    """Validate a recording's request and describe it (no generation). ``settings`` (or its fields as keywords, see
    :class:`~probe.record.config.RecordSettings`): what is recorded. Each (prompt, seed) sample is recorded once, so a
    repeated prompt or seed is refused."""
    s = RecordSettings.only(fields, settings, "plan")
    steps, kinds, layers, heads, keep_steps = s.steps, s.kinds, s.layers, s.heads, s.keep_steps
    keep_padding, self_keys, self_queries, self_store = s.keep_padding, s.self_keys, s.self_queries, s.self_store
    pipe = load(pipe)
    text_to_image(pipe)
    steps = step_count(steps)
    heads = head_choice(heads)
    kinds = checks.attention_kinds(kinds)
    refuse_unmapped(pipe, kinds, "record the other kinds (kinds=('cross',) …)")
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


def estimate(pipe, prompts, *, seeds, settings: RecordSettings | None = None, **kwargs) -> int:
    """Bytes a recording with these arguments will take (float16 maps plus images): :func:`plan`'s arguments; the
    pipeline keywords :func:`probe.record.record` would pass on are ignored, except the image size and text length."""
    chosen, rest = RecordSettings.split(kwargs, settings)
    size = {k: rest[k] for k in ("height", "width", "max_sequence_length") if k in rest}
    return plan(pipe, prompts, seeds=seeds, settings=chosen, **size).nbytes


