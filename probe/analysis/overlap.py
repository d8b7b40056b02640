"""How subjects' attention maps overlap, where they sit and how concentrated they are.

Pure, batched, differentiable torch functions: maps are non-negative (..., H, W), any leading dims preserved, and a
statistic of one or two maps returns (...,). Subjects are stacked on dim -3, (..., S, H, W); pair statistics run over
pairs i < j in :func:`pair_indices` order. The same functions serve as guidance losses on live tensors and as
measurements on recorded maps. Positions are (y, x) in pixels, row 0 / column 0 at the top left.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from probe.analysis.maps import EPS, SPATIAL_DIMS, Norm, normalize

PEAK_COUNT = 4
"""Peaks looked for per map by :func:`find_peaks`: the main one plus three fragments."""

PEAK_RADIUS = 2
"""Half-width (pixels, Chebyshev) of a peak's neighbourhood: suppression window, local-max window, centroid window."""

ISOLATION_MARGIN = 0.3
"""Centre distance (fraction of the diagonal) beyond which subjects are isolated; ~ left half vs right half."""

PairStat = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pair_indices(n_subjects: int) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, in the order used on the last dim of every pair statistic."""
    return list(itertools.combinations(range(n_subjects), 2))


def _pair_tensors(n_subjects: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = pair_indices(n_subjects)
    first = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
    second = torch.tensor([j for _, j in pairs], dtype=torch.long, device=device)
    return first, second


def pairwise(fn: PairStat, maps: torch.Tensor) -> torch.Tensor:
    """Apply a batched two-map statistic to every subject pair of (..., S, H, W) → (..., P), P = S(S-1)/2.

    ``fn`` is called once on (..., P, H, W) stacks; reduce the result with ``.mean(-1)`` or ``.amax(-1)``.
    """
    first, second = _pair_tensors(maps.shape[-3], maps.device)
    return fn(maps[..., first, :, :], maps[..., second, :, :])


def _mean_over_pairs(values: torch.Tensor) -> torch.Tensor:
    """Mean over the pair dim; 0 (not NaN) when there are no pairs, so one-subject prompts give zero loss."""
    return values.sum(-1) / max(values.shape[-1], 1)


def _grid(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (H, 1) rows and (1, W) columns in the maps' dtype and device."""
    height, width = maps.shape[-2:]
    ys = torch.arange(height, dtype=maps.dtype, device=maps.device)[:, None]
    xs = torch.arange(width, dtype=maps.dtype, device=maps.device)[None, :]
    return ys, xs


def _diagonal(maps: torch.Tensor) -> float:
    """Largest pixel distance in the map, sqrt((H-1)² + (W-1)²); 1 for a 1x1 map."""
    height, width = maps.shape[-2:]
    return max(math.hypot(height - 1, width - 1), 1.0)


def soft_iou(a: torch.Tensor, b: torch.Tensor, norm: Norm = "minmax", eps: float = EPS) -> torch.Tensor:
    """Soft intersection over union Σ min(a, b) / Σ max(a, b) of the maps after per-map ``norm``.

    Default min-max normalisation (as Marioriyad et al., "Attention overlap causes entity missing") puts each
    map's background at 0 and peak at 1, so a diffuse floor does not count as overlap and scale does not matter.
    1 for identical maps, 0 for disjoint supports.
    """
    a, b = normalize(a, norm, eps), normalize(b, norm, eps)
    return torch.minimum(a, b).sum(SPATIAL_DIMS) / torch.maximum(a, b).sum(SPATIAL_DIMS).clamp_min(eps)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine of the angle between the maps as vectors over pixels (AI-T2I's overlap measure): 1 for maps of the
    same shape whatever their scale, 0 for disjoint supports."""
    dot = (a * b).sum(SPATIAL_DIMS)
    norms = torch.linalg.vector_norm(a, dim=SPATIAL_DIMS) * torch.linalg.vector_norm(b, dim=SPATIAL_DIMS)
    return dot / norms.clamp_min(eps)


def center_of_mass(m: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Attention-weighted mean position (..., 2) as (y, x) in pixels."""
    p = normalize(m, "sum", eps)
    ys, xs = _grid(m)
    return torch.stack([(p * ys).sum(SPATIAL_DIMS), (p * xs).sum(SPATIAL_DIMS)], dim=-1)


def _center_gap(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean distance in pixels between the maps' centres of mass."""
    return torch.linalg.vector_norm(center_of_mass(a, eps) - center_of_mass(b, eps), dim=-1)


def com_distance(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Distance between centres of mass as a fraction of the diagonal sqrt((H-1)² + (W-1)²): 0 same, 1 corners."""
    return _center_gap(a, b, eps) / _diagonal(a)


def kl_divergence(
    a: torch.Tensor, b: torch.Tensor, direction: Literal["ab", "ba", "sym"] = "ab", eps: float = EPS
) -> torch.Tensor:
    """KL divergence between maps read as distributions over pixels (each normalised to sum 1).

    ``ab``: KL(a‖b) = Σ p log(p / q); ``ba``: KL(b‖a); ``sym``: their mean. ``eps`` inside the logs keeps empty
    pixels finite; identical maps give exactly 0.
    """
    p, q = normalize(a, "sum", eps), normalize(b, "sum", eps)

    def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * (torch.log(x + eps) - torch.log(y + eps))).sum(SPATIAL_DIMS)

    if direction == "ab":
        return kl(p, q)
    if direction == "ba":
        return kl(q, p)
    if direction == "sym":
        return (kl(p, q) + kl(q, p)) / 2
    raise ValueError(f"unknown direction {direction!r}")


def spread(m: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """How scattered a map is: Σ p · |pos - centre|², p the sum-normalised map (pixels², trace of covariance)."""
    p = normalize(m, "sum", eps)
    ys, xs = _grid(m)
    centre = center_of_mass(m, eps)
    dy = ys - centre[..., 0, None, None]
    dx = xs - centre[..., 1, None, None]
    return (p * (dy**2 + dx**2)).sum(SPATIAL_DIMS)


def intensity(m: torch.Tensor) -> torch.Tensor:
    """Mean value of the raw (unnormalised) map: how much attention the token draws overall."""
    return m.mean(SPATIAL_DIMS)


def compactness(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Clustering compactness of two subjects: within-cluster spread over between-cluster separation.

    (sqrt(spread(a)) + sqrt(spread(b))) / (|com(a) - com(b)| + eps), both in pixels, so the ratio is resolution
    free. Lower = compact subjects far apart; above ~1 the subjects' clouds reach into each other.
    """
    radius = spread(a, eps).clamp_min(eps).sqrt() + spread(b, eps).clamp_min(eps).sqrt()
    return radius / (_center_gap(a, b, eps) + eps)


def ae_response(m: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite per-token loss max(0, 1 - max m): 0 once some patch attends fully to the token.

    For A&E's exact loss feed maps from :func:`probe.analysis.maps.token_softmax` then
    :func:`probe.analysis.maps.gaussian_smooth`
    (values ≤ 1, where the clamp never acts).
    """
    return (1 - m.amax(SPATIAL_DIMS)).clamp_min(0)


def ae_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite loss over subjects stacked (..., S, H, W): the most neglected subject's response."""
    return ae_response(maps).amax(-1)


def self_cross_overlap(
    cross_maps: torch.Tensor, self_maps: torch.Tensor, norm: Norm = "max", eps: float = EPS
) -> torch.Tensor:
    """Self-Cross guidance loss: does one subject's attended region cover another subject's cross-attention?

    With A^c the cross-attention maps and A^s the aggregated self-attention maps
    (:func:`probe.analysis.maps.aggregate_self_attention`), both (..., S, H, W) and each normalised per map with
    ``norm``
    (default peak 1, so subjects of different strength weigh alike):
    g(i, j) = Σ_p min(A^s_i, A^c_j) + Σ_p min(A^c_i, A^s_j), averaged over pairs i < j (0 for one subject).
    A pixel sum, so it grows with H·W.
    """
    cross_maps, self_maps = normalize(cross_maps, norm, eps), normalize(self_maps, norm, eps)
    first, second = _pair_tensors(cross_maps.shape[-3], cross_maps.device)

    def overlap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x[..., first, :, :], y[..., second, :, :]).sum(SPATIAL_DIMS)

    return _mean_over_pairs(overlap(self_maps, cross_maps) + overlap(cross_maps, self_maps))


PAIR_OVERLAP = ("soft_iou", "cosine", "com_distance", "kl_sym", "compactness")
"""The statistics of :func:`pair_overlap`, in its order."""

PAIR_STATISTICS = ("soft_iou", "com_distance", "kl_sym", "compactness", "self_cross")
"""The overlap statistics of a pair of subjects that the readers show (:mod:`probe.analysis.lazy`, :mod:`probe.ui.lab`,
the
explorer), in their order: :data:`PAIR_OVERLAP` without cosine, then :func:`self_cross_overlap`, last because it
needs self-attention that a reader may not have. The one list of these names: import it."""


def pair_overlap(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> dict[str, torch.Tensor]:
    """How two subjects' raw maps (..., H, W) overlap and sit apart: the one definition every reader uses.

    Centre-of-mass distance and KL are taken on min-max normalised maps (background 0, as the overlap paper reads
    them): on raw maps a flat floor of attention pulls every centre to the middle and dominates the divergence.
    Soft IoU min-max normalises on its own; cosine similarity and compactness see the raw maps.
    """
    fa, fb = normalize(a, "minmax", eps), normalize(b, "minmax", eps)
    return {"soft_iou": soft_iou(a, b, eps=eps), "cosine": cosine_similarity(a, b, eps),
            "com_distance": com_distance(fa, fb, eps), "kl_sym": kl_divergence(fa, fb, "sym", eps),
            "compactness": compactness(a, b, eps)}


class Peaks(NamedTuple):
    """Peaks of maps (..., H, W), strongest first: ``values`` (..., k) differentiable, ``positions`` (..., k, 2)
    long (y, x), ``valid`` (..., k) bool. Missing peaks have value 0 and the main peak's position."""

    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


def find_peaks(m: torch.Tensor, k: int = PEAK_COUNT, suppress_radius: int = PEAK_RADIUS) -> Peaks:
    """Up to ``k`` local maxima per map by iterative non-maximum suppression.

    Candidates are positive pixels equal to the max of their (2r+1)² neighbourhood; repeatedly the strongest is
    taken and candidates within Chebyshev distance r of it are removed. Locations are not differentiable; values are
    gathered from ``m`` and are.
    """
    height, width = m.shape[-2:]
    flat = m.reshape(-1, height * width)
    window = 2 * suppress_radius + 1
    grid = m.detach().reshape(-1, 1, height, width)
    local_max = (grid == F.max_pool2d(grid, window, stride=1, padding=suppress_radius)) & (grid > 0)
    score = torch.where(local_max, grid, float("-inf")).reshape(-1, height * width)
    ys = torch.arange(height, device=m.device)[:, None]
    xs = torch.arange(width, device=m.device)[None, :]
    positions, valid = [], []
    for _ in range(k):
        best = score.argmax(-1)
        y, x = best // width, best % width
        valid.append(torch.isfinite(score.gather(-1, best[:, None])[:, 0]))
        positions.append(torch.stack([y, x], dim=-1))
        near = ((ys - y[:, None, None]).abs() <= suppress_radius) & ((xs - x[:, None, None]).abs() <= suppress_radius)
        score = score.masked_fill(near.reshape(-1, height * width), float("-inf"))
    pos, ok = torch.stack(positions, dim=1), torch.stack(valid, dim=1)
    pos = torch.where(ok[..., None], pos, pos[:, :1])
    values = flat.gather(-1, pos[..., 0] * width + pos[..., 1]) * ok
    lead = m.shape[:-2]
    return Peaks(values.reshape(*lead, k), pos.reshape(*lead, k, 2), ok.reshape(*lead, k))


def aggregation_loss(
    m: torch.Tensor, k: int = PEAK_COUNT, suppress_radius: int = PEAK_RADIUS, eps: float = EPS
) -> torch.Tensor:
    """AI-T2I aggregation: penalise a subject's attention split into far-apart fragments (pulls them together).

    Each peak from :func:`find_peaks` gets a centroid, the centre of mass of ``m`` in its (2r+1)² window
    (differentiable in ``m``). Loss = Σ_{j≥1} w_j · |c_j - c_0| / diagonal with w_j = v_j / Σ_all v the peak's
    share of peak value; in [0, 1), 0 for a single-peaked map.
    """
    peaks = find_peaks(m, k, suppress_radius)
    ys, xs = _grid(m)
    py = peaks.positions[..., 0, None, None].to(m.dtype)
    px = peaks.positions[..., 1, None, None].to(m.dtype)
    window = ((ys - py).abs() <= suppress_radius) & ((xs - px).abs() <= suppress_radius)
    centroids = center_of_mass(m.unsqueeze(-3) * window, eps)  # (..., k, 2)
    gaps = torch.linalg.vector_norm(centroids[..., 1:, :] - centroids[..., :1, :], dim=-1) / _diagonal(m)
    weights = peaks.values / peaks.values.sum(-1, keepdim=True).clamp_min(eps)
    return (weights[..., 1:] * gaps).sum(-1)


def isolation_loss(
    maps: torch.Tensor, margin: float = ISOLATION_MARGIN, softness: float = 0.0, eps: float = EPS,
    form: Literal["distance", "cosine"] = "distance",
) -> torch.Tensor:
    """AI-T2I isolation: penalise subjects (..., S, H, W) that sit on each other; mean over pairs, 0 for one subject.

    ``form="distance"``: the hinge max(0, margin − com_distance) on centres of mass (distances as a fraction of the
    diagonal); ``softness`` > 0 uses softness · softplus((margin − d) / softness), a smooth hinge that still pushes
    slightly beyond the margin. ``form="cosine"``: the cosine similarity of the two maps (the form the paper's
    analysis is built on), which also separates subjects whose centres coincide but whose shapes differ.
    """
    if form == "cosine":
        return _mean_over_pairs(pairwise(lambda a, b: cosine_similarity(a, b, eps), maps))
    if form != "distance":
        raise ValueError(f"isolation form must be 'distance' or 'cosine', got {form!r}")
    slack = margin - pairwise(lambda a, b: com_distance(a, b, eps), maps)
    penalty = softness * F.softplus(slack / softness) if softness > 0 else slack.clamp_min(0)
    return _mean_over_pairs(penalty)
