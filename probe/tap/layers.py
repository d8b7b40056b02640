"""The attention layers of a pipeline at a size, as the tap and its consumers name them, and choosing among them.
Each family (:mod:`probe.families`) says which modules hold which kinds and their query grids."""

from __future__ import annotations

import fnmatch
import re

from probe.families import Family, family_of
from probe.families.layout import (
    IMAGE_KEYS,
    KINDS,
    TEXT_QUERIES,
    Layer,
    Split,
    attention_modules,
    denoiser,
    unknown_modules,
)

__all__ = ["IMAGE_KEYS", "KINDS", "TEXT_QUERIES", "Family", "Layer", "Split", "attention_layers", "attention_modules",
           "denoiser", "family_of", "latent_size", "refuse_unmapped", "select_layers", "unknown_modules"]


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


def refuse_unmapped(pipe, kinds, instead: str) -> None:
    """Refuse asking for maps of a kind the denoiser computes without a softmax (it has none to give), with the
    family's reason and ``instead``: what the caller can do."""
    net = denoiser(pipe)
    family = family_of(net)
    reasons = family.unmapped(net)
    for kind in kinds:
        if kind in reasons:
            raise ValueError(f"{kind}-attention maps were asked for, but on {family.title} {reasons[kind]}; {instead}")


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
