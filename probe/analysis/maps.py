"""Building spatial attention maps from raw attention tensors.

Pure, batched torch functions (tensors in, tensors out). They are the single implementation used both as
differentiable losses during guidance and for analysis of recorded attention, so they keep the input's dtype and
device and never detach, except where stated (Otsu masks).

Conventions:
    map:             (..., H, W), any leading dims, preserved.
    cross-attention: (..., H, W, T) over T text tokens.
    self-attention:  (..., H, W, H*W) or (..., H, W, H, W): query pixel first, keys flattened or as a grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

EPS = 1e-6
"""Floor for denominators; representable in float16 and small next to any real attention mass."""

AE_TEMPERATURE = 100.0
"""Attend-and-Excite multiplies cross-attention by 100 before the softmax over text tokens."""

AE_KERNEL_SIZE = 3
AE_SIGMA = 0.5
"""Attend-and-Excite's Gaussian smoothing (diffusers ``GaussianSmoothing`` defaults)."""

OTSU_BINS = 256
"""Histogram bins for Otsu's method, as for 8-bit images."""

SPATIAL_DIMS = (-2, -1)

Norm = Literal["max", "sum", "minmax", "none"]


def normalize(maps: torch.Tensor, kind: Norm = "max", eps: float = EPS) -> torch.Tensor:
    """Rescale each (H, W) map so maps of different tokens, layers and steps are comparable.

    ``max``: m / max(m) (peak 1); ``sum``: m / Σm (a distribution over pixels); ``minmax``: (m - min) / (max - min)
    (background 0, peak 1); ``none``: unchanged. Denominators are floored at ``eps`` so empty maps stay finite.
    """
    if kind == "none":
        return maps
    if kind == "max":
        return maps / maps.amax(SPATIAL_DIMS, keepdim=True).clamp_min(eps)
    if kind == "sum":
        return maps / maps.sum(SPATIAL_DIMS, keepdim=True).clamp_min(eps)
    if kind == "minmax":
        lo = maps.amin(SPATIAL_DIMS, keepdim=True)
        return (maps - lo) / (maps.amax(SPATIAL_DIMS, keepdim=True) - lo).clamp_min(eps)
    raise ValueError(f"unknown normalisation {kind!r}")


def token_map(cross: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """A subject's map when its word is split into several word pieces: mean over ``indices`` of (..., H, W, T)."""
    return cross[..., list(indices)].mean(-1)


def token_softmax(
    cross: torch.Tensor, temperature: float = AE_TEMPERATURE, drop_first: bool = True, last: int | None = None,
    keep: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attend-and-Excite's sharpened softmax over text tokens, keeping the original token indices.

    ``keep``: the token positions the softmax runs over (the official A&E: the prompt's words, see
    :func:`probe.prompts.word_positions`); every other token gets 0. Without it:
    The start token (index 0, if ``drop_first``) and every token from index ``last`` on (end token, padding) are
    dropped; the rest get softmax(temperature · A) over tokens. ``last=None`` drops only the final slot, as diffusers'
    A&E (``attention_maps[:, :, 1:-1]``). The result has the input's T with dropped tokens set to 0, so token ``i`` is
    still at index ``i`` (A&E instead shifts indices by one).
    """
    n_tokens = cross.shape[-1]
    if keep is not None:
        index = torch.as_tensor(list(keep), device=cross.device, dtype=torch.long)
        kept = torch.softmax(temperature * cross.index_select(-1, index), dim=-1)
        return torch.zeros_like(cross).index_copy(-1, index, kept)
    start = 1 if drop_first else 0
    stop = n_tokens - 1 if last is None else (last % n_tokens if last < 0 else min(last, n_tokens))
    kept = torch.softmax(temperature * cross[..., start:stop], dim=-1)
    return F.pad(kept, (start, n_tokens - stop))


def _flat_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """(..., H, W) → (N, H, W) and the leading shape to restore it."""
    return maps.reshape(-1, *maps.shape[-2:]), maps.shape[:-2]


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """diffusers A&E 1-D kernel: exp(-((x - mean) / (2σ))²) normalised to sum 1 (note 2σ, not √2σ)."""
    x = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2
    kernel = torch.exp(-((x / (2 * sigma)) ** 2))
    return kernel / kernel.sum()


def gaussian_smooth(maps: torch.Tensor, kernel_size: int = AE_KERNEL_SIZE, sigma: float = AE_SIGMA) -> torch.Tensor:
    """Smooth each map like Attend-and-Excite before taking its max, so one hot pixel cannot satisfy the loss.

    Separable product of :func:`gaussian_kernel1d` (identical to diffusers' normalised 2-D product kernel), with
    reflect padding of ``kernel_size // 2``. Written as shifted sums so it runs in any dtype on any device.
    """
    flat, lead = _flat_maps(maps)
    pad = kernel_size // 2
    height, width = flat.shape[-2:]
    kernel = gaussian_kernel1d(kernel_size, sigma, maps.dtype, maps.device)
    padded = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    rows = sum(kernel[i] * padded[:, i : i + height, :] for i in range(kernel_size))
    out = sum(kernel[i] * rows[:, :, i : i + width] for i in range(kernel_size))
    return out.reshape(*lead, height, width)


def resize(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resample (..., H, W) maps to ``size`` so maps from layers of different resolution can be combined."""
    flat, lead = _flat_maps(maps)
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(flat[:, None], size=size, mode=mode, align_corners=align)[:, 0]
    return out.reshape(*lead, *out.shape[-2:])


def _otsu(maps: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-map Otsu threshold (..., ) in at least float32, computed without gradients."""
    work = maps.detach().to(torch.promote_types(maps.dtype, torch.float32))
    flat = work.reshape(-1, maps.shape[-2] * maps.shape[-1])
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    unit = (flat - lo) / (hi - lo).clamp_min(torch.finfo(work.dtype).tiny)
    index = (unit * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(flat.shape[0], bins, dtype=work.dtype, device=work.device)
    counts.scatter_add_(1, index, torch.ones_like(unit))
    prob = counts / flat.shape[-1]
    centres = (torch.arange(bins, dtype=work.dtype, device=work.device) + 0.5) / bins
    omega = prob.cumsum(-1)  # weight of the low class when the split is after bin k
    mu = (prob * centres).cumsum(-1)
    denom = omega * (1 - omega)
    between = torch.where(denom > 0, (mu[:, -1:] * omega - mu) ** 2 / denom.clamp_min(torch.finfo(work.dtype).tiny), 0)
    best = between.argmax(-1, keepdim=True)
    # Splits across empty bins tie; put the threshold midway through the gap to the next non-empty bin.
    bin_ids = torch.arange(bins, device=work.device).expand_as(counts)
    next_full = torch.where((counts > 0) & (bin_ids > best), bin_ids, bins).amin(-1, keepdim=True)
    threshold = lo + (best + 1 + next_full).to(work.dtype) / (2 * bins) * (hi - lo)
    return threshold.reshape(maps.shape[:-2])


def otsu_threshold(maps: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Per-map Otsu threshold (..., ) in the maps' units: the split that maximises between-class variance.

    The histogram is taken over the min-max normalised map; where several splits tie (empty bins between the
    classes) the threshold lies midway through the gap. Not differentiable (the result is detached).
    """
    return _otsu(maps, bins).to(maps.dtype)


def otsu_mask(maps: torch.Tensor, bins: int = OTSU_BINS) -> torch.Tensor:
    """Bool foreground mask (..., H, W): pixels above the map's Otsu threshold. Not differentiable.

    A constant map has an empty mask.
    """
    threshold = _otsu(maps, bins)
    return maps.detach().to(threshold.dtype) > threshold[..., None, None]


def flatten_keys(self_attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Self-attention (..., H, W, H*W) or (..., H, W, H, W) → (..., H*W queries, H*W keys)."""
    n_pixels = height * width
    if self_attn.shape[-3:] == (height, width, n_pixels):
        return self_attn.reshape(*self_attn.shape[:-3], n_pixels, n_pixels)
    if self_attn.dim() >= 4 and self_attn.shape[-4:] == (height, width, height, width):
        return self_attn.reshape(*self_attn.shape[:-4], n_pixels, n_pixels)
    raise ValueError(f"self-attention shape {tuple(self_attn.shape)} does not match a {height}x{width} map")


def aggregate_self_attention(
    cross_map: torch.Tensor, self_attn: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """Self-Cross aggregation: the region the whole subject attends to, not just its most salient patch.

    A^s[q] = Σ_{p∈M} A^c[p] · S[p, q] / Σ_{p∈M} A^c[p], with A^c the subject's cross-attention map (..., H, W),
    S[p, ·] the self-attention of query pixel p, and M = otsu_mask(A^c) unless ``mask`` (bool (..., H, W)) is given.
    Returns (..., H, W); differentiable in both inputs for a fixed mask. Leading dims broadcast.
    """
    height, width = cross_map.shape[-2:]
    keys = flatten_keys(self_attn, height, width)
    if mask is None:
        mask = otsu_mask(cross_map)
    weights = (cross_map * mask).flatten(-2)
    out = (weights.unsqueeze(-2) @ keys).squeeze(-2) / weights.sum(-1, keepdim=True).clamp_min(eps)
    return out.reshape(*out.shape[:-1], height, width)


# -- thin xarray wrappers for recorded data ----------------------------------------------------------------------


def word_map(cross, sample: int, word: str):
    """A word's cross-attention map in a recorded group, ``attn`` (step, layer, [head], y, x) of one sample.

    ``cross`` is a recording group (``tree["cross/res16"]``). The word's tokens are those
    :func:`probe.prompts.recorded_subject_tokens` gives: every copy of the word (SD3: CLIP's and T5's), its word
    pieces averaged with :func:`token_map`; ``"cat#2"`` is the second "cat" of the prompt.
    """
    import xarray as xr

    ds = cross.to_dataset() if hasattr(cross, "to_dataset") else cross
    one = ds.isel(sample=sample)
    indices = recorded_word_tokens(one, [word])[0]
    attn = one["attn"]
    values = token_map(torch.from_numpy(attn.values.astype("float32")), indices)
    dims = [d for d in attn.dims if d != "token"]
    coords = {k: v for k, v in attn.coords.items() if "token" not in v.dims}
    return xr.DataArray(values.numpy(), dims=dims, coords=coords, name=word)


def recorded_text(one) -> tuple[list[str], list[str] | None, str]:
    """One recorded sample's token texts (empty for padding), their encoders (SD3: "clip" / "t5"; else None) and
    its prompt, from a group's coordinates: what a word's tokens are found in."""
    texts = [str(t) for t in one["token_text"].values]
    encoders = [str(e) for e in one["encoder"].values] if "encoder" in one.coords else None
    prompt = str(one["prompt"].values) if "prompt" in one.coords else " ".join(t for t in texts if t)
    return texts, encoders, prompt


def recorded_word_tokens(one, words: Sequence[str]) -> list[list[int]]:
    """Token indices of each word in one sample of a recorded group (a Dataset with ``token_text`` and, on SD3,
    ``encoder``), by :func:`probe.prompts.recorded_subject_tokens`: what every map made from a recording reads
    (:mod:`probe.analysis.subjects` reads a recording's words by the same rule)."""
    from probe.prompts import recorded_subject_tokens

    texts, encoders, prompt = recorded_text(one)
    return recorded_subject_tokens(texts, encoders, words, prompt)


def recorded_step(steps: Sequence[int], step: int) -> int:
    """The step coordinate that ``step`` names among a recording's ``steps``: a recorded step, or a position from
    the end when negative (-1: the last), so that a step that was not recorded is refused with the ones that were
    (xarray's own error is a bare KeyError)."""
    steps = [int(s) for s in steps]
    if not steps:
        raise ValueError("this recording holds no steps; record it again")
    if step < 0 and -len(steps) <= step:
        return steps[step]
    if step >= 0 and step in steps:
        return step
    shown = f"{steps}" if len(steps) <= 12 else f"[{steps[0]}, {steps[1]}, …, {steps[-1]}] ({len(steps)} steps)"
    raise ValueError(f"step {step} was not recorded; the recorded steps are {shown} (or -1 … -{len(steps)} from the "
                     "last): give one of them")
