"""The recording consumer: each attention call's maps reduced on the device (head mean, the conditional half,
kept steps, self-attention keys or query points) into one batch's arrays, copied to the host once."""

from __future__ import annotations

import numpy as np
import torch

from probe.record.plan import Plan
from probe.tap import Call, Consumer, TapError
from probe.tap.layers import TEXT_QUERIES


class Recorder(Consumer):
    """Tap consumer that keeps the requested maps of one batch in device buffers."""

    conditional_only = True  # the conditional rows are all it keeps: the tap scores no unconditional half

    def __init__(self, plan: Plan, batch: slice, device: torch.device, steps: int):
        self.plan, self.device, self.steps = plan, device, steps
        self.mean_heads = plan.heads == "mean"
        self.n = batch.stop - batch.start
        self.step_pos = {s: i for i, s in enumerate(plan.steps)}
        self.where: dict[tuple[str, str], tuple[str, int]] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for group, layers in plan.groups.items():
            for i, layer in enumerate(layers):
                self.where[layer.key] = (group, i)
            if plan.is_qk(group):
                for part in ("q", "k"):
                    self.buffers[f"{group}/{part}"] = torch.full((self.n, *plan.qk_shape(group)), float("nan"),
                                                                 dtype=torch.float16, device=device)
                continue
            self.buffers[group] = torch.full(
                (self.n, *plan.group_shape(group)), float("nan"), dtype=torch.float16, device=device
            )
        n_real = [len(t) for t in plan.tokens[batch]]
        slots = torch.arange(plan.n_tokens, device=device)
        self.padding = slots[None, :] >= torch.tensor(n_real, device=device)[:, None]
        self.padded = min(n_real) < plan.n_tokens  # some sample has padding slots
        self.positions = torch.tensor([p + [0] * (plan.n_tokens - len(p)) for p in plan.positions[batch]],
                                      device=device)  # (n, n_tokens): encoder positions of the recorded tokens

    def wants(self, call: Call) -> bool:
        """The pipeline's own passes at the kept steps; guidance's, inversion's and correction passes are not the
        generation's, and an unconditional half alone is not recorded."""
        if call.pass_ not in ("cfg", "cond") or call.layer.key not in self.where:
            return False
        if not 0 <= call.step < self.steps:
            raise TapError(f"{call.layer.name}: a {call.pass_} pass at step {call.step}, but this recording has "
                           f"steps 0 … {self.steps - 1}; was the pipeline called with another num_inference_steps?")
        return call.step in self.step_pos

    @torch.no_grad()
    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        group, i = self.where[call.layer.key]
        x = call.conditional(probs.detach())  # (n, heads, q, k)
        if x.shape[0] != self.n:
            raise TapError(f"{call.layer.name}: a {call.pass_} pass with {x.shape[0]} conditional rows at step "
                           f"{call.step}, but this recording's batch has {self.n} samples")
        if self.plan.heads == "mean":  # a head mean the tap made already is taken as it is
            x = x[:, 0].float() if x.shape[1] == 1 else x.float().mean(1)
        elif self.plan.heads != "all":
            x = x[:, self.plan.heads]
        h, w = call.layer.grid
        kind = call.layer.kind
        if kind in TEXT_QUERIES:  # the recorded tokens' rows, padding rows NaN
            x = self._tokens(x.transpose(-1, -2)).transpose(-1, -2)
        if kind in ("cross", "text_text"):  # the tap may have scored the recorded tokens' columns alone
            x = self._pad(x) if call.only_columns else self._tokens(x)
        if kind == "cross":
            x = x.reshape(*x.shape[:-2], h, w, x.shape[-1])
        elif kind == "text_image":
            x = x.reshape(*x.shape[:-1], h, w)
        elif kind == "self":
            if self.plan.self_queries is not None:  # only the chosen query cells, before anything is copied
                x = x[..., [qy * w + qx for qy, qx in self.plan.query_cells(call.layer)], :]
            keys = x.reshape(*x.shape[:-1], h, w)
            kh, kw = self.plan.key_grid(call.layer)
            if (kh, kw) != (h, w):  # each pooled key cell holds the attention mass of the keys inside it
                keys = keys.reshape(*keys.shape[:-2], kh, h // kh, kw, w // kw).sum((-3, -1))
            x = keys if self.plan.self_queries is not None else keys.reshape(*x.shape[:-2], h, w, kh, kw)
        self.buffers[group][:, self.step_pos[call.step], i] = x  # to float16 in the copy
        return None

    def columns(self, call: Call) -> torch.Tensor | None:
        """The recorded tokens' key columns of a text-key block (each sample's own positions)."""
        return self.positions if call.layer.kind in ("cross", "text_text") else None

    def reads_qk(self, call: Call) -> bool:
        return self.plan.is_qk(call.layer.group)

    @torch.no_grad()
    def on_qk(self, call: Call, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        group, i = self.where[call.layer.key]
        h, w = call.layer.grid
        for part, x in (("q", query), ("k", key)):
            x = call.conditional(x.detach())  # (n, heads, tokens, dim)
            self.buffers[f"{group}/{part}"][:, self.step_pos[call.step], i] = (
                x.reshape(*x.shape[:2], h, w, x.shape[-1]).to(torch.float16))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The recorded tokens' columns of (n, …, text slots): each sample's own positions, padding NaN."""
        index = self.positions.view(self.n, *([1] * (x.ndim - 2)), -1).expand(*x.shape[:-1], -1)
        return self._pad(x.gather(-1, index))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """NaN in the padding slots of (n, …, text slots); ``x`` itself where no sample has any."""
        if not self.padded:
            return x
        return x.masked_fill(self.padding.view(self.n, *([1] * (x.ndim - 2)), -1), float("nan"))

    def to_host(self) -> dict[str, np.ndarray]:
        return {g: b.cpu().numpy() for g, b in self.buffers.items()}


