"""The recording consumer: each attention call's maps reduced on the device (head mean, the conditional half,
kept steps, self-attention keys or query points) into one batch's arrays, copied to the host once."""

from __future__ import annotations

import numpy as np
import torch

from probe.record.plan import Plan
from probe.tap import Call, Consumer, TapError
from probe.tap.layers import TEXT_QUERIES, Split


class Recorder(Consumer):
    """Tap consumer that keeps the requested maps of one batch in device buffers."""

    conditional_only = True  # the conditional rows are all it keeps: the tap scores no unconditional half
    batched = True  # it reads its buffers after the run: small blocks may be scored a denoiser call at a time

    def __init__(self, plan: Plan, batch: slice, device: torch.device, steps: int):
        self.plan, self.device, self.steps = plan, device, steps
        self.qk_dtype = torch.bfloat16 if plan.qk_dtype == "int16" else getattr(torch, plan.qk_dtype)
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
                    self.buffers[f"{group}/{part}"] = torch.zeros((self.n, *plan.qk_shape(group)),
                                                                  dtype=self.qk_dtype, device=device)
                if plan.qk_joint:  # which keys each sample's softmax used (text keys it does not have: none)
                    self.buffers[f"{group}/keys"] = torch.zeros((self.n, *plan.qk_shape(group)[:2],
                                                                 plan.qk_shape(group)[3]), dtype=torch.bool,
                                                                device=device)
                continue
            self.buffers[group] = torch.full(
                (self.n, *plan.group_shape(group)), float("nan"), dtype=torch.float16, device=device
            )
        self.layer_keys = frozenset(self.where)
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
    def on_qk(self, call: Call, query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None,
              split: Split) -> None:
        group, i = self.where[call.layer.key]
        planned = self.plan.qk_scale[call.layer.name]
        if abs(scale - planned) > 1e-6 * planned:
            raise TapError(f"{call.layer.name}: its scores were scaled by {scale:g}, not the {planned:g} its "
                           "module declares; its maps could not be made again from q and k")
        if not self.plan.qk_joint:
            self._unet_qk(call, group, i, query, key, mask)
            return
        query, key = call.conditional(query.detach()), call.conditional(key.detach())  # (n, heads, tokens, dim)
        used = _keys_used(call, mask, key)
        rows, cols = _joint_order(call, split, query.shape[-2], used, self.plan.qk_text)
        step = self.step_pos[call.step]
        self.buffers[f"{group}/q"][:, step, i, :, : len(rows)] = query[..., rows, :].to(self.qk_dtype)
        self.buffers[f"{group}/k"][:, step, i, :, : len(cols)] = key[..., cols, :].to(self.qk_dtype)
        self.buffers[f"{group}/keys"][:, step, i, : len(cols)] = used[:, cols]

    def _unet_qk(self, call: Call, group: str, i: int, query: torch.Tensor, key: torch.Tensor, mask) -> None:
        """A UNet's self-attention: its own softmax over the image keys, q and k kept on the image grid."""
        if mask is not None:
            raise TapError(f"{call.layer.name}: a masked softmax cannot be rebuilt from q and k alone")
        h, w = call.layer.grid
        for part, x in (("q", query), ("k", key)):
            x = call.conditional(x.detach())  # (n, heads, tokens, dim)
            self.buffers[f"{group}/{part}"][:, self.step_pos[call.step], i] = (
                x.reshape(*x.shape[:2], h, w, x.shape[-1]).to(self.qk_dtype))

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
        return {g: (b.view(torch.int16) if b.dtype == torch.bfloat16 else b).cpu().numpy()  # bfloat16 as its bits
                for g, b in self.buffers.items()}


def _keys_used(call: Call, mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """(n, keys): True where a key took part in each conditional row's softmax. A mask must be one per key (the same
    for every head and query, as padding masks are), boolean or an additive bias of 0 and −∞."""
    n, n_keys = key.shape[0], key.shape[-2]
    if mask is None:
        return torch.ones(n, n_keys, dtype=torch.bool, device=key.device)
    m = mask.detach()
    m = call.conditional(m.expand(call.batch, *m.shape[1:]) if m.shape[0] == 1 else m)
    m = m.reshape(n, -1, m.shape[-1]).expand(n, -1, n_keys)  # (n, heads · queries, keys)
    if not bool((m == m[:, :1]).all()):
        raise TapError(f"{call.layer.name}: its mask differs between queries or heads; a q/k store keeps one mask per "
                       "key (padding), so record this layer's maps (self_store='maps')")
    row = m[:, 0]
    if row.dtype == torch.bool:
        return row
    if not bool(((row == 0) | (row == float("-inf"))).all()):
        raise TapError(f"{call.layer.name}: its mask is a bias other than 0 and −∞; record this layer's maps "
                       "(self_store='maps')")
    return row == 0


def _joint_order(call: Call, split: Split, n_queries: int, used: torch.Tensor, n_text: int
                 ) -> tuple[list[int], list[int]]:
    """The query rows and key columns of a joint softmax in the store's order: the image tokens (the layer's grid,
    row by row), then the text tokens in the model's order (the recorded tokens' positions count from there). Keys
    that are neither must have taken no part, so the maps made on read are the model's."""
    name, n_keys = call.layer.name, used.shape[-1]

    def indices(part: slice | None, n: int) -> list[int]:
        return [] if part is None else list(range(n))[part]

    image_q, text_q = indices(split.image_queries, n_queries), indices(split.text_queries, n_queries)
    image_k, text_k = indices(split.image_keys, n_keys), indices(split.text_keys, n_keys)
    n_image = call.layer.grid[0] * call.layer.grid[1]
    if len(image_q) != n_image or len(image_k) != n_image:
        raise TapError(f"{name}: {len(image_q)} image queries and {len(image_k)} image keys, not the {n_image} of its "
                       f"{call.layer.grid} grid")
    if len(text_k) > n_text or len(text_q) not in (0, len(text_k)):
        raise TapError(f"{name}: {len(text_q)} text queries and {len(text_k)} text keys, where the recording planned "
                       f"at most {n_text} text tokens, the same for queries and keys")
    other = sorted(set(range(n_keys)) - set(image_k) - set(text_k))
    if other and bool(used[:, other].any()):
        raise TapError(f"{name}: {len(other)} keys of its softmax are neither image nor text tokens (pad tokens of "
                       "the model's own), so a q/k store's maps would differ from the model's; record maps "
                       "(self_store='maps'), or choose an image size whose tokens need no padding")
    return image_q + text_q, image_k + text_k
