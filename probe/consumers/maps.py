"""One consumer that collects layer-and-head mean attention maps, for guidance and for the studies alike.

Guidance reads the maps of its own evaluation passes inside the autograd graph (``passes=("guidance",)``, not
detached); the guidance studies read the pipeline's real denoising pass at chosen steps (``passes=REAL_PASSES``,
detached, one image). Which layers, passes and steps count is the caller's choice; the tap says which pass and step
each call belongs to, so nothing is guessed from batch sizes or call counts.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch

from probe.tap import Call, Consumer, Layer

REAL_PASSES = ("cfg", "cond")  # the pipeline's own pass: its conditional half under CFG, all of it without
GUIDANCE_PASSES = ("guidance",)  # guidance's own evaluations (Tap.pass_("guidance", step))


class MapCollector(Consumer):
    """Mean attention over every (layer, head) pair of each kind, per step: A&E's ``aggregate_attention``.

    ``layers``: the layers whose attention counts (cross and/or self); ``passes``: which passes
    (:data:`REAL_PASSES`, :data:`GUIDANCE_PASSES`); ``steps``: which steps (None: every step); ``detach``: keep no
    autograd graph (True for measuring, False for guidance's losses); ``image``: keep one image of the batch (its
    index) or all of them (None). Fused attention is kept everywhere else.
    """

    def __init__(self, layers: Iterable[Layer], *, passes: Collection[str] = REAL_PASSES,
                 steps: Collection[int] | None = None, detach: bool = True, image: int | None = None):
        self.layer_keys = frozenset(layer.key for layer in layers)
        self.passes = frozenset(passes)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.detach = detach
        self.image = image
        self._found: dict[int, tuple[dict[str, torch.Tensor], dict[str, int]]] = {}  # step → (sums, counts)

    def clear(self) -> None:
        """Forget what was collected (guidance: before each evaluation)."""
        self._found = {}

    def wants(self, call: Call) -> bool:
        return (call.pass_ in self.passes and call.layer.key in self.layer_keys
                and (self.steps is None or call.step in self.steps))

    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        rows = call.conditional(probs)
        rows = rows.detach() if self.detach else rows
        if self.image is not None:
            rows = rows[self.image : self.image + 1]
        summed = rows.float().sum(1)  # over heads: (B, queries, keys)
        sums, counts = self._found.setdefault(call.step, ({}, {}))
        kind = call.layer.kind
        sums[kind] = summed if kind not in sums else sums[kind] + summed
        counts[kind] = counts.get(kind, 0) + probs.shape[1]

    @property
    def maps(self) -> dict[int, dict[str, torch.Tensor]]:
        """{step: {kind: mean (queries, keys), or (B, queries, keys) when ``image`` is None}}, steps in order."""
        out = {}
        for step, (sums, counts) in sorted(self._found.items()):
            means = {kind: total / counts[kind] for kind, total in sums.items()}
            out[step] = {k: v[0] for k, v in means.items()} if self.image is not None else means
        return out

    def mean(self, step: int) -> dict[str, torch.Tensor]:
        """The means of one step, every kind of the chosen layers present (else an error that says what ran)."""
        found = self.maps.get(step, {})
        wanted = {kind for _, kind in self.layer_keys}
        if set(found) != wanted:
            raise RuntimeError(f"expected {sorted(wanted)} attention from {sorted(self.layer_keys)} at step {step} "
                               f"but the denoiser produced {sorted(found)}; do these layers run at this image size?")
        return found
