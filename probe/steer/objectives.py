"""Guidance objectives: each a loss of the subjects' maps (:class:`GuidanceMaps`), one function each and one entry in
:data:`OBJECTIVES`, the registry :func:`probe.steer.guide.generate`, the guidance study and sweeps read by name.
A weighted sum (``{"ae": 1, "iou": 1}``) or any callable of the maps is an objective too (:func:`as_objective`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from probe import checks
from probe.analysis.maps import aggregate_self_attention
from probe.analysis.overlap import (
    ae_loss,
    aggregation_loss,
    com_distance,
    compactness,
    isolation_loss,
    kl_divergence,
    pairwise,
    self_cross_overlap,
    soft_iou,
)

if TYPE_CHECKING:
    from probe.steer.guide import Schedule


@dataclass
class GuidanceMaps:
    """What an objective sees: the subjects' maps at one latent, batch first.

    ``subjects`` (B, S, H, W): per subject, softmax(temperature·A) over the prompt's word tokens, mean over the
    subject's word pieces, Gaussian smoothed (A&E's maps, :func:`probe.analysis.subjects.subject_maps`).
    ``cross`` (B, H, W, T): the raw cross-attention, mean over layers and heads.
    ``self_attention`` (B, H·W, H·W): mean self-attention of the same layers' grid, when the objective needs it.
    """

    subjects: torch.Tensor
    cross: torch.Tensor
    self_attention: torch.Tensor | None
    schedule: Schedule

    @property
    def max_attention(self) -> torch.Tensor:
        """(B, S) peak of each subject's map: A&E's per-token excitation."""
        return self.subjects.amax((-2, -1))


def _pair_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
    values = pairwise(fn, maps)
    return values.sum(-1) / max(values.shape[-1], 1)


def response(maps: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The most neglected subject's 1 − (mean of its k largest values); k = 1 is Attend-and-Excite's loss."""
    if k == 1:
        return ae_loss(maps)
    top = maps.flatten(-2).topk(k, dim=-1).values.mean(-1)
    return (1 - top).clamp_min(0).amax(-1)


def _ae(m: GuidanceMaps) -> torch.Tensor:
    return ae_loss(m.subjects)


def _iou(m: GuidanceMaps) -> torch.Tensor:
    return _pair_mean(soft_iou, m.subjects)


def _com(m: GuidanceMaps) -> torch.Tensor:
    """1 − mean centre-of-mass distance (fraction of the diagonal): lower when the subjects sit apart."""
    return 1 - _pair_mean(com_distance, m.subjects)


def _kl(m: GuidanceMaps) -> torch.Tensor:
    """exp(−symmetric KL): 1 for identical maps, towards 0 as they separate."""
    return torch.exp(-_pair_mean(lambda a, b: kl_divergence(a, b, "sym"), m.subjects))


def _cc(m: GuidanceMaps) -> torch.Tensor:
    """c / (1 + c) of the clustering compactness c: bounded, lower for compact subjects far apart."""
    c = _pair_mean(compactness, m.subjects)
    return c / (1 + c)


def _self_cross(m: GuidanceMaps) -> torch.Tensor:
    """Self-Cross: overlap of each subject's Otsu-aggregated self-attention with the others' cross-attention
    (per pixel, so resolution free) plus λ · response."""
    if m.self_attention is None:
        raise RuntimeError("the self_cross objective needs self-attention maps; they were not collected")
    height, width = m.subjects.shape[-2:]
    keys = m.self_attention.reshape(-1, 1, height, width, height * width)
    aggregated = aggregate_self_attention(m.subjects, keys)
    overlap = self_cross_overlap(m.subjects, aggregated) / (height * width)
    s = m.schedule
    return overlap + s.response_weight * response(m.subjects, s.response_top_k)


def _ai_t2i(m: GuidanceMaps) -> torch.Tensor:
    """Aggregating-and-Isolating: pull each subject's fragments together, push subjects apart, keep them excited."""
    s = m.schedule
    aggregation = aggregation_loss(m.subjects).mean(-1)
    isolation = isolation_loss(m.subjects, margin=s.isolation_margin, form=s.isolation_form)
    return (s.aggregation_weight * aggregation + s.isolation_weight * isolation
            + s.response_weight * response(m.subjects, s.response_top_k))


@dataclass(frozen=True)
class Objective:
    """A named loss of :class:`GuidanceMaps` → (B,); ``needs_self`` asks the tap for self-attention too."""

    name: str
    fn: Callable[[GuidanceMaps], torch.Tensor]
    needs_self: bool = False

    def __call__(self, maps: GuidanceMaps) -> torch.Tensor:
        return self.fn(maps)


OBJECTIVES: dict[str, Objective] = {
    "ae": Objective("ae", _ae),
    "iou": Objective("iou", _iou),
    "com": Objective("com", _com),
    "kl": Objective("kl", _kl),
    "cc": Objective("cc", _cc),
    "self_cross": Objective("self_cross", _self_cross, needs_self=True),
    "ai_t2i": Objective("ai_t2i", _ai_t2i),
}

ObjectiveSpec = str | Mapping[str, float] | Objective | Callable[[GuidanceMaps], torch.Tensor]


def as_objective(spec: ObjectiveSpec) -> Objective:
    """An :class:`Objective` from a registry name, a weighted sum ``{"ae": 1, "iou": 1}`` (or ``"ae+iou"``, equal
    weights: a name a table's method column can hold) or a callable of the maps."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str) and "+" in spec:  # "ae+iou": the named terms summed with equal weights
        return as_objective(dict.fromkeys((part.strip() for part in spec.split("+")), 1.0))
    if isinstance(spec, str):
        if spec not in OBJECTIVES:
            raise ValueError(f"unknown objective {spec!r}; known: {sorted(OBJECTIVES)}, or a dict of weights")
        return OBJECTIVES[spec]
    if isinstance(spec, Mapping):
        parts = [(as_objective(name), checks.finite_number(weight, f"objective[{name!r}]", "the weight of that term"))
                 for name, weight in spec.items()]
        if not parts:
            raise ValueError("a weighted objective needs at least one term, e.g. {'ae': 1, 'iou': 1}")
        name = " + ".join(f"{w:g}·{o.name}" for o, w in parts)
        return Objective(name, lambda m: sum(w * o(m) for o, w in parts), any(o.needs_self for o, _ in parts))
    if callable(spec):
        return Objective(getattr(spec, "__name__", "custom"), spec, bool(getattr(spec, "needs_self", False)))
    raise TypeError(f"objective must be a name, a dict of weights or a callable, not {type(spec).__name__}")


def is_objective_name(name: str) -> bool:
    """Whether ``name`` is a registered objective or a "+"-joined sum of them (``"ae+iou"``)."""
    return all(part.strip() in OBJECTIVES for part in name.split("+"))
