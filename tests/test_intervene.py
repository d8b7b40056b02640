"""The overlap intervention, checked on the probabilities the model goes on with (read by a consumer after it):
the dose of soft IoU is reached, each map keeps its mass, rows keep their sums, the sham changes nothing; on a UNet,
SD3 and FLUX."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probe
from probe.analysis.overlap import center_of_mass, soft_iou
from probe.prompts import subject_keys
from probe.steer.intervene import SHAM, OverlapShift, Unit, shift, spread
from probe.tap import Call, Consumer, Tap

PROMPT = "a cat and a dog"
STEPS = 3
MOVED_STEPS = (0, 1)
TOLERANCE = {"iou": 0.01, "mass": 1e-4}


class Capture(Consumer):
    """Keeps the conditional probabilities of the wanted calls as it sees them."""

    def __init__(self, keys):
        self.keys, self.seen = set(keys), {}

    def wants(self, call: Call) -> bool:
        return call.pass_ in ("cfg", "cond") and call.layer.key in self.keys

    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        self.seen[(call.layer.name, call.step)] = (call.conditional(probs).detach().float().clone(), call.layer.grid)


def _maps(block: torch.Tensor, grid, columns) -> list[torch.Tensor]:
    """Each subject's head-mean map (h, w) of one sample's (heads, queries, keys) block: independent of the module."""
    return [block[:, :, list(c)].sum(-1).mean(0).reshape(grid) for c in columns]


def _run(pipe, dose, seed=0, angle=1.0, relative=False):
    layers = [la for la in probe.models.attention_layers(pipe) if la.kind == "cross"]
    columns, _ = subject_keys(pipe, PROMPT, ["cat", "dog"])  # on SD3 both copies of each word
    unit = Unit(tuple(columns), dose, angle, relative=relative)
    before, after = Capture([la.key for la in layers]), Capture([la.key for la in layers])
    with Tap(pipe, [before, OverlapShift(layers, MOVED_STEPS, [unit]), after]):
        image = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                     output_type="np").images[0]
    return image, before.seen, after.seen, columns, unit


@pytest.fixture(scope="module", params=["tiny", "tiny-sd3", "tiny-flux"])
def pipe(request):
    return probe.load(request.param)


def test_the_dose_is_reached_and_the_maps_keep_their_shape(pipe):
    _, natural, _, columns, _ = _run(pipe, None)
    key = next(k for k in natural if k[1] == 0)
    block, grid = natural[key]
    start = float(soft_iou(*_maps(block[0], grid, columns)))
    for target in (max(0.05, start - 0.15), min(0.95, start + 0.1)):  # pushed apart and pulled together
        _, before, after, _, unit = _run(pipe, target)
        reached = 0
        for (name, step), (moved, grid) in after.items():
            original = before[(name, step)][0]
            a0, b0 = _maps(original[0], grid, columns)
            a1, b1 = _maps(moved[0], grid, columns)
            torch.testing.assert_close(moved[0].sum(-1), original[0].sum(-1), rtol=0, atol=1e-5)  # rows keep sums
            assert (moved >= 0).all()
            if step not in MOVED_STEPS:
                assert torch.equal(moved, original)
                continue
            check = next(c for c in unit.checks if c["layer"] == name and c["step"] == step)
            achieved = float(soft_iou(a1, b1))
            assert achieved == pytest.approx(check["iou_after"], abs=1e-4)
            natural_here = float(soft_iou(a0, b0))
            if check["reachable"]:
                assert achieved == pytest.approx(target, abs=TOLERANCE["iou"]), (name, step, natural_here)
                reached += 1
            else:  # out of reach at this layer: the move went as far as it could, toward the dose
                assert abs(achieved - target) <= abs(natural_here - target) + 1e-6, (name, step, natural_here,
                                                                                   achieved, target)
            for m0, m1 in ((a0, a1), (b0, b1)):
                assert float(m1.sum()) == pytest.approx(float(m0.sum()), abs=TOLERANCE["mass"])
        assert reached >= 1 or target > start, (target, start)  # random maps: pulled together only so far


def test_a_relative_dose_moves_each_call_to_its_share_of_the_overlap_it_had(pipe):
    """×0.8 takes a fifth off each call's own soft IoU, measured on the maps the model goes on with (random tiny maps
    overlap so much that halving it or pulling them closer is mostly out of reach; the built-in model's pilot checks
    both directions)."""
    for factor in (0.8, 0.9):
        _, before, after, columns, unit = _run(pipe, factor, relative=True)
        reached = 0
        for check in unit.checks:
            moved, grid = after[(check["layer"], check["step"])]
            natural = float(soft_iou(*_maps(before[(check["layer"], check["step"])][0][0], grid, columns)))
            achieved = float(soft_iou(*_maps(moved[0], grid, columns)))
            assert natural == pytest.approx(check["iou_before"], abs=1e-4)
            if check["reachable"]:
                assert achieved == pytest.approx(factor * natural, abs=TOLERANCE["iou"])
                reached += 1
        assert reached >= 1, factor


def test_the_sham_runs_the_same_code_and_changes_nothing(pipe):
    none_image, _, none_after, _, _ = _run(pipe, None)
    sham_image, _, sham_after, _, unit = _run(pipe, SHAM)
    np.testing.assert_array_equal(sham_image, none_image)
    assert unit.checks and all(c["sigma"] == 0 and c["iou_after"] == c["iou_before"] for c in unit.checks)
    for key, (block, _) in none_after.items():
        assert torch.equal(sham_after[key][0], block)
    moved_image, *_ = _run(pipe, 0.05)
    assert np.abs(moved_image - none_image).max() > 0  # a real dose changes the image


def test_shift_keeps_mass_and_moves_the_centre():
    torch.manual_seed(0)
    blob = torch.zeros(16, 16)
    blob[5:8, 4:8] = torch.rand(3, 4) + 0.5
    for dy, dx in ((0.0, 0.0), (2.0, -3.0), (1.5, 0.25), (-3.75, 7.5)):
        moved = shift(blob, torch.tensor([dy, dx]))[0]
        assert float(moved.sum()) == pytest.approx(float(blob.sum()), rel=1e-6)
        expected = center_of_mass(blob) + torch.tensor([dy, dx])
        assert torch.allclose(center_of_mass(moved), expected, atol=1e-4)  # no wrap for these moves
        if dy == int(dy) and dx == int(dx):
            assert torch.equal(moved, torch.roll(blob, (int(dy), int(dx)), (0, 1)))
    assert math.isclose(float(spread(shift(blob, torch.tensor([3.0, 3.0]))[0])), float(spread(blob)), rel_tol=1e-5)
