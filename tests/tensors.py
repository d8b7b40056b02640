"""Small float64 inputs shared by the tests of probe.analysis.maps and probe.analysis.overlap, and the guidance tests'
descent check."""

import torch

F64 = torch.float64


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Positive values, distinct almost surely (no ties for min/max/argmax)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).add(0.1).to(dtype)


def grad_input(*shape: int, seed: int = 0) -> torch.Tensor:
    return rand(*shape, seed=seed).requires_grad_()


ETA = 0.01  # length of the descent check's gradient step on the latent
FIRST_ORDER_SHARE = 0.25  # the step must give at least this share of the decrease the gradient predicts


def assert_a_small_step_descends(guide, latent: torch.Tensor, grid: tuple[int, int]) -> None:
    """A normalised gradient step of length ETA on the latent lowers the guide's objective at step 0 by at least
    FIRST_ORDER_SHARE of the first-order prediction ETA·|∇|; the subjects' maps have the expected grid."""
    z = latent.detach().clone().requires_grad_(True)
    before, maps = guide.evaluate(z, 0)
    (grad,) = torch.autograd.grad(before, [z])
    with torch.no_grad():
        after, _ = guide.evaluate(z - ETA * grad / grad.norm(), 0)
    assert maps.subjects.shape[-2:] == grid
    assert torch.isfinite(grad).all() and grad.norm() > 0
    assert before - after > FIRST_ORDER_SHARE * ETA * grad.norm()
