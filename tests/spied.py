"""The reference the diffusion-transformer family tests hold the tap's maps to: the q, k, scale and key mask a plain
pipeline run hands to F.scaled_dot_product_attention inside its denoiser, and softmax(q·kᵀ·scale + mask) computed
from them apart from the tap."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

Spied = tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor | None]  # q, k, scale, key mask


@contextmanager
def attention_inputs(net: torch.nn.Module) -> Iterator[list[list[Spied]]]:
    """Within: each forward call of ``net`` (the denoiser, not the text encoder) appends a list of its attention
    calls' (q, k, scale, mask), cloned, in order."""
    calls: list[list[Spied]] = []
    inside: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if inside:
            mask = None if attn_mask is None else attn_mask.detach().clone()
            calls[-1].append((query.detach().clone(), key.detach().clone(), scale, mask))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    def enter(*_):
        inside.append(1)
        calls.append([])

    hooks = [net.register_forward_pre_hook(enter), net.register_forward_hook(lambda *a: inside.clear())]
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()


def softmax(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) over the keys in float64 (scale 1/√d unless given; a boolean mask keeps where
    True), in q's dtype."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1).to(q.dtype)
