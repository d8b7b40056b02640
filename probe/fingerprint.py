"""Which weights made an output: a short hash of a pipeline's weights, shared by the sweeps (their layout) and the
studies (their per-image rows), so that a resumed run never mixes rows of two models."""

from __future__ import annotations

import hashlib

import torch


def weights_id(pipe) -> str:
    """A short hash of every weight of the pipeline's modules (sums taken on their device): two pipelines with the
    same id make the same images, whatever folder or step count they were loaded from."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a CPU sum's last bits follow the thread count; a resumed run may use another
    try:
        sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]).cpu()
                for _, module in sorted(pipe.components.items()) if isinstance(module, torch.nn.Module)
                for p in module.parameters()]
    finally:
        torch.set_num_threads(threads)
    return hashlib.sha1(torch.cat(sums).numpy().tobytes()).hexdigest()[:12]
