"""What a recording will hold, before anything is generated: its samples, layers, groups and their shapes, and its
size (:func:`plan`, :func:`estimate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probe import checks
from probe.checks import head_choice, prompt_fits, text_to_image
from probe.models import generation, load
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
    qk_text: int | None = None  # joint softmax (SD3, FLUX …): text keys kept per layer; None: a UNet's image keys only
    qk_dtype: str = "float16"  # how q and k are stored (:func:`qk_storage`)
    qk_text_layers: frozenset[str] = frozenset()  # the q/k layers whose softmax holds text keys too

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

    @property
    def qk_joint(self) -> bool:
        """q and k of a joint softmax: every token in one sequence (image tokens, then text), with the keys it used."""
        return self.qk_text is not None

    def qk_shape(self, group: str) -> tuple[int, ...]:
        """Per-sample shape of a q/k group's ``q`` and of its ``k``: (step, layer, head, y | ky, x | kx, dim), or for a
        joint softmax (step, layer, head, query | key, dim) with the image tokens first, then :attr:`qk_text` text."""
        heads, dim = self.qk[group]
        grid = self.groups[group][0].grid
        tokens = (grid[0] * grid[1] + self.qk_text,) if self.qk_joint else grid
        return (len(self.steps), len(self.groups[group]), heads, *tokens, dim)

    def group_bytes(self) -> dict[str, int]:
        per = {}
        for g, layers in self.groups.items():
            if self.is_qk(g):
                (h, w), (heads, dim) = layers[0].grid, self.qk[g]
                one = qk_layer_bytes(h * w, self.qk_text or 0, heads, dim, np.dtype(self.qk_dtype).itemsize,
                                     key_mask=self.qk_joint) * len(self.steps) * len(layers)
            else:
                one = int(np.prod(self.group_shape(g))) * BYTES_PER_VALUE
            per[g] = one * len(self.samples)
        per["images"] = self.image_hw[0] * self.image_hw[1] * 3 * PIXEL_BYTES * len(self.samples)
        return per

    @property
    def nbytes(self) -> int:
        return sum(self.group_bytes().values())


def qk_layer_bytes(image_tokens: int, text_tokens: int, heads: int, head_dim: int, value_bytes: int,
                   key_mask: bool = True) -> int:
    """Bytes of one layer's q and k at one step for one sample: every query and key (image and text) per head, and
    for a joint softmax one byte per key saying whether it took part (:attr:`Plan.qk_joint`)."""
    tokens = image_tokens + text_tokens
    return 2 * heads * tokens * head_dim * value_bytes + (tokens if key_mask else 0)


def map_layer_bytes(image_tokens: int, text_tokens: int, heads: int | None) -> int:
    """Bytes of one joint layer's maps at one step for one sample, every relation (cross, self, text_image,
    text_text: (image + text)² probabilities) in float16, per head (``heads``) or their mean (None)."""
    return (image_tokens + text_tokens) ** 2 * (heads or 1) * BYTES_PER_VALUE


KNOWN_SIZES = {  # name → (image tokens, text tokens, heads, head dim, bytes per q/k value): diffusers' configs
    "FLUX.1 [dev], 1024² (bfloat16)": (64 * 64, 512, 24, 128, 2),
    "SD3 medium, 1024² (float16)": (64 * 64, 77 + 256, 24, 64, 2),
    "SD3.5 large, 1024² (bfloat16)": (64 * 64, 77 + 256, 38, 64, 2),
}
"""Image tokens (1024 px / 8 (autoencoder) / 2 (patches) per side), text keys (FLUX: T5's 512; SD3: CLIP's 77 then
T5's 256), heads × head dim of the transformers' own configs, at the dtype each is run in."""


def qk_size_table(sizes: dict | None = None):
    """Bytes per joint layer, per step and sample: the q/k store (:func:`qk_layer_bytes`, what :func:`estimate`
    counts) against every relation's maps, head mean and per head (:func:`map_layer_bytes`); ``sizes`` as
    :data:`KNOWN_SIZES` (its default). :func:`qk_size_markdown` prints it as the README's table."""
    import pandas as pd

    rows = []
    for name, (image, text, heads, dim, value) in (sizes or KNOWN_SIZES).items():
        qk, mean, per_head = (qk_layer_bytes(image, text, heads, dim, value), map_layer_bytes(image, text, None),
                              map_layer_bytes(image, text, heads))
        rows.append({"model": name, "image tokens": image, "text tokens": text, "heads × dim": f"{heads} × {dim}",
                     "q/k MB": round(qk / 1e6, 1), "maps, head mean MB": round(mean / 1e6, 1),
                     "maps, per head MB": round(per_head / 1e6, 1), "per-head maps / q/k": round(per_head / qk, 1)})
    return pd.DataFrame(rows).set_index("model")


def qk_storage(dtype: torch.dtype) -> np.dtype:
    """How q and k scored in ``dtype`` are stored, without rounding: float16, float32 and float64 as they are,
    bfloat16 as its 16 bits in an int16 (numpy has no bfloat16; :func:`probe.analysis.lazy.maps_from_qk` reads them)."""
    stored = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
              torch.bfloat16: np.int16}
    if dtype not in stored:
        raise ValueError(f"a q/k store keeps float16, bfloat16, float32 or float64 q and k, not {dtype}")
    return np.dtype(stored[dtype])


def _tokens(pipe, prompt: str, keep_padding: bool, max_sequence_length: int | None) -> TextLayout:
    """The recorded tokens: texts, their positions among the denoiser's text keys, and their encoders."""
    return text_layout(pipe, prompt_fits(pipe, prompt), keep_padding, max_sequence_length)


def plan(pipe, prompts, *, seeds, settings: RecordSettings | None = None, height: int | None = None,
         width: int | None = None, max_sequence_length: int | None = None, **fields) -> Plan:
    """Validate a recording's request and describe it (no generation). ``settings`` (or its fields as keywords, see
    :class:`~probe.record.config.RecordSettings`): what is recorded. Each (prompt, seed) sample is recorded once, so a
    repeated prompt or seed is refused."""
    s = RecordSettings.only(fields, settings, "plan")
    kinds, layers, heads, keep_steps = s.kinds, s.layers, s.heads, s.keep_steps
    keep_padding, self_keys, self_queries, self_store = s.keep_padding, s.self_keys, s.self_queries, s.self_store
    pipe = load(pipe)
    text_to_image(pipe)
    steps = generation(pipe, s.steps, s.guidance_scale, caller="plan").steps  # the steps record will run
    heads = head_choice(heads)
    kinds = checks.attention_kinds(kinds)
    _qk_possible(pipe, self_store)
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
    p = Plan(samples, tokens, positions, max(map(len, tokens)), groups, kept, heads, (lh * scale, lw * scale),
             encoders, self_keys, self_queries)
    if self_store == "qk":
        text = max(_text_keys(pipe, prompt, max_sequence_length) for prompt in prompts)
        _qk_store(pipe, p, text, self_keys, self_queries)
    return p


def _qk_possible(pipe, self_store: str) -> None:
    """Refuse a q/k store where there is no softmax to rebuild (Sana's linear self-attention), before anything else
    is said about the kinds."""
    if self_store not in ("maps", "qk"):
        raise ValueError(f"self_store must be 'maps' or 'qk', got {self_store!r}")
    family = family_of(denoiser(pipe))
    reason = family.unmapped(denoiser(pipe)).get("self")
    if self_store == "qk" and reason:
        raise ValueError(f"self_store='qk' keeps the q and k a softmax scores, to make its maps on read; on "
                         f"{family.title} {reason}, so there is none to keep: record the other kinds' maps "
                         "(self_store='maps', kinds=('cross',))")


def _text_keys(pipe, prompt: str, max_sequence_length: int | None) -> int:
    """How many text keys the denoiser's softmax holds for ``prompt``: each text part's positions as the pipeline
    pads them (SD3: CLIP's 77 and T5's ``max_sequence_length``; FLUX: T5's; Qwen-Image: the prompt's own)."""
    parts = family_of(denoiser(pipe)).text_parts(pipe, max_sequence_length)
    return sum(len(tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids)
               for _, tok, length in parts)


def _qk_store(pipe, p: Plan, text_keys: int, self_keys, self_queries) -> None:
    """``self_store="qk"``: each self group's (heads, head dim), each layer's score scale and how q and k are stored,
    set on ``p``. A UNet's self-attention is its own softmax over the image keys, so its q and k are kept on the image
    grid; a joint softmax (SD3, FLUX …) normalises over the text keys too, so q and k are kept for every token, image
    first then ``text_keys`` text, with the keys each sample's softmax used."""
    net = denoiser(pipe)
    if self_keys is not None or self_queries is not None:
        raise ValueError("self_store='qk' keeps every query and key (maps are made on read); drop self_keys / "
                         "self_queries, or record maps")
    qk, scales = {}, {}
    for group, layers in p.groups.items():
        if layers[0].kind != "self":
            continue
        shapes = set()
        for layer in layers:
            module = net.get_submodule(layer.name)
            dim = getattr(module, "head_dim", None) or module.to_q.out_features // module.heads
            shapes.add((module.heads, dim))
            scales[layer.name] = float(getattr(module, "scale", None) or dim**-0.5)
        if len(shapes) > 1:
            raise ValueError(f"the layers of {group} have different head shapes {sorted(shapes)}; record them apart")
        qk[group] = shapes.pop()
    if not qk:
        raise ValueError("self_store='qk' needs self-attention layers among the recorded kinds")
    p.qk, p.qk_scale, p.qk_dtype = qk, scales, qk_storage(net.dtype).name
    family = family_of(net)
    p.qk_text = None if family.self_qk else text_keys
    p.qk_text_layers = frozenset(name for name, kinds in family.modules(net).items() if "cross" in kinds)


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




def qk_size_markdown(sizes: dict | None = None) -> str:
    """:func:`qk_size_table` as the README's Markdown table (pandas' own needs the optional ``tabulate``):
    ``python -c "from probe.record import qk_size_markdown; print(qk_size_markdown())"``."""
    frame = qk_size_table(sizes).reset_index()
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
