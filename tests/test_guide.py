"""Guided generation: objectives descend, A&E matches diffusers, bad steps are skipped, subjects resolve clearly."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import StableDiffusionAttendAndExcitePipeline
from tensors import assert_a_small_step_descends

from probe.analysis.maps import gaussian_smooth
from probe.analysis.overlap import ae_loss
from probe.prompts import (
    FILE_SETS,
    SHAPES_SETS,
    attributes_of,
    prompt_set,
    prompt_tokens,
    subject_indices,
    subjects_of,
    word_positions,
)
from probe.shapes.world import SIMILAR_COLOURS, SIMILAR_SHAPES
from probe.steer.guide import OBJECTIVES, GuidanceMaps, Guide, InitNO, Schedule, as_objective, generate, response

PROMPT, SUBJECTS = "a cat and a dog", ["cat", "dog"]
SEED = 3
PARITY_TOLERANCE = 1e-4
EVERY_STEP = Schedule(thresholds={}, alter_fraction=1.0)  # one plain step at every step, no refinement


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def _plain_latents(pipe, steps, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
                output_type="latent").images


# -- objectives -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, schedule",
    [(name, Schedule()) for name in OBJECTIVES]
    + [("self_cross", Schedule(response_top_k=4)), ({"ae": 1, "iou": 1}, Schedule())],
    ids=[*OBJECTIVES, "self_cross-top4", "ae+iou"],
)
def test_a_small_step_lowers_each_objective(tiny, latent, spec, schedule):
    with Guide(tiny, PROMPT, SUBJECTS, spec, schedule, steps=10) as guide:
        assert_a_small_step_descends(guide, latent, (16, 16))


def test_self_cross_collects_the_self_attention_of_the_same_grid(tiny, latent):
    with Guide(tiny, PROMPT, SUBJECTS, "self_cross", steps=10) as guide:
        _, maps = guide.evaluate(latent, 0)
    with Guide(tiny, PROMPT, SUBJECTS, "ae", steps=10) as guide:
        _, plain = guide.evaluate(latent, 0)
    assert maps.self_attention.shape == (1, 256, 256)
    torch.testing.assert_close(maps.self_attention.sum(-1), torch.ones(1, 256))  # rows of probabilities
    assert plain.self_attention is None  # not asked for, not computed


def test_objective_values_on_hand_made_maps():
    corner = torch.zeros(1, 2, 8, 8)
    corner[0, 0, 0, 0], corner[0, 1, 7, 7] = 1.0, 1.0
    apart = GuidanceMaps(corner, None, None, Schedule())
    same = GuidanceMaps(corner[:, :1].expand(1, 2, 8, 8), None, None, Schedule())
    assert OBJECTIVES["iou"](apart).item() == pytest.approx(0.0)
    assert OBJECTIVES["iou"](same).item() == pytest.approx(1.0)
    assert OBJECTIVES["com"](apart).item() == pytest.approx(0.0, abs=1e-6)  # opposite corners: distance 1
    assert OBJECTIVES["com"](same).item() == pytest.approx(1.0)
    assert OBJECTIVES["kl"](same).item() == pytest.approx(1.0)
    assert OBJECTIVES["kl"](apart).item() < 1e-3
    assert OBJECTIVES["ae"](apart).item() == pytest.approx(0.0)  # both peaks reach 1

    maps = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    m = GuidanceMaps(maps, None, None, Schedule())
    weighted = as_objective({"ae": 1, "iou": 2})
    torch.testing.assert_close(weighted(m), OBJECTIVES["ae"](m) + 2 * OBJECTIVES["iou"](m))
    torch.testing.assert_close(response(maps, 1), ae_loss(maps))
    top3 = maps.flatten(-2).sort(-1, descending=True).values[..., :3].mean(-1)
    torch.testing.assert_close(response(maps, 3), (1 - top3).amax(-1))
    with pytest.raises(ValueError, match="unknown objective 'nope'.*'ae'"):
        as_objective("nope")


# -- Attend-and-Excite parity ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside diffusers' GaussianSmoothing
def test_ae_reproduces_diffusers_attend_and_excite(tiny):
    steps, alter, thresholds = 6, 3, {0: 0.05, 4: 0.8}  # refinement with a step (0) and without one (4)
    reference = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in tiny.components.items()
                                                          if k != "image_encoder"})
    reference.set_progress_bar_config(disable=True)
    indices = [i for (i,) in subject_indices(tiny, PROMPT, SUBJECTS)]
    assert indices == [2, 5]  # positions in the 77-token sequence, start token at 0
    expected = reference(PROMPT, token_indices=indices, num_inference_steps=steps, output_type="latent",
                         generator=torch.Generator().manual_seed(SEED), max_iter_to_alter=alter,
                         thresholds=thresholds).images
    ours = generate(tiny, PROMPT, subjects=SUBJECTS, seed=SEED, steps=steps, output_type="latent", progress=False,
                    schedule=Schedule(thresholds=thresholds, alter_fraction=alter / steps, tokens="diffusers"))
    assert (ours.latents - expected).abs().max() < PARITY_TOLERANCE
    assert (_plain_latents(tiny, steps) - expected).abs().max() > 0.1  # guidance did change the result
    history = ours.history
    assert history.step.tolist() == [0, 1, 2, 4]  # steps 0-2 step, 4 only refines
    assert history.refinement_iterations.tolist() == [20, 0, 0, 20]  # a random model hits the cap of 20
    assert history.step_size.tolist() == pytest.approx([20.0, 20 * 0.9**0.5, 20 * 0.8**0.5, 0.0])
    assert ((history["max_attention[cat]"] > 0) & (history["max_attention[cat]"] <= 1)).all()
    assert (history.loss - (1 - history[["max_attention[cat]", "max_attention[dog]"]].min(axis=1))).abs().max() < 1e-6


# -- failures are safe ------------------------------------------------------------------------------------------------


class _LateNanLoss:
    """Finite (with a zero gradient: the latent stays as it was) at the first evaluation, NaN afterwards; a loss that
    is NaN from the first evaluation on is an error (tests/test_bad_inputs_generation.py)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, maps):
        self.calls += 1
        return maps.subjects.sum((-3, -2, -1)) * (0.0 if self.calls == 1 else float("nan"))


def _nan_gradient(maps):
    return 1 + torch.sqrt(maps.subjects.sum((-3, -2, -1)) * 0)  # finite loss, d sqrt(0) = inf · 0 = nan


@pytest.mark.parametrize(
    "spec, schedule, why",
    [(_LateNanLoss(), EVERY_STEP, "loss"), (_nan_gradient, EVERY_STEP, "gradient"),
     ("ae", Schedule(thresholds={}, alter_fraction=1.0, scale_factor=float("inf")), "updated latent")],
    ids=["loss", "gradient", "latent"],
)
def test_non_finite_steps_are_skipped_with_a_warning(tiny, spec, schedule, why):
    steps = 3
    with pytest.warns(RuntimeWarning, match=f"{why} is not finite; the latent is left unchanged"):
        result = generate(tiny, PROMPT, subjects=SUBJECTS, objective=spec, seed=SEED, steps=steps, schedule=schedule,
                          output_type="np", progress=False)
    assert np.isfinite(result.images).all()
    assert torch.isfinite(result.latents).all()
    torch.testing.assert_close(result.latents, _plain_latents(tiny, steps))  # every step skipped: plain sampling
    assert result.history.skipped.tolist() == ([0] + [1] * (steps - 1) if why == "loss" else [1] * steps)


# -- subjects -------------------------------------------------------------------------------------------------------


def test_a_subject_not_in_the_prompt_is_a_clear_error(tiny):
    tokens = r"\['<\|startoftext\|>', 'a', 'cat', 'and', 'a', 'dog', '<\|endoftext\|>'\]"
    with pytest.raises(ValueError, match=f"subject 'cow' is not a word of the prompt 'a cat and a dog'.*{tokens}"):
        generate(tiny, PROMPT, subjects=["cat", "cow"], seed=0, steps=2, progress=False)
    with pytest.raises(ValueError, match="listed more often than the prompt .* holds it"):
        subject_indices(tiny, PROMPT, ["cat", "cat"])


def test_multi_piece_and_repeated_subjects(tiny, latent):
    prompt = "a hamster and a cat"
    assert prompt_tokens(tiny, prompt)[2:7] == ["h", "am", "s", "t", "er"]
    assert word_positions(tiny, prompt) == list(range(1, len(prompt_tokens(tiny, prompt)) - 1))
    assert subject_indices(tiny, prompt, ["hamster", "cat"]) == [[2, 3, 4, 5, 6], [9]]
    assert subject_indices(tiny, "a red circle and an orange circle", ["circle", "circle"]) == [[3], [7]]
    with Guide(tiny, prompt, ["hamster", "cat"], steps=10) as guide:
        _, maps = guide.evaluate(latent, 0)
    words = maps.cross[..., 1:len(prompt_tokens(tiny, prompt)) - 1]  # the official A&E: words only
    expected = gaussian_smooth((100 * words).softmax(-1)[..., 1:6].mean(-1))  # the mean of the word's pieces
    torch.testing.assert_close(maps.subjects[:, 0], expected)


def test_left_padding_moves_subject_positions_with_the_prompt(tiny_left):
    ids = tiny_left.tokenizer(PROMPT, padding="max_length", max_length=tiny_left.tokenizer.model_max_length).input_ids
    cat, dog = subject_indices(tiny_left, PROMPT, SUBJECTS)
    assert [tiny_left.tokenizer.convert_ids_to_tokens(ids[i[0]]) for i in (cat, dog)] == ["cat</w>", "dog</w>"]
    assert word_positions(tiny_left, PROMPT) == list(range(len(ids) - 6, len(ids) - 1))


def test_prompt_sets_and_their_subjects(tiny):
    assert subjects_of("a monkey and a red car") == ["monkey", "car"]
    assert attributes_of("a monkey and a red car") == ["", "red"]
    assert subjects_of("a horse with a glasses") == ["horse", "glasses"]
    assert subjects_of("a horse and a donkey and zebra") == ["horse", "donkey", "zebra"]
    sizes = {"animals": 66, "animals_objects": 144, "objects": 66, "SSD-2": 31, "SSD-3": 22}
    for name in FILE_SETS:
        ds = prompt_set(name)
        assert len(ds) == sizes[name] and set(ds.column_names) == {"prompt", "subjects", "attributes", "set"}
        expected_count = 3 if name == "SSD-3" else 2
        for row in ds:
            assert len(row["subjects"]) == expected_count
            for idx in subject_indices(tiny, row["prompt"], row["subjects"]):
                assert len(idx) == 1  # the project tokenizer has every word of these lists as one token
    for name, (n_objects, similar) in SHAPES_SETS.items():
        ds = prompt_set(name, n=8)
        assert ds["prompt"] == prompt_set(name, n=8)["prompt"]  # deterministic
        assert all(len(s) == n_objects for s in ds["subjects"])
        if similar:
            confusable = {frozenset(p) for p in SIMILAR_COLOURS + SIMILAR_SHAPES}
            for colours, shapes in zip(ds["attributes"], ds["subjects"]):
                assert frozenset(colours) in confusable or frozenset(shapes) in confusable
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        prompt_set("nope")


# -- initial noise and other pipelines --------------------------------------------------------------------------------


def test_initno_lowers_the_first_step_objective(tiny, latent):
    settings = InitNO(rounds=1, steps=3, final_steps=3, target=0.0)
    with Guide(tiny, PROMPT, SUBJECTS, "iou", steps=10) as guide:
        z, rounds = guide.optimise_noise(latent, settings, draw=lambda: torch.randn_like(latent))
        with torch.no_grad():
            before, _ = guide.evaluate(latent, 0)
            after, _ = guide.evaluate(z, 0)
        reached, _ = guide.optimise_noise(latent, InitNO(target=2.0), draw=lambda: torch.randn_like(latent))
    assert after < before
    assert 0 < (z - latent).pow(2).mean() < 0.01  # the KL bound keeps it a plausible sample of the same noise
    assert rounds["round"].tolist() == [0, "final (from 0)"] and not rounds.reached_target.any()
    assert torch.equal(reached, latent)  # already below target: nothing to optimise
    with Guide(tiny, PROMPT, SUBJECTS, "iou", steps=10) as guide:
        with torch.no_grad():
            start, _ = guide.evaluate(latent, 0)
        z, rounds = guide.optimise_noise(latent, InitNO(rounds=2, steps=20, relative=0.01, lr=0.1),
                                         draw=lambda: torch.randn_like(latent))
        with torch.no_grad():
            end, _ = guide.evaluate(z, 0)
    # relative criterion: accepted once the objective is 1% below the seed's own noise's
    assert rounds.threshold.iloc[0] == pytest.approx(0.99 * start.item())
    assert rounds.reached_target.iloc[0] and rounds.loss.iloc[0] <= rounds.threshold.iloc[0]
    assert end.item() == pytest.approx(rounds.loss.iloc[0], rel=1e-4) and end < start


def test_generate_with_initno_and_on_sdxl(tiny, tiny_xl):
    steps = 2
    result = generate(tiny, PROMPT, subjects=SUBJECTS, seed=SEED, steps=steps, progress=False, schedule=EVERY_STEP,
                      init_noise=InitNO(rounds=1, steps=1, final_steps=1), output_type="latent")
    assert len(result.init_history) == 2 and len(result.history) == steps
    with pytest.raises(ValueError, match="init_noise must be"):
        generate(tiny, PROMPT, subjects=SUBJECTS, seed=SEED, steps=steps, progress=False, init_noise="nope")
    xl = generate(tiny_xl, PROMPT, subjects=SUBJECTS, seed=SEED, steps=steps, progress=False, schedule=EVERY_STEP,
                  output_type="latent")
    plain = _plain_latents(tiny_xl, steps)
    assert torch.isfinite(xl.latents).all() and xl.history.loss.between(0, 1).all()
    assert (xl.latents - plain).abs().max() > 1e-3  # guidance acted through SDXL's own conditioning


def test_a_guide_outside_its_context_is_a_clear_error(tiny, latent):
    with pytest.raises(RuntimeError, match="inside its context"):
        Guide(tiny, PROMPT, SUBJECTS, steps=10).evaluate(latent, 0)
