"""A direct intervention on attention: two subjects' cross-attention maps moved so that their overlap takes a set
value, with each map's own mass, peak and spread kept.

Why: guidance moves the latent, and overlap then moves together with everything else (concentration, spread), so it
cannot say whether overlap itself makes an entity go missing. Here only the maps' *positions* change. In chosen
cross-attention layers and steps, each subject's token columns over the image queries are moved rigidly on the
query grid (a circular shift by a fraction of a cell: the excess of each column over its own floor moves, the floor
stays; mass is kept exactly, the peak and spread up to the blend of neighbouring cells), and the rest of each query's
text columns is rescaled so that the row keeps its sum (a UNet's cross-attention row sums to 1; a joint softmax's
text block keeps its share beside the image keys).

The move is one number per call, σ ∈ [−1, 1]: σ < 0 pulls the two maps toward each other (|σ| of the way to where
their centres of mass meet), σ > 0 pushes them apart along a direction fixed per unit (each map moves σ·H/4 cells,
opposite ways; H/2 apart is the farthest on the circular grid). σ is solved per call so that the pair's soft IoU
(:func:`probe.analysis.overlap.soft_iou` of the head-mean maps) reaches the dose. The sham solves nothing and moves by
zero
through the same code, which returns the very same probabilities; ``dose=None`` changes nothing at all (the same
explicit-softmax path as every other arm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probe.analysis.overlap import center_of_mass, soft_iou
from probe.tap import Call, Consumer, Layer

SHAM = "sham"
SEARCH_POINTS = 41  # σ grid searched before bisection
BISECTIONS = 10  # of the sharpening power
REFINEMENTS = 2  # grids searched for σ, each inside the last one's bracket
TOLERANCE = 0.01  # a dose counts as reached when the soft IoU lands this close to it


def shift(maps: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Maps (..., H, W) moved by ``offset`` (..., 2) cells (y, x), circularly, by bilinear blending of the four
    whole-cell shifts around it: the sum is kept exactly, and a whole-cell offset moves the map unchanged."""
    height, width = maps.shape[-2:]
    ys = torch.arange(height, device=maps.device, dtype=maps.dtype)
    xs = torch.arange(width, device=maps.device, dtype=maps.dtype)
    dy, dx = offset[..., 0, None], offset[..., 1, None]
    # out[y] = Σ_y' w(y − y' − dy) in[y'], w the hat function on the circle: one (H, H) and one (W, W) matrix per map
    wy = _hat((ys[:, None] - ys[None, :])[None] - dy[..., None], height)  # (..., H, H)
    wx = _hat((xs[:, None] - xs[None, :])[None] - dx[..., None], width)  # (..., W, W)
    return wy @ maps @ wx.transpose(-1, -2)


def _hat(distance: torch.Tensor, period: int) -> torch.Tensor:
    d = torch.remainder(distance + period / 2, period) - period / 2  # the shortest way round
    return (1 - d.abs()).clamp_min(0)


def spread(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spatial standard deviation (cells) of each map's excess over its floor, about its centre of mass."""
    excess = maps - maps.amin((-2, -1), keepdim=True)
    p = excess / excess.sum((-2, -1), keepdim=True).clamp_min(eps)
    height, width = maps.shape[-2:]
    ys = torch.arange(height, device=maps.device, dtype=maps.dtype)[:, None]
    xs = torch.arange(width, device=maps.device, dtype=maps.dtype)[None, :]
    my, mx = (p * ys).sum((-2, -1)), (p * xs).sum((-2, -1))
    var = (p * ((ys - my[..., None, None]) ** 2 + (xs - mx[..., None, None]) ** 2)).sum((-2, -1))
    return var.sqrt()


def _gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """From b's centre of mass to a's (y, x), of the maps' excess over their floors."""
    return center_of_mass(a - a.amin()) - center_of_mass(b - b.amin())


def offsets(gap: torch.Tensor, sigma: torch.Tensor, direction: torch.Tensor, height: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells each of two maps moves for moves ``sigma`` (n,): toward each other for σ < 0 (|σ| of the way to
    where their centres meet), apart along ``direction`` (2,) (unit vector, y x) for σ > 0. Two (n, 2) offsets."""
    move = -gap / 2 * sigma.clamp_max(0).abs()[:, None] + direction * (height / 4) * sigma.clamp_min(0)[:, None]
    return move, -move


def _moved(grids: list[torch.Tensor], gap: torch.Tensor, sigma: torch.Tensor, direction: torch.Tensor
           ) -> list[torch.Tensor]:
    """Both subjects' columns (heads, tokens, h, w) moved by each σ: (n, heads, tokens, h, w) each. The excess over
    each column's floor is shifted, then sharpened back to its own peak (a part-cell shift blends neighbouring cells
    and lowers a sharp peak; the sharpening undoes that and with it most of the blend's widening)."""
    out = []
    for g, move in zip(grids, offsets(gap, sigma, direction, grids[0].shape[-2])):
        excess = g - g.amin((-2, -1), keepdim=True)
        shifted = shift(excess[None], move[:, None, None, :])
        out.append(g + (_sharpen(shifted, excess) - excess))  # exactly g for a zero move
    return out


def _sharpen(shifted: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``shifted`` maps raised to the power γ ∈ [1, 8] (rescaled to their own mass) that gives back ``original``'s
    peak; unchanged where the peak is already there (a whole-cell move)."""
    peak, mass = original.amax((-2, -1), keepdim=True), original.sum((-2, -1), keepdim=True)
    low = shifted.amax((-2, -1), keepdim=True) < peak * (1 - 1e-6)
    if not low.any():
        return shifted
    unit = shifted / shifted.amax((-2, -1), keepdim=True).clamp_min(1e-30)
    lo, hi = torch.zeros_like(peak), torch.full_like(peak, 3.0)  # log2 γ
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        powered = unit ** (2 ** mid)
        short = mass / powered.sum((-2, -1), keepdim=True).clamp_min(1e-30) < peak  # the peak after rescaling
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    powered = unit ** (2 ** ((lo + hi) / 2))
    return torch.where(low, powered * mass / powered.sum((-2, -1), keepdim=True).clamp_min(1e-30), shifted)


def _solve(grids: list[torch.Tensor], gap: torch.Tensor, target: float, direction: torch.Tensor
           ) -> tuple[torch.Tensor, bool]:
    """The smallest move σ whose soft IoU (of the moved head-mean maps) is nearest ``target``, and whether it is
    within :data:`TOLERANCE` of it. The search runs first on each subject's head-mean map moved as one (cheap), then
    on the columns themselves, each head's moved on its own, around that σ and, where that misses, over all of
    [−1, 1]."""
    means = [g.sum(1, keepdim=True).mean(0, keepdim=True) for g in grids]  # (1, 1, h, w): one column per subject
    first = _search(means, gap, target, direction, torch.linspace(-1, 1, SEARCH_POINTS, device=gap.device))
    tries = [lambda: first,
             lambda: _search(grids, gap, target, direction,
                             (first + torch.linspace(-0.1, 0.1, 9, device=gap.device)).clamp(-1, 1)),
             lambda: _search(grids, gap, target, direction, torch.linspace(-1, 1, SEARCH_POINTS, device=gap.device))]
    for attempt in tries:
        sigma = attempt()
        a, b = _moved(grids, gap, sigma, direction)
        if abs(float(soft_iou(a.sum(2).mean(1), b.sum(2).mean(1))[0]) - target) <= TOLERANCE:
            return sigma, True
    return sigma, False


def _search(grids: list[torch.Tensor], gap: torch.Tensor, target: float, direction: torch.Tensor,
            candidates: torch.Tensor) -> torch.Tensor:
    """σ among ``candidates`` where the soft IoU crosses the target (the crossing nearest σ = 0, refined on a finer
    grid inside its bracket and interpolated there), else the candidate that comes nearest. Each grid is one batched
    evaluation."""
    def miss(sigma: torch.Tensor) -> torch.Tensor:
        a, b = _moved(grids, gap, sigma, direction)
        return soft_iou(a.sum(2).mean(1), b.sum(2).mean(1)) - target

    for _ in range(REFINEMENTS):
        found = miss(candidates)
        crossings = torch.nonzero(torch.sign(found[:-1]) != torch.sign(found[1:])).flatten()
        if not len(crossings):
            return candidates[found.abs().argmin()].reshape(1)
        k = crossings[(candidates[crossings].abs() + candidates[crossings + 1].abs()).argmin()]
        lo, hi, f_lo, f_hi = candidates[k], candidates[k + 1], found[k], found[k + 1]
        candidates = torch.linspace(float(lo), float(hi), SEARCH_POINTS, device=gap.device)
    return (lo + (hi - lo) * f_lo / (f_lo - f_hi)).reshape(1)  # linear between the last bracket's ends


@dataclass
class Unit:
    """One conditional sample's intervention: its two subjects' text columns, the dose (a soft IoU to reach,
    :data:`SHAM`, or None for none: measured, not moved), the direction (radians) a push apart takes, and the steps
    it acts at (None: the consumer's). A relative dose moves by a share of the overlap each call has (the maps' natural
overlap falls tenfold over the schedule, so one soft IoU would push apart early and pull together late)."""

    columns: tuple[Sequence[int], Sequence[int]]
    dose: float | str | None
    angle: float = 0.0
    steps: frozenset[int] | None = None
    relative: bool = False  # the dose is a factor of each call's own soft IoU (×0.5: halve it), not a soft IoU
    checks: list[dict] = field(default_factory=list)  # per intervened call: the manipulation check

    def target(self, natural: float) -> float:
        """The soft IoU this call's maps are moved to, given the one they have."""
        return float(self.dose) * natural if self.relative else float(self.dose)


class OverlapShift(Consumer):
    """Moves each unit's two subject maps in ``layers`` (cross) at ``steps`` to its dose of soft IoU."""

    replaces = True

    def __init__(self, layers: Sequence[Layer], steps: Sequence[int], units: Sequence[Unit]):
        if any(layer.kind != "cross" for layer in layers):
            raise ValueError("the overlap intervention moves cross-attention maps: give cross layers")
        self.layers, self.units = frozenset(la.key for la in layers), list(units)
        self.steps = frozenset(steps).union(*(u.steps for u in self.units if u.steps is not None))

    def wants(self, call: Call) -> bool:
        return call.pass_ in ("cfg", "cond") and call.layer.key in self.layers and call.step in self.steps

    @torch.no_grad()
    def on_probs(self, call: Call, probs: torch.Tensor) -> torch.Tensor | None:
        rows = call.conditional_rows(probs.shape[0])
        start = rows.start
        if rows.stop - start != len(self.units):
            raise ValueError(f"{call.layer.name}: {rows.stop - start} conditional samples in this call, but "
                             f"the intervention was given {len(self.units)} units")
        out = None
        for i, unit in enumerate(self.units):
            if call.step not in (self.steps if unit.steps is None else unit.steps):
                continue
            moved = self._move(call, probs[start + i], unit)
            if unit.dose is not None:
                out = probs.clone() if out is None else out
                out[start + i] = moved
        return out

    def _move(self, call: Call, probs: torch.Tensor, unit: Unit) -> torch.Tensor:
        """One sample's (heads, queries, text keys) block with the unit's two subjects moved."""
        h, w = call.layer.grid
        x = probs.float()
        heads, n_keys = x.shape[0], x.shape[-1]
        cols = [torch.as_tensor(list(c), device=x.device) for c in unit.columns]
        grids = [x[:, :, c].permute(0, 2, 1).reshape(heads, len(c), h, w) for c in cols]  # (heads, tokens, h, w)
        means = [g.sum(1).mean(0) for g in grids]  # each subject's head-mean map
        direction = torch.tensor([math.sin(unit.angle), math.cos(unit.angle)], device=x.device)
        gap = _gap(means[0], means[1])
        sigma, reachable = ((torch.zeros(1, device=x.device), True) if unit.dose in (SHAM, None)
                            else _solve(grids, gap, unit.target(float(soft_iou(*means))), direction))
        moved = [m[0] for m in _moved(grids, gap, sigma, direction)]
        block = x.clone()
        subject = torch.zeros(n_keys, dtype=torch.bool, device=x.device)
        for c, m in zip(cols, moved):
            block[:, :, c] = m.reshape(heads, len(c), h * w).permute(0, 2, 1)
            subject[c] = True
        before = x[..., subject].sum(-1)  # (heads, queries), summed in the same order as after
        after = block[..., subject].sum(-1)
        total = x.sum(-1)
        over = after > total  # a query where the moved maps would take more than the row holds: scaled down to it
        if over.any():
            block[..., subject] *= torch.where(over, total / after.clamp_min(1e-12), 1.0)[..., None]
            after = block[..., subject].sum(-1)
        rest = (total - before).clamp_min(1e-12)
        block[..., ~subject] *= torch.where(after == before, 1.0, (total - after).clamp_min(0) / rest)[..., None]
        unit.checks.append(self._check(call, means, [m.sum(1).mean(0) for m in moved], sigma, over) |
                           {"reachable": reachable})
        return block.to(probs.dtype)

    @staticmethod
    def _check(call: Call, before: list[torch.Tensor], after: list[torch.Tensor], sigma: torch.Tensor,
               over: torch.Tensor) -> dict:
        """The manipulation check of one call: soft IoU before and after, each map's mass, peak and spread."""
        row = {"layer": call.layer.name, "step": call.step, "sigma": float(sigma[0]),
               "iou_before": float(soft_iou(*before)), "iou_after": float(soft_iou(*after)),
               "clamped_queries": float(over.float().mean())}
        for name, b, a in zip("ab", before, after):
            row |= {f"mass_{name}_before": float(b.sum()), f"mass_{name}_after": float(a.sum()),
                    f"peak_{name}_before": float(b.max()), f"peak_{name}_after": float(a.max()),
                    f"spread_{name}_before": float(spread(b)), f"spread_{name}_after": float(spread(a))}
        return row
