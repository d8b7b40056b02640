"""Hand-checked values for probe.analysis.overlap; tiny tensors only."""

import math

import pytest
import torch
from tensors import F64, grad_input, rand

from probe.analysis.overlap import (
    ae_loss,
    ae_response,
    aggregation_loss,
    center_of_mass,
    com_distance,
    compactness,
    find_peaks,
    intensity,
    isolation_loss,
    kl_divergence,
    pair_indices,
    pair_overlap,
    pairwise,
    self_cross_overlap,
    soft_iou,
    spread,
)

DIRECTIONS = ("ab", "ba", "sym")


pytestmark = pytest.mark.usefixtures("one_thread")


def box(top: int, left: int, height: int, width: int, size: tuple[int, int] = (4, 4)) -> torch.Tensor:
    m = torch.zeros(size, dtype=F64)
    m[top : top + height, left : left + width] = 1
    return m


def hot(*pixels: tuple[int, int, float], size: tuple[int, int] = (4, 5)) -> torch.Tensor:
    m = torch.zeros(size, dtype=F64)
    for y, x, value in pixels:
        m[y, x] = value
    return m


# ---- overlap and divergence ---------------------------------------------------------------------------------------


def test_soft_iou_hand_values() -> None:
    assert soft_iou(box(0, 0, 2, 2), box(2, 2, 2, 2)).item() == 0  # disjoint squares
    a = rand(4, 4)
    assert soft_iou(a, a).item() == pytest.approx(1.0)
    assert soft_iou(box(0, 0, 2, 2), box(0, 1, 2, 2)).item() == pytest.approx(2 / 6)  # 2 shared of 6 pixels
    graded_a = torch.tensor([[1.0, 0.0], [2.0, 2.0]], dtype=F64)
    graded_b = torch.tensor([[0.0, 1.0], [1.0, 3.0]], dtype=F64)
    assert soft_iou(graded_a, graded_b, norm="none").item() == pytest.approx(3 / 7)  # (0+0+1+2) / (1+1+2+3)


def test_soft_iou_minmax_ignores_floor() -> None:
    floor = 0.2
    a, b = box(0, 0, 2, 2) + floor, box(2, 2, 2, 2) + floor
    assert soft_iou(a, b).item() == pytest.approx(0.0)
    assert soft_iou(a, b, norm="none").item() == pytest.approx(16 * floor / (8 * (1 + floor) + 8 * floor))


def test_kl_divergence_hand_values() -> None:
    a = torch.ones(2, 2, dtype=F64)  # p = 1/4 everywhere
    b = torch.tensor([[1.0, 1.0], [1.0, 5.0]], dtype=F64)  # q = 1/8, 1/8, 1/8, 5/8
    ab = 0.75 * math.log(2) + 0.25 * math.log(0.4)
    ba = 0.375 * math.log(0.5) + 0.625 * math.log(2.5)
    assert kl_divergence(a, b, "ab").item() == pytest.approx(ab, rel=1e-4)
    assert kl_divergence(a, b, "ba").item() == pytest.approx(ba, rel=1e-4)
    assert kl_divergence(a, b, "sym").item() == pytest.approx((ab + ba) / 2, rel=1e-4)
    same = rand(3, 3)
    for direction in DIRECTIONS:
        assert kl_divergence(same, 2 * same, direction).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        kl_divergence(a, b, "up")  # type: ignore[arg-type]


def test_pair_overlap_reads_centres_and_kl_without_the_floor() -> None:
    # two corner peaks of 1 on a flat floor of 0.1 (4x5 map, diagonal 5): raw centres sit near the middle
    a, b = hot((0, 0, 1.0)) + 0.1, hot((3, 4, 1.0)) + 0.1
    stats = pair_overlap(a, b)
    assert com_distance(a, b).item() < 0.5  # the floor pulls both centres inwards
    assert stats["com_distance"].item() == pytest.approx(1.0)  # min-max: the peaks alone, corner to corner
    # min-max maps are one-hot: KL = log(1 / eps) each way, exactly as kl_divergence of the one-hot maps
    assert stats["kl_sym"].item() == pytest.approx(kl_divergence(hot((0, 0, 1.0)), hot((3, 4, 1.0)), "sym").item())
    assert stats["soft_iou"].item() == pytest.approx(0.0, abs=1e-9)
    # cosine and compactness on the raw maps: a·b = 0.1·2·1.1 + 18·0.01 = 0.4, |a|² = 1.21 + 19·0.01 = 1.4
    assert stats["cosine"].item() == pytest.approx(0.4 / 1.4)
    assert stats["compactness"].item() == pytest.approx(compactness(a, b).item())


# ---- position and shape -------------------------------------------------------------------------------------------


def test_center_of_mass_and_distance() -> None:
    assert center_of_mass(hot((1, 2, 0.3))).tolist() == pytest.approx([1.0, 2.0])
    assert center_of_mass(hot((0, 0, 1.0), (2, 4, 3.0))).tolist() == pytest.approx([1.5, 3.0])
    # 4x5 map: diagonal sqrt(3² + 4²) = 5
    assert com_distance(hot((0, 0, 1.0)), hot((3, 4, 1.0))).item() == pytest.approx(1.0)
    assert com_distance(hot((0, 0, 1.0)), hot((0, 2, 0.5))).item() == pytest.approx(2 / 5)
    assert com_distance(hot((1, 1, 1.0)), hot((1, 1, 9.0))).item() == pytest.approx(0.0)


def test_spread_two_points() -> None:
    # weights 1/4 at x=0 and 3/4 at x=4: centre x=3, variance 1/4·9 + 3/4·1 = 3 (= p1·p2·d²)
    assert spread(hot((0, 0, 1.0), (0, 4, 3.0))).item() == pytest.approx(3.0)
    assert spread(hot((2, 2, 1.0))).item() == pytest.approx(0.0)
    assert spread(box(0, 0, 2, 2)).item() == pytest.approx(0.5)  # offsets (±½, ±½)


def test_intensity_is_raw_mean() -> None:
    assert intensity(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).item() == pytest.approx(3.0)


def test_compactness_hand_value_and_direction() -> None:
    size = (8, 8)
    # two uniform 2x2 blocks 6 px apart: (√0.5 + √0.5) / 6
    far = compactness(box(3, 0, 2, 2, size), box(3, 6, 2, 2, size))
    assert far.item() == pytest.approx(2 * math.sqrt(0.5) / 6, rel=1e-5)
    close_spread = compactness(box(0, 0, 8, 4, size) + box(2, 2, 4, 2, size), box(0, 3, 8, 4, size))
    assert close_spread.item() > 1 > far.item()


# ---- Attend-and-Excite --------------------------------------------------------------------------------------------


def test_ae_response_and_loss() -> None:
    maps = torch.zeros(3, 2, 2, dtype=F64)
    maps[0, 0, 1], maps[1, 1, 0], maps[2, 1, 1] = 0.9, 0.4, 0.8
    assert ae_response(maps).tolist() == pytest.approx([0.1, 0.6, 0.2])
    assert ae_loss(maps).item() == pytest.approx(0.6)  # the most neglected subject
    assert ae_response(torch.full((2, 2), 1.5)).item() == 0  # A&E's max(0, ·)


# ---- pairs and Self-Cross -----------------------------------------------------------------------------------------


def test_pairwise_order_and_values() -> None:
    assert pair_indices(3) == [(0, 1), (0, 2), (1, 2)]
    maps = rand(2, 3, 4, 4)
    out = pairwise(soft_iou, maps)
    assert out.shape == (2, 3)
    for p, (i, j) in enumerate(pair_indices(3)):
        assert torch.allclose(out[:, p], soft_iou(maps[:, i], maps[:, j]))
    assert pairwise(com_distance, rand(1, 4, 4)).shape == (0,)


def test_self_cross_overlap_hand_value() -> None:
    cross = torch.stack([hot((0, 0, 1.0), size=(2, 2)), hot((1, 1, 1.0), size=(2, 2))])
    selfs = torch.tensor([[[1.0, 0.5], [0.0, 0.25]], [[0.5, 0.0], [0.0, 1.0]]], dtype=F64)
    # min(A^s_0, A^c_1) = 0.25 at (1,1); min(A^c_0, A^s_1) = 0.5 at (0,0)
    assert self_cross_overlap(cross, selfs).item() == pytest.approx(0.75)
    assert self_cross_overlap(3 * cross, 2 * selfs).item() == pytest.approx(0.75)  # max-normalised
    assert self_cross_overlap(cross[:1], selfs[:1]).item() == 0  # one subject: no pairs, no loss


def test_self_cross_overlap_mean_over_pairs() -> None:
    cross, selfs = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    c, s = cross / cross.amax((-2, -1), keepdim=True), selfs / selfs.amax((-2, -1), keepdim=True)
    expected = torch.stack(
        [
            torch.minimum(s[:, i], c[:, j]).sum((-2, -1)) + torch.minimum(c[:, i], s[:, j]).sum((-2, -1))
            for i, j in pair_indices(3)
        ],
        dim=-1,
    ).mean(-1)
    assert torch.allclose(self_cross_overlap(cross, selfs), expected)


# ---- AI-T2I: peaks, aggregation, isolation ------------------------------------------------------------------------


def test_find_peaks_nms() -> None:
    m = 0.01 * rand(8, 8)
    m[1, 1], m[1, 2] = 0.9, 0.7  # (1,2) is on the main peak's slope, not a peak
    m[5, 6], m[6, 1] = 0.5, 0.3
    peaks = find_peaks(m, k=3, suppress_radius=1)
    assert peaks.positions.tolist() == [[1, 1], [5, 6], [6, 1]]
    assert peaks.values.tolist() == pytest.approx([0.9, 0.5, 0.3])
    assert peaks.valid.all()


def test_find_peaks_missing_and_batched() -> None:
    single = hot((2, 3, 1.0), size=(5, 5))
    peaks = find_peaks(single, k=3, suppress_radius=1)
    assert peaks.valid.tolist() == [True, False, False]
    assert peaks.values.tolist() == [1.0, 0.0, 0.0] and peaks.positions.tolist() == [[2, 3]] * 3
    maps = rand(2, 3, 6, 6)
    batched = find_peaks(maps, k=3, suppress_radius=1)
    assert batched.values.shape == (2, 3, 3) and batched.positions.shape == (2, 3, 3, 2)
    for i in range(2):
        for j in range(3):
            one = find_peaks(maps[i, j], k=3, suppress_radius=1)
            assert torch.equal(batched.positions[i, j], one.positions) and torch.equal(batched.values[i, j], one.values)


def gaussian_blob(cy: float, cx: float, sigma: float, size: int = 9) -> torch.Tensor:
    ys = torch.arange(size, dtype=F64)[:, None]
    xs = torch.arange(size, dtype=F64)[None, :]
    return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


def test_aggregation_loss() -> None:
    assert aggregation_loss(gaussian_blob(4, 4, 1.5)).item() == 0  # one peak, nothing to pull together
    fragments = hot((0, 0, 1.0), (0, 8, 0.5), size=(9, 9))
    # weight 0.5 / 1.5, gap 8 px over diagonal 8√2
    assert aggregation_loss(fragments).item() == pytest.approx(1 / 3 / math.sqrt(2))
    split = gaussian_blob(2, 2, 1.0) + 0.6 * gaussian_blob(6, 7, 1.0)
    assert aggregation_loss(split).item() > 0.1


def test_isolation_loss() -> None:
    size = (5, 5)  # diagonal 4√2
    close = torch.stack([hot((0, 0, 1.0), size=size), hot((0, 2, 1.0), size=size)])
    far = torch.stack([hot((0, 0, 1.0), size=size), hot((4, 4, 1.0), size=size)])
    hinge = 0.5 - 2 / (4 * math.sqrt(2))  # centres 2 px apart
    assert isolation_loss(close, margin=0.5).item() == pytest.approx(hinge)
    assert isolation_loss(far, margin=0.5).item() == 0
    assert isolation_loss(close, margin=0.5, softness=1e-3).item() == pytest.approx(hinge, abs=1e-3)
    assert isolation_loss(close[:1]).item() == 0
    three = torch.stack([close[0], close[1], far[1]])  # pairs: 0.354, 1, 0.79 of the diagonal
    assert isolation_loss(three, margin=0.5).item() == pytest.approx(hinge / 3)


# ---- batching, dtypes, gradients ----------------------------------------------------------------------------------

TWO_MAP = [soft_iou, lambda a, b: soft_iou(a, b, norm="max"), com_distance, compactness] + [
    lambda a, b, d=d: kl_divergence(a, b, d) for d in DIRECTIONS
]
ONE_MAP = [center_of_mass, spread, intensity, ae_response, lambda m: aggregation_loss(m, k=3, suppress_radius=1)]
STACKED = [ae_loss, isolation_loss, lambda m: self_cross_overlap(m, m.flip(-1))]


@pytest.mark.parametrize("fn", TWO_MAP)
def test_two_map_batch_equals_per_map(fn) -> None:
    a, b = rand(2, 3, 5, 5), rand(2, 3, 5, 5, seed=1)
    out = fn(a, b)
    assert out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(out[i, j], fn(a[i, j], b[i, j]))


@pytest.mark.parametrize("fn", ONE_MAP)
def test_one_map_batch_equals_per_map(fn) -> None:
    maps = rand(2, 3, 5, 5)
    out = fn(maps)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(out[i, j], fn(maps[i, j]))


@pytest.mark.parametrize("fn", STACKED)
def test_stacked_batch_equals_per_prompt(fn) -> None:
    maps = rand(2, 3, 5, 5)
    out = fn(maps)
    assert out.shape == (2,)
    for i in range(2):
        assert torch.allclose(out[i], fn(maps[i]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_low_precision_dtypes(dtype: torch.dtype) -> None:
    a, b = rand(2, 6, 6, dtype=dtype), rand(2, 6, 6, seed=1, dtype=dtype)
    for out in (*(fn(a, b) for fn in TWO_MAP), *(fn(a) for fn in ONE_MAP), *(fn(a[None]) for fn in STACKED)):
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_gradcheck() -> None:
    gc = torch.autograd.gradcheck
    for fn in TWO_MAP:
        assert gc(fn, (grad_input(2, 4, 4), grad_input(2, 4, 4, seed=1)))
    for fn in ONE_MAP:
        assert gc(fn, grad_input(2, 5, 5))
    for fn in STACKED:
        assert gc(fn, grad_input(3, 4, 4))
    assert gc(lambda m: isolation_loss(m, margin=0.9, softness=0.1), grad_input(3, 4, 4))
    assert gc(lambda m: isolation_loss(m, margin=0.9), grad_input(3, 4, 4))  # hinge active: centres are close
    assert gc(self_cross_overlap, (grad_input(3, 4, 4), grad_input(3, 4, 4, seed=1)))
    assert gc(lambda m: pairwise(soft_iou, m), grad_input(3, 4, 4))
    assert gc(lambda m: find_peaks(m, k=3, suppress_radius=1).values, grad_input(5, 5))


def test_cosine_similarity_and_the_cosine_isolation_by_hand():
    from probe.analysis.overlap import cosine_similarity, isolation_loss

    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert float(cosine_similarity(a, b)) == pytest.approx(1 / 2**0.5)  # (1·1) / (1 · √2)
    assert float(cosine_similarity(a, 5 * a)) == pytest.approx(1.0) and float(cosine_similarity(a, c)) == 0.0
    three = torch.stack([a, b, c])  # pairs ab, ac, bc: 1/√2, 0, 0
    assert float(isolation_loss(three, form="cosine")) == pytest.approx(1 / 2**0.5 / 3)
    with pytest.raises(ValueError, match="'distance' or 'cosine'"):
        isolation_loss(three, form="angle")
