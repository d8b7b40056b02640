"""The terms a family describes its attention in, and the tap works in: layers, the token split of one softmax, the
attention modules of a denoiser, and the error raised where the two cannot meet. Nothing here knows a family.

A *layer* is one (module, kind) pair: a UNet ``attn1`` module is one ``self`` layer and an ``attn2`` module one
``cross`` layer; a joint-attention module of SD3 or FLUX (one softmax over image and text keys) is both a
``cross`` layer (image queries on the text keys) and a ``self`` layer (image queries on the image keys), under the
module's own name.
"""

from __future__ import annotations

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


class TapError(RuntimeError):
    """The tap cannot give a consumer what it asked for (an unknown processor, an unplaced call)."""


def denoiser(pipe):
    """The pipeline's denoising network (UNet, or transformer where the pipeline has one)."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to tap")
    return net


def attention_modules(net) -> dict[str, torch.nn.Module]:
    """Every module of ``net`` that holds an attention processor (diffusers' ``Attention`` and
    ``AttentionModuleMixin`` modules alike)."""
    return {name: m for name, m in net.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def unknown_modules(net, known: set[str]) -> str:
    """A report of attention modules outside ``known``: name and processor class, for an error message."""
    rest = [f"{n} ({type(m.processor).__name__})" for n, m in attention_modules(net).items() if n not in known]
    return ", ".join(rest[:8]) + (f" and {len(rest) - 8} more" if len(rest) > 8 else "")


Kinds = dict[str, tuple[str, ...]]  # attention module name → the kinds it holds


def every_module(net, found: Kinds, family: str, hint: str = "") -> Kinds:
    """A family's map of ``net``'s attention modules (name → kinds), checked to hold every one: a module it does not
    know would be left untapped, so a recording would silently lack it (``hint``: a likely cause, for the error)."""
    if len(found) != len(attention_modules(net)):
        raise TypeError(f"attention modules the {family} family does not know{hint}: "
                        f"{unknown_modules(net, set(found))}")
    return found
