"""Small float64 inputs shared by the tests of probe.maps and probe.overlap."""

import torch

F64 = torch.float64


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Positive values, distinct almost surely (no ties for min/max/argmax)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).add(0.1).to(dtype)


def grad_input(*shape: int, seed: int = 0) -> torch.Tensor:
    return rand(*shape, seed=seed).requires_grad_()
