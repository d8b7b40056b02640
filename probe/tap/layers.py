"""The attention layers of a denoiser, as the tap and its consumers name them, and the family that lays them out.

A *layer* is one (module, kind) pair: a UNet ``attn1`` module is one ``self`` layer and an ``attn2`` module one
``cross`` layer; a joint-attention module of SD3 or FLUX (one softmax over image and text keys) is both a
``cross`` layer (image queries on the text keys) and a ``self`` layer (image queries on the image keys), under the
module's own name. A :class:`Family` knows, for its kind of denoiser, which modules hold which kinds, their query
grids, and where the image and text tokens sit in each softmax.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

KINDS = ("cross", "self", "text_image", "text_text")
"""What a layer's probabilities relate: ``cross`` image queries on text keys, ``self`` image queries on image keys;
on joint-attention transformers (SD3, FLUX) also ``text_image`` (text queries on image keys) and ``text_text``
(text queries on text keys), all blocks of one softmax."""
TEXT_QUERIES = ("text_image", "text_text")  # the kinds whose queries are text tokens
IMAGE_KEYS = ("self", "text_image")  # the kinds whose keys are image tokens


@dataclass(frozen=True)
class Layer:
    """One attention layer of the denoiser, as the tap sees it."""

    name: str  # module name in the denoiser, e.g. up_blocks.1.attentions.0.transformer_blocks.0.attn2
    kind: str  # "self" or "cross"
    grid: tuple[int, int]  # query grid (h, w) of the image tokens for the latent size it was described for
    heads: int

    @property
    def key(self) -> tuple[str, str]:
        """Unique per layer: a joint module is two layers with one name."""
        return self.name, self.kind

    @property
    def block(self) -> str:
        return self.name.split(".")[0].removesuffix("_blocks").removesuffix("_block")

    @property
    def group(self) -> str:
        """The recording group: ``cross/res16`` (``res16x24`` for non-square grids)."""
        h, w = self.grid  # of the image tokens (the keys of text_image)
        return f"{self.kind}/res{h}" if h == w else f"{self.kind}/res{h}x{w}"


@dataclass(frozen=True)
class Split:
    """Where image and text tokens sit in one softmax: the rows of image (and text) queries and the key columns of
    each."""

    image_queries: slice
    image_keys: slice | None
    text_keys: slice | None
    text_queries: slice | None = None  # joint attention only: text tokens query too

    def block(self, kind: str) -> tuple[slice | None, slice | None]:
        """(query rows, key columns) of a kind's block (None where this softmax has no such tokens)."""
        rows = self.text_queries if kind in TEXT_QUERIES else self.image_queries
        return rows, self.image_keys if kind in IMAGE_KEYS else self.text_keys

    def view(self, probs: torch.Tensor, kind: str) -> torch.Tensor | None:
        """The ``kind`` block (see :data:`KINDS`) of (batch, heads, queries, keys)."""
        rows, keys = self.block(kind)
        return None if rows is None or keys is None else probs[..., rows, keys]

    def write(self, probs: torch.Tensor, kind: str, block: torch.Tensor) -> torch.Tensor:
        """``probs`` with the ``kind`` block replaced (a copy, never in place)."""
        rows, keys = self.block(kind)
        if (rows, keys) == (slice(None), slice(None)):
            return block
        out = probs.clone()
        out[..., rows, keys] = block
        return out


class Family:
    """How one kind of denoiser lays out its attention. Subclasses: UNet, SD3 joint, FLUX."""

    name = ""

    def matches(self, net) -> bool:
        raise NotImplementedError

    def modules(self, net) -> dict[str, tuple[str, ...]]:
        """Every attention module of ``net`` → the kinds it holds (an unknown module is an error)."""
        raise NotImplementedError

    def latent(self, pipe) -> tuple[int, int]:
        """The pipeline's default latent size (h, w) in latent pixels."""
        raise NotImplementedError

    def grid(self, net, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Query grid of the image tokens of module ``name`` at a latent size."""
        raise NotImplementedError

    def pixel_multiple(self, pipe) -> int:
        """What an image side must be a multiple of (autoencoder scale × the UNet's downsamplings or a
        transformer's patches, and whatever the pipeline itself checks)."""
        raise NotImplementedError

    def observe(self, net, args: tuple, kwargs: dict, state) -> None:
        """Read what a call of the denoiser tells about token counts and grids (before it runs)."""

    def split(self, attn, hidden_states: torch.Tensor, encoder_hidden_states, state) -> Split:
        """Where the image and text tokens of this call's softmax sit."""
        raise NotImplementedError

    def runtime_grid(self, layer: Layer, hidden_states: torch.Tensor, state) -> tuple[int, int]:
        """The query grid at the size actually being generated."""
        return layer.grid


def families() -> list[Family]:
    from probe.tap.flux import Flux
    from probe.tap.joint import Joint
    from probe.tap.unet import UNet

    return [UNet(), Joint(), Flux()]


def denoiser(pipe):
    """The pipeline's denoising network (UNet, or transformer where the pipeline has one)."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to tap")
    return net


def family_of(net) -> Family:
    for family in families():
        if family.matches(net):
            return family
    names = ", ".join(type(f).__name__ for f in families())
    raise TypeError(f"the tap knows the attention of {names} denoisers, not {type(net).__name__}: its attention "
                    "layout (which keys are image and which are text) would have to be described first")


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Latent (h, w) for a pixel size (defaults: the pipeline's own)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    family = family_of(denoiser(pipe))
    step = family.pixel_multiple(pipe)
    for name, side in (("height", height), ("width", width)):
        if side is not None and (side <= 0 or side % step):
            near = max(step, round(side / step) * step)
            raise ValueError(f"{name}={side} px: this model generates sizes that are multiples of {step} px "
                             f"(autoencoder, {family.name} and pipeline together); use {name}={near}")
    dh, dw = family.latent(pipe)
    return (height // scale if height else dh), (width // scale if width else dw)


def attention_layers(pipe, height: int | None = None, width: int | None = None) -> list[Layer]:
    """Every attention layer of the denoiser, with its kind and query grid at this size."""
    net = denoiser(pipe)
    family = family_of(net)
    latent = latent_size(pipe, height, width)
    layers = []
    for name, kinds in family.modules(net).items():
        module = net.get_submodule(name)
        grid = family.grid(net, name, latent)
        layers += [Layer(name, kind, grid, module.heads) for kind in kinds]
    if not layers:
        raise TypeError(f"{type(net).__name__} has no attention modules for the tap to use")
    return layers


def select_layers(layers: list[Layer], patterns=None, kinds=KINDS) -> list[Layer]:
    """Layers of the given kinds matching any pattern: a full module name, a glob (``up_blocks.*``),
    a regular expression (``re:...``) or a resolution (``16`` = every 16×16 layer)."""
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown attention kinds {sorted(bad)}; expected some of {KINDS}")
    chosen = [layer for layer in layers if layer.kind in kinds]
    if patterns is None:
        return chosen
    if isinstance(patterns, (str, int)):
        patterns = [patterns]
    keep: set[tuple[str, str]] = set()
    for pattern in patterns:
        hits = {layer.key for layer in chosen if _matches(layer, pattern)}
        if not hits:
            grids = sorted({layer.grid[0] for layer in layers})
            names = sorted({layer.name for layer in layers if layer.kind in kinds})
            raise ValueError(
                f"layer pattern {pattern!r} matches no {'/'.join(kinds)} attention layer. "
                f"Resolutions: {grids}; names like {names[0]!r} … {names[-1]!r} ({len(names)} in all)."
            )
        keep |= hits
    return [layer for layer in chosen if layer.key in keep]


def _matches(layer: Layer, pattern) -> bool:
    if isinstance(pattern, int) or (isinstance(pattern, str) and pattern.isdigit()):
        return layer.grid[0] == int(pattern) or layer.grid[1] == int(pattern)
    if pattern.startswith("re:"):
        return re.search(pattern[3:], layer.name) is not None
    return fnmatch.fnmatchcase(layer.name, pattern)


def attention_modules(net) -> dict[str, torch.nn.Module]:
    """Every module of ``net`` that holds an attention processor (diffusers' ``Attention`` and
    ``AttentionModuleMixin`` modules alike)."""
    return {name: m for name, m in net.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def unknown_modules(net, known: set[str]) -> str:
    """A report of attention modules outside ``known``: name and processor class, for an error message."""
    rest = [f"{n} ({type(m.processor).__name__})" for n, m in attention_modules(net).items() if n not in known]
    return ", ".join(rest[:8]) + (f" and {len(rest) - 8} more" if len(rest) > 8 else "")
