"""Hand-checked values for probe.analysis.maps; tiny tensors only."""

import pytest
import torch
import torch.nn.functional as F
from tensors import F64, grad_input, rand

from probe.analysis.maps import (
    aggregate_self_attention,
    gaussian_kernel1d,
    gaussian_smooth,
    normalize,
    otsu_mask,
    otsu_threshold,
    resize,
    token_map,
    token_softmax,
)

AE_KERNEL = (0.212, 0.576, 0.212)  # diffusers A&E kernel, k=3, sigma=0.5, rounded to 3 decimals


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- normalize, token_map, token_softmax ------------------------------------------------------------------------


def test_normalize_kinds() -> None:
    m = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=F64)
    assert torch.allclose(normalize(m, "max"), m / 5)
    assert torch.allclose(normalize(m, "sum"), m / 11)
    assert torch.allclose(normalize(m, "minmax"), (m - 1) / 4)
    assert torch.equal(normalize(m, "none"), m)
    assert torch.equal(normalize(torch.zeros(2, 2), "max"), torch.zeros(2, 2))  # empty map stays finite
    with pytest.raises(ValueError):
        normalize(m, "bogus")  # type: ignore[arg-type]


def test_token_map_is_mean_of_word_pieces() -> None:
    cross = torch.arange(2 * 2 * 4, dtype=F64).reshape(2, 2, 4)  # cross[y, x, t] = 4(2y + x) + t
    assert torch.equal(token_map(cross, [1, 3]), cross[..., 1] + 1)


@pytest.mark.parametrize("last", [None, 5])
def test_token_softmax_matches_attend_and_excite(last: int | None) -> None:
    cross = rand(4, 4, 8).softmax(-1)
    # A&E (diffusers): attention_for_text = attention_maps[:, :, 1:last]; *= 100; softmax; indices shift by 1
    stop = -1 if last is None else last
    attention_for_text = cross[:, :, 1:stop].clone()
    attention_for_text *= 100
    attention_for_text = torch.nn.functional.softmax(attention_for_text, dim=-1)
    ours = token_softmax(cross, last=last)
    assert ours.shape == cross.shape
    for ae_index in range(attention_for_text.shape[-1]):
        assert torch.allclose(ours[..., ae_index + 1], attention_for_text[..., ae_index])
    assert torch.all(ours[..., 0] == 0) and torch.all(ours[..., attention_for_text.shape[-1] + 1 :] == 0)


def test_token_softmax_keep_all() -> None:
    cross = rand(3, 3, 5)
    assert torch.allclose(token_softmax(cross, temperature=2.0, drop_first=False, last=5), (2 * cross).softmax(-1))


# ---- gaussian_smooth, resize --------------------------------------------------------------------------------------


def test_gaussian_kernel_values() -> None:
    kernel = gaussian_kernel1d(3, 0.5, F64, torch.device("cpu"))
    assert kernel.tolist() == pytest.approx(AE_KERNEL, abs=5e-4)


def test_gaussian_smooth_delta_interior() -> None:
    delta = torch.zeros(5, 5, dtype=F64)
    delta[2, 2] = 1
    out = gaussian_smooth(delta)
    expected = torch.zeros(5, 5, dtype=F64)
    expected[1:4, 1:4] = torch.outer(torch.tensor(AE_KERNEL, dtype=F64), torch.tensor(AE_KERNEL, dtype=F64))
    assert torch.allclose(out, expected, atol=1e-3)
    assert out.sum().item() == pytest.approx(1.0)


def test_gaussian_smooth_reflect_border() -> None:
    delta = torch.zeros(4, 4, dtype=F64)
    delta[0, 0] = 1  # reflect padding mirrors row/col 1 into the pad, so the corner only sees its own centre weight
    k = gaussian_kernel1d(3, 0.5, F64, torch.device("cpu"))
    out = gaussian_smooth(delta)
    assert out[0, 0].item() == pytest.approx(k[1].item() ** 2)
    assert out[1, 1].item() == pytest.approx(k[0].item() ** 2)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_gaussian_smooth_equals_diffusers() -> None:
    module = pytest.importorskip(
        "diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite"
    )
    maps = rand(2, 3, 6, 7, dtype=torch.float32)
    smoothing = module.GaussianSmoothing()
    ours = gaussian_smooth(maps)
    for i in range(2):
        for j in range(3):  # exactly as the pipeline applies it
            image = F.pad(maps[i, j].unsqueeze(0).unsqueeze(0), (1, 1, 1, 1), mode="reflect")
            assert torch.allclose(ours[i, j], smoothing(image).squeeze(0).squeeze(0), atol=1e-6)


def test_resize() -> None:
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    up = resize(m, (4, 4), mode="nearest")
    assert torch.equal(up, m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.allclose(resize(torch.full((3, 3), 0.7, dtype=F64), 6), torch.full((6, 6), 0.7, dtype=F64))
    maps = rand(2, 3, 4, 5)
    out = resize(maps, (8, 6))
    assert out.shape == (2, 3, 8, 6)
    assert torch.allclose(out[1, 2], F.interpolate(maps[1, 2][None, None], size=(8, 6), mode="bilinear")[0, 0])


# ---- Otsu ---------------------------------------------------------------------------------------------------------


def bimodal(seed: int, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 map: background ~0.1, planted 3x4 block ~0.9, with noise."""
    planted = torch.zeros(8, 8, dtype=torch.bool)
    planted[top : top + 3, left : left + 4] = True
    noise = 0.1 * rand(8, 8, seed=seed)
    return torch.where(planted, 0.85, 0.05) + noise, planted


def test_otsu_recovers_planted_mask() -> None:
    m, planted = bimodal(0, 2, 3)
    assert torch.equal(otsu_mask(m), planted)
    threshold = otsu_threshold(m).item()
    assert m[~planted].max().item() < threshold < m[planted].min().item()


def test_otsu_two_values_threshold_mid_gap() -> None:
    m = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    assert otsu_threshold(m).item() == pytest.approx(0.5)  # every split in the empty gap ties; take its middle
    assert torch.equal(otsu_mask(m), m > 0)
    assert not otsu_mask(torch.ones(3, 3)).any()  # constant map: nothing stands out


def test_otsu_batched() -> None:
    pairs = [bimodal(seed, seed % 5, seed % 4) for seed in range(6)]
    maps = torch.stack([m for m, _ in pairs]).reshape(2, 3, 8, 8)
    masks = otsu_mask(maps)
    thresholds = otsu_threshold(maps)
    assert thresholds.shape == (2, 3) and masks.dtype == torch.bool
    for n, (m, planted) in enumerate(pairs):
        assert torch.equal(masks[n // 3, n % 3], planted)
        assert thresholds[n // 3, n % 3] == otsu_threshold(m)


# ---- Self-Cross aggregation ---------------------------------------------------------------------------------------


def pixel(y: int, x: int, size: int = 3) -> torch.Tensor:
    one_hot = torch.zeros(size, size, dtype=F64)
    one_hot[y, x] = 1
    return one_hot


def constructed_self_cross() -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 map: subject at (0,0) (weight 3) and (2,2) (weight 2), background 0.1.

    Self-attention: (0,0) attends to (0,1), (2,2) attends to (1,1), every background pixel attends to (2,0).
    """
    cross = torch.full((3, 3), 0.1, dtype=F64)
    cross[0, 0], cross[2, 2] = 3.0, 2.0
    self_attn = pixel(2, 0).expand(3, 3, 3, 3).clone()  # (H, W, kH, kW)
    self_attn[0, 0], self_attn[2, 2] = pixel(0, 1), pixel(1, 1)
    return cross, self_attn


def test_aggregate_self_attention_hand_computed() -> None:
    cross, self_attn = constructed_self_cross()
    assert torch.equal(otsu_mask(cross), (pixel(0, 0) + pixel(2, 2)).bool())
    # Otsu keeps the two subject pixels: (3·e01 + 2·e11) / 5
    expected = 0.6 * pixel(0, 1) + 0.4 * pixel(1, 1)
    assert torch.allclose(aggregate_self_attention(cross, self_attn), expected)
    assert torch.allclose(aggregate_self_attention(cross, self_attn.reshape(3, 3, 9)), expected)  # flat keys
    # No mask: background joins with its 7 · 0.1 weight
    everything = torch.ones(3, 3, dtype=torch.bool)
    expected_all = (3 * pixel(0, 1) + 2 * pixel(1, 1) + 0.7 * pixel(2, 0)) / 5.7
    assert torch.allclose(aggregate_self_attention(cross, self_attn, mask=everything), expected_all)


def test_aggregate_self_attention_batched_and_broadcast() -> None:
    cross = rand(2, 3, 4, 4)
    self_attn = rand(2, 3, 4, 4, 16, seed=1).softmax(-1)
    out = aggregate_self_attention(cross, self_attn)
    assert out.shape == (2, 3, 4, 4)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(out[i, j], aggregate_self_attention(cross[i, j], self_attn[i, j]))
    assert torch.allclose(out.sum((-2, -1)), torch.ones(2, 3, dtype=F64))  # rows are distributions → so is A^s
    shared = aggregate_self_attention(cross, self_attn[0, 0])  # one self-attention for all subjects
    assert torch.allclose(shared[1, 2], aggregate_self_attention(cross[1, 2], self_attn[0, 0]))
    with pytest.raises(ValueError):
        aggregate_self_attention(cross, rand(2, 3, 4, 4, 15))


# ---- batching, dtypes, gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda m: normalize(m, "max"),
        lambda m: normalize(m, "sum"),
        lambda m: normalize(m, "minmax"),
        gaussian_smooth,
        lambda m: resize(m, (3, 7)),
        otsu_threshold,
    ],
)
def test_batch_equals_per_map(fn) -> None:
    maps = rand(2, 3, 5, 5)
    out = fn(maps)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(out[i, j], fn(maps[i, j]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_low_precision_dtypes(dtype: torch.dtype) -> None:
    cross = rand(2, 4, 4, 6, dtype=dtype)
    soft = token_softmax(cross)
    maps = gaussian_smooth(token_map(soft, [1, 2]))
    agg = aggregate_self_attention(maps, rand(2, 4, 4, 16, dtype=dtype).softmax(-1))
    for out in (soft, maps, normalize(maps, "minmax"), resize(maps, 8), otsu_threshold(maps), agg):
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_gradcheck() -> None:
    gc = torch.autograd.gradcheck
    assert gc(lambda c: token_map(c, [0, 2]), grad_input(3, 3, 4))
    assert gc(lambda c: token_softmax(c, temperature=3.0), grad_input(3, 3, 6))
    for kind in ("max", "sum", "minmax"):
        assert gc(lambda m, kind=kind: normalize(m, kind), grad_input(2, 4, 4))
    assert gc(gaussian_smooth, grad_input(2, 4, 5))
    assert gc(lambda m: resize(m, (6, 7)), grad_input(2, 4, 4))
    mask = otsu_mask(rand(3, 3, seed=3))
    assert gc(lambda c, s: aggregate_self_attention(c, s, mask=mask), (grad_input(3, 3, seed=3), grad_input(3, 3, 9)))
    assert gc(aggregate_self_attention, (grad_input(3, 3, seed=3), grad_input(3, 3, 3, 3)))
