"""Subjects' attention maps, made in one place: a subject word → its text tokens → its map.

Guidance (live cross-attention inside the autograd graph), the studies, the out-of-core analysis
(:mod:`probe.analysis.lazy`),
the lab and the explorer all call these functions, so a subject's map means the same thing wherever it is read.
Three rules, each written once:

- **A word's tokens.** Every copy of the word among the denoiser's text keys (SD3: CLIP's and T5's; UNets and FLUX
  have one copy), all its word pieces: :func:`probe.prompts.recorded_subject_tokens` on a recording's token texts
  (:func:`word_tokens`), :func:`probe.prompts.subject_keys` on a live pipeline, which applies the same rule to the
  pipeline's text layout. A word listed as often as it occurs takes successive occurrences, ``cat#2`` names one, a
  word that occurs more often than it is listed is an error. A phrase ("red circle") is the union of its words.
- **A subject's map.** The mean of its tokens' columns of cross-attention (..., H, W, T), after whatever mean over
  layers, heads and steps the caller chose (:func:`probe.analysis.maps.token_map`).
- **Attend-and-Excite's view.** softmax(temperature · A) over the prompt's *word* tokens only, with no start, end
  or padding token, as A&E's official code does (:func:`probe.prompts.word_positions`; on a recording
  :func:`probe.prompts.recorded_words`, see :func:`softmax_tokens`); then each subject's mean over its tokens, then
  A&E's 3×3 Gaussian smoothing. Diffusers' pipeline softmaxes over every slot but the first and the last instead
  (padding included): :func:`diffusers_softmax_tokens`, which guidance offers as ``Schedule(tokens="diffusers")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import xarray as xr

from probe.analysis.maps import (
    AE_KERNEL_SIZE,
    AE_SIGMA,
    AE_TEMPERATURE,
    gaussian_smooth,
    recorded_text,
    token_map,
    token_softmax,
)
from probe.prompts import recorded_subject_tokens, recorded_words

View = Literal["maps", "ae"]
VIEWS = ("maps", "ae")
REDUCED = ("layer", "head")  # a recording's dims averaged before maps are made (A&E: over layers and heads)


# -- maps from a cross-attention tensor ------------------------------------------------------------------------------


def subject_maps(cross: torch.Tensor | np.ndarray, tokens: Sequence[Sequence[int]], words: Sequence[int] | None = None,
                 *, view: View = "maps", temperature: float = AE_TEMPERATURE, kernel_size: int = AE_KERNEL_SIZE,
                 sigma: float = AE_SIGMA) -> torch.Tensor | np.ndarray:
    """Each subject's map (..., S, H, W) from cross-attention (..., H, W, T): the one computation every reader uses.

    ``tokens``: each subject's token positions in T (:func:`word_tokens`, :func:`probe.prompts.subject_keys`).
    ``view="maps"``: the mean of the subject's columns. ``view="ae"``: Attend-and-Excite's, softmax(temperature · A)
    over ``words`` (the prompt's word tokens, :func:`softmax_tokens`), the subject's mean, Gaussian smoothing.
    A torch tensor gives a tensor (differentiable, same dtype and device, as guidance needs); a numpy array gives
    float32 numpy.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    as_numpy = not isinstance(cross, torch.Tensor)
    x = torch.from_numpy(np.asarray(cross, np.float32)) if as_numpy else cross
    if not tokens:
        out = x.new_zeros((*x.shape[:-3], 0, *x.shape[-3:-1]))
        return out.numpy() if as_numpy else out
    if any(not list(ix) for ix in tokens):
        raise ValueError(f"every subject needs at least one token; got {[list(ix) for ix in tokens]}")
    if view == "ae":
        if words is None or not list(words):
            raise ValueError("the A&E view softmaxes over the prompt's word tokens: give words= (softmax_tokens or "
                             "subject_keys' second value)")
        x = token_softmax(x, temperature, keep=list(words))
    out = torch.stack([token_map(x, list(ix)) for ix in tokens], dim=-3)
    if view == "ae":
        out = gaussian_smooth(out, kernel_size, sigma)
    return out.numpy() if as_numpy else out


def diffusers_softmax_tokens(n_tokens: int) -> list[int]:
    """The slots diffusers' ``StableDiffusionAttendAndExcitePipeline`` softmaxes over: all but the first and the last
    (``attention_maps[:, :, 1:-1]``, padding included). Not the rule (see the module docstring): an option of
    guidance, to reproduce that pipeline."""
    return list(range(1, n_tokens - 1))


# -- words → tokens --------------------------------------------------------------------------------------------------


def word_tokens(tokens: Sequence[str], subjects: Sequence[str], encoders: Sequence[str] | None = None,
                prompt: str | None = None) -> list[list[int]]:
    """Each subject's token indices among one sample's token texts (empty for padding), by the one rule of the module
    docstring (:func:`probe.prompts.recorded_subject_tokens`). A subject may be a phrase: its words are placed
    together with the other subjects' words (so "red circle" and "red square" take the two "red"s in turn) and the
    phrase's tokens are the union of its words'. ``encoders``: each token's encoder (SD3), or None."""
    texts = [str(t) for t in tokens]
    prompt = prompt if prompt is not None else " ".join(t for t in texts if t)
    parts = [str(s).split() or [str(s)] for s in subjects]
    placed = recorded_subject_tokens(texts, encoders, [w for part in parts for w in part], prompt)
    found, k = [], 0
    for part in parts:
        found.append(list(dict.fromkeys(i for run in placed[k:k + len(part)] for i in run)))
        k += len(part)
    return found


def softmax_tokens(tokens: Sequence[str]) -> list[int]:
    """The indices among one sample's token texts that A&E's softmax runs over: the prompt's words, no start, end or
    padding token, in every encoder's copy (:func:`probe.prompts.recorded_words`; live: :func:`word_positions`)."""
    return [i for i, is_word in enumerate(recorded_words([str(t) for t in tokens])) if is_word]


def sample_tokens(one: xr.Dataset, subjects: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """The subjects' tokens and the softmax's tokens of one sample of a recorded group (a Dataset with
    ``token_text`` and, on SD3, ``encoder``; reads coordinates only)."""
    texts, encoders, prompt = recorded_text(one)
    return word_tokens(texts, subjects, encoders, prompt), softmax_tokens(texts)


# -- maps from a recording -------------------------------------------------------------------------------------------


def layer_mean(attn: xr.DataArray) -> xr.DataArray:
    """A recorded ``attn`` in float32, averaged over its layers and heads (where recorded): what a subject's map is
    made from, as A&E averages its 16×16 layers and their heads."""
    attn = attn.astype(np.float32)
    reduced = [d for d in REDUCED if d in attn.dims]
    return attn.mean(reduced, skipna=False) if reduced else attn  # NaN padding stays NaN


def recorded_subject_maps(group, sample: int, subjects: Sequence[str], *, view: View = "maps",
                          step: int | Sequence[int] | None = None) -> xr.DataArray:
    """One sample's subject maps (step, subject, y, x) from a recorded cross-attention group (in memory or lazy: only
    that sample, and the chosen steps, are read), layers and heads averaged, by :func:`subject_maps`.

    ``step``: a step coordinate or a list of them (default every recorded step)."""
    ds = group.to_dataset() if hasattr(group, "to_dataset") else group
    one = ds.isel(sample=sample)
    if step is not None:
        one = one.sel(step=[step] if np.isscalar(step) else list(step))
    tokens, words = sample_tokens(one, subjects)
    attn = layer_mean(one["attn"]).transpose("step", "y", "x", "token")
    maps = subject_maps(np.asarray(attn.values), tokens, words, view=view)
    coords = {"step": one["step"].values, "subject": [str(s) for s in subjects]}
    if "timestep" in one.coords:
        coords["timestep"] = ("step", one["timestep"].values)
    return xr.DataArray(maps, dims=("step", "subject", "y", "x"), coords=coords, name=f"subject_{view}")
