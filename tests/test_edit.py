"""Attention-injection editing, DDIM inversion and the edit study, against independent computations."""

import math

import numpy as np
import pytest
import torch

import probe
from probe.models import Layer, attention_layers, latent_size
from probe.shapes.world import Shape, render
from probe.steer.edit import COLUMNS, EDITS, LAYER_SETS, compare, edit, injected_layers, study
from probe.steer.inversion import (
    Inversion,
    clean_and_noise,
    decode,
    encode,
    invert,
    psnr,
    reconstruction_psnr,
    regenerate,
)
from probe.tap import Call, Consumer

STEPS = 4
SEED = 3
SOURCE, TARGET = "a red circle", "a blue square"
LATENT_TOLERANCE = 1e-4  # explicit probabilities vs SDPA and batch 2 vs 1 differ by float rounding only
IMAGE_TOLERANCE = 1e-5


def _plain(pipe, prompt, steps=STEPS, guidance_scale=7.5, **kwargs):
    generator = torch.Generator("cpu").manual_seed(SEED)
    return pipe(prompt, generator=generator, num_inference_steps=steps, guidance_scale=guidance_scale,
                **kwargs).images[0]


def _circle(size=32, colour="red", cx=30.0):
    return render([Shape("circle", colour, cx, 32.0, 12.0)], size=size)[0]


class Keep(Consumer):
    """Keeps the probabilities it sees for every call of the given kinds."""

    def __init__(self, kinds=("self", "cross")):
        self.kinds, self.seen = kinds, {}

    def wants(self, call: Call) -> bool:
        return call.layer.kind in self.kinds

    def on_probs(self, call, probs):
        self.seen[call.layer.name, call.step] = probs


# -- identities -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inject", ["self", "cross"])
def test_injection_with_source_equal_to_target_is_the_plain_generation(tiny, inject):
    latents = edit(tiny, SOURCE, SOURCE, seed=SEED, inject=inject, inject_steps=1.0, steps=STEPS,
                   output_type="latent")
    plain = _plain(tiny, SOURCE, output_type="latent")
    assert latents.settings.steps == tuple(range(STEPS)) and latents.settings.layers
    torch.testing.assert_close(latents.edited, plain, atol=LATENT_TOLERANCE, rtol=0)
    torch.testing.assert_close(latents.source, plain, atol=LATENT_TOLERANCE, rtol=0)
    images = edit(tiny, SOURCE, SOURCE, seed=SEED, inject=inject, inject_steps=1.0, steps=STEPS,
                  output_type="np")
    np.testing.assert_allclose(images.edited, _plain(tiny, SOURCE, output_type="np"), atol=IMAGE_TOLERANCE)


def test_without_injection_both_rows_are_their_plain_generations(tiny):
    result = edit(tiny, SOURCE, TARGET, seed=SEED, inject="none", steps=STEPS, output_type="np")
    np.testing.assert_allclose(result.edited, _plain(tiny, TARGET, output_type="np"), atol=IMAGE_TOLERANCE)
    np.testing.assert_allclose(result.source, _plain(tiny, SOURCE, output_type="np"), atol=IMAGE_TOLERANCE)
    assert result.settings.layers == () and result.settings.steps == ()
    assert np.abs(result.edited - result.source).max() > 1e-3  # the prompts do differ


def test_editing_runs_on_sdxl_too(tiny_xl):
    result = edit(tiny_xl, SOURCE, SOURCE, seed=SEED, inject_steps=1.0, steps=2, guidance_scale=5.0,
                  output_type="latent")
    plain = _plain(tiny_xl, SOURCE, steps=2, guidance_scale=5.0, output_type="latent")
    torch.testing.assert_close(result.edited, plain, atol=LATENT_TOLERANCE, rtol=0)


# -- what the injector does -------------------------------------------------------------------------------


def test_injected_probabilities_are_the_sources_in_chosen_layers_and_steps_only(tiny):
    before, after = Keep(), Keep()
    chosen_steps = [1, 2]
    result = edit(tiny, SOURCE, TARGET, seed=SEED, layers=[16], inject_steps=chosen_steps, steps=STEPS,
                  before=[before], after=[after], output_type="latent")
    chosen = set(result.settings.layers)
    assert chosen == {la.name for la in attention_layers(tiny) if la.kind == "self" and la.grid == (16, 16)}
    assert result.settings.steps == tuple(chosen_steps)
    assert set(before.seen) == set(after.seen) and len(after.seen) == len(attention_layers(tiny)) * STEPS
    # batch with CFG: [uncond_src, uncond_tgt, cond_src, cond_tgt]
    differing_elsewhere = 0
    for (name, step), pre in before.seen.items():
        post = after.seen[name, step]
        if name in chosen and step in chosen_steps:
            assert torch.equal(post[3], pre[2])  # target conditional := source conditional
            assert torch.equal(post[:3], pre[:3])  # source and the unconditional half untouched
            assert not torch.equal(pre[3], pre[2])
        else:
            assert post is pre  # the injector did not even copy it
            differing_elsewhere += not torch.equal(pre[3], pre[2])
    assert differing_elsewhere > 0  # the untouched target rows had their own probabilities


def test_injected_probabilities_equal_the_recorded_source(tiny):
    """The target's self-attention after injection = what probe.record keeps for the source alone."""
    after = Keep(kinds=("self",))
    edit(tiny, SOURCE, TARGET, seed=SEED, layers=[16], inject_steps=[0, 2], steps=STEPS, after=[after],
         output_type="latent")
    tree = probe.record(tiny, SOURCE, seeds=[SEED], steps=STEPS, kinds=("self",), layers=[16], keep_steps=[0, 2],
                        progress=False)
    recorded = tree["self/res16"]["attn"]
    for name in recorded.layer.values:
        for step in (0, 2):
            target = after.seen[name, step][3].float().mean(0).reshape(16, 16, 16, 16)
            source = torch.from_numpy(recorded.sel(sample=0, step=step, layer=name).values.astype(np.float32))
            torch.testing.assert_close(target, source, atol=2e-3, rtol=1e-2)  # float16 storage


def test_shared_token_cross_injection_keeps_the_targets_own_word_columns(tiny):
    before, after = Keep(kinds=("cross",)), Keep(kinds=("cross",))
    result = edit(tiny, SOURCE, "a blue circle", seed=SEED, inject="cross", cross_tokens="shared", inject_steps=[0],
                  steps=2, before=[before], after=[after], output_type="latent")
    ids = [tiny.tokenizer(p, padding="max_length").input_ids for p in (SOURCE, "a blue circle")]
    swapped = [k for k, (a, b) in enumerate(zip(*ids)) if a != b]
    assert swapped == [2]  # <start> a red|blue circle <end> …
    for name in result.settings.layers:
        pre, post = before.seen[name, 0], after.seen[name, 0]
        shared = [k for k in range(pre.shape[-1]) if k not in swapped]
        assert torch.equal(post[3][..., shared], pre[2][..., shared])
        assert torch.equal(post[3][..., swapped], pre[3][..., swapped])


# -- inversion ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blind():
    """The tiny pipeline with a denoiser whose prediction ignores the latent: DDIM inversion is then exact."""
    pipe = probe.load("tiny")
    with torch.no_grad():
        pipe.unet.conv_in.weight.zero_()
        pipe.unet.conv_in.bias.zero_()
    return pipe


def test_inversion_is_exact_when_the_prediction_ignores_the_latent(blind):
    image = _circle()
    inversion = invert(blind, image, SOURCE, steps=10)
    assert inversion.latents.shape == (11, 4, 16, 16)
    torch.testing.assert_close(inversion.clean, encode(blind, image))
    regenerated = regenerate(blind, inversion, output_type="latent")
    torch.testing.assert_close(regenerated, inversion.clean, atol=1e-5, rtol=0)
    # so the reported PSNR is exactly the VAE's own reconstruction PSNR
    assert reconstruction_psnr(blind, image, SOURCE, steps=10) == pytest.approx(
        psnr(image, decode(blind, inversion.clean)), abs=0.05)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_clean_and_noise_agree_with_diffusers_ddim_step(prediction):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=prediction, clip_sample=False)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    latent, output = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    alpha = scheduler.alphas_cumprod[int(t)].double()
    x0, eps = clean_and_noise(output, latent, alpha, prediction)
    # the scheduler keeps ᾱ in float32: agreement to its rounding
    torch.testing.assert_close(x0, scheduler.step(output, t, latent).pred_original_sample, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps, latent)
    with pytest.raises(ValueError, match="unknown prediction type"):
        clean_and_noise(output, latent, alpha, "score")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_inverted_noise_regenerates_the_vae_reconstruction_far_better_than_a_random_start(tiny, prediction,
                                                                                          monkeypatch):
    from diffusers import DDIMScheduler

    if prediction != tiny.scheduler.config.prediction_type:  # v-prediction samples from pure noise: trailing
        monkeypatch.setattr(tiny, "scheduler", DDIMScheduler.from_config(
            tiny.scheduler.config, prediction_type=prediction, timestep_spacing="trailing"))
    image = _circle()
    inversion = invert(tiny, image, SOURCE, steps=10)
    from_inverted = regenerate(tiny, inversion, output_type="latent")
    from_random = _plain(tiny, SOURCE, steps=10, guidance_scale=1.0, output_type="latent")
    error_inverted = (from_inverted - inversion.clean).abs().mean()
    error_random = (from_random - inversion.clean).abs().mean()
    assert error_inverted < 0.25 * error_random
    assert math.isfinite(reconstruction_psnr(tiny, image, SOURCE, steps=3))


def test_null_text_inversion_makes_guided_sampling_walk_the_images_trajectory(tiny):
    """At guidance 5 the plain DDIM inversion's noise drifts away from the image; with null-text inversion's
    per-step unconditional embeddings the same guided sampling lands (nearly) on the image's latent."""
    image, scale = _circle(), 5.0
    plain = invert(tiny, image, SOURCE, steps=8)
    nti = invert(tiny, image, SOURCE, steps=8, guidance_scale=scale, null_text_steps=20, null_text_lr=5e-2)
    assert nti.null_embeds.shape[0] == 8 and nti.guidance_scale == scale and torch.equal(nti.latents, plain.latents)
    drift = (regenerate(tiny, plain, guidance_scale=scale, output_type="latent") - plain.clean).abs().mean()
    kept = (regenerate(tiny, nti, output_type="latent") - nti.clean).abs().mean()
    assert kept < 0.7 * drift  # what is left is the inversion's own approximation (kept even at guidance 1)
    with pytest.raises(ValueError, match="made for guidance_scale=5.0"):
        edit(tiny, SOURCE, "a blue circle", image=nti, steps=8, guidance_scale=7.5)
    edited = edit(tiny, SOURCE, "a blue circle", image=nti, steps=8, guidance_scale=scale,
                  output_type="latent")
    assert torch.isfinite(edited.edited).all()


def test_real_image_editing_pins_the_source_row_to_the_trajectory(tiny):
    inversion = invert(tiny, _circle(), SOURCE, steps=STEPS)
    inputs = []
    hook = tiny.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        result = edit(tiny, SOURCE, "a blue circle", image=inversion, steps=STEPS, output_type="latent")
    finally:
        hook.remove()
    assert result.settings.real_image and result.settings.seed is None
    assert len(inputs) == STEPS
    for i, batch in enumerate(inputs):  # [uncond_src, uncond_tgt, cond_src, cond_tgt]
        assert torch.equal(batch[0], inversion.latents[i]) and torch.equal(batch[2], inversion.latents[i])
        if i == 0:
            assert torch.equal(batch[1], inversion.noise)  # both rows start from the inverted noise
    assert torch.equal(result.source, inversion.clean)
    assert not torch.equal(result.edited, inversion.clean)
    # an image instead of an inversion inverts it with the source prompt, null-text at the edit's guidance
    again = edit(tiny, SOURCE, "a blue circle", image=_circle(), steps=STEPS, output_type="latent")
    consistent = invert(tiny, _circle(), SOURCE, steps=STEPS, guidance_scale=7.5)
    by_hand = edit(tiny, SOURCE, "a blue circle", image=consistent, steps=STEPS, output_type="latent")
    torch.testing.assert_close(again.edited, by_hand.edited)
    assert not torch.allclose(again.edited, result.edited)  # the null-text embeddings changed the guided walk


# -- errors ---------------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors(tiny):
    with pytest.raises(ValueError, match="token by token"):
        edit(tiny, SOURCE, "a red circle and a blue square", seed=0, inject="cross", steps=1)
    with pytest.raises(ValueError, match="matches no self attention layer"):
        edit(tiny, SOURCE, TARGET, seed=0, layers=["up_blocks.7.*"], steps=1)
    with pytest.raises(ValueError, match="matches no self attention layer"):
        edit(tiny, SOURCE, TARGET, seed=0, layers=["up_blocks.1.attentions.0.transformer_blocks.0.attn2"])
    for fraction in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            edit(tiny, SOURCE, TARGET, seed=0, inject_steps=fraction, steps=1)
    with pytest.raises(ValueError, match="outside 0 … 3"):
        edit(tiny, SOURCE, TARGET, seed=0, inject_steps=[2, 4], steps=4)
    with pytest.raises(ValueError, match="64×64 px but the pipeline works at 32×32"):
        edit(tiny, SOURCE, TARGET, image=_circle(size=64), steps=1)
    with pytest.raises(ValueError, match="inject must be one of"):
        edit(tiny, SOURCE, TARGET, seed=0, inject="both")
    with pytest.raises(ValueError, match="seed= .* or image="):
        edit(tiny, SOURCE, TARGET)
    with pytest.raises(ValueError, match="10 steps, the edit 4"):
        edit(tiny, SOURCE, TARGET, image=Inversion(torch.zeros(11, 4, 16, 16), torch.zeros(10), ""),
             steps=4)


# -- scoring and the study -------------------------------------------------------------------------------------


def test_compare_scores_known_edits():
    source = _circle(size=64)
    good = compare(source, _circle(size=64, colour="blue"), "a red circle", "a blue circle")
    assert good["success"] and good["source_present"] and good["leaked"] is False
    assert good["iou"] > 0.95 and good["displacement"] < 0.5
    moved = compare(source, _circle(size=64, cx=36.0), "a red circle", "a blue circle")
    assert not moved["success"] and moved["leaked"] is True
    assert moved["displacement"] == pytest.approx(6.0, abs=0.5) and moved["iou"] < good["iou"]
    empty = compare(source, np.full((64, 64, 3), 245, np.uint8), "a red circle", "a red square")
    assert empty["iou"] == 0.0 and math.isnan(empty["displacement"]) and empty["leaked"] is None


def test_default_layer_sets_are_relative_to_the_models_grids(tiny):
    selves = [la for la in attention_layers(tiny) if la.kind == "self"]
    latent = latent_size(tiny)
    assert latent == (16, 16)
    sets = {name: {la.grid for la in choose(selves, latent)} for name, choose in LAYER_SETS.items()}
    assert sets == {"all": {(16, 16), (8, 8)}, "coarser than latent": {(8, 8)}, "finest grid only": {(16, 16)}}
    assert len(LAYER_SETS["finest grid only"](selves, latent)) == 3
    # Stable Diffusion's layout: a 64² latent with 64², 32², 16², 8² grids → FPE's 32² and below
    sd = [Layer(f"l{g}", "self", (g, g), 8) for g in (64, 32, 16, 8)]
    assert [la.grid[0] for la in LAYER_SETS["coarser than latent"](sd, (64, 64))] == [32, 16, 8]
    assert {la.grid for la in injected_layers(tiny, "self")} == {(8, 8)}


def test_study_runs_and_returns_sane_columns(tiny):
    with pytest.warns(UserWarning, match="'64² only' skipped"):
        frame = study(tiny, n_seeds=1, steps_fractions=(0.5,), steps=2,
                      layer_sets={"all": None, "64² only": [64]})
    assert list(frame.columns) == list(COLUMNS)
    n_jobs = len(EDITS) * 2  # edits × origins
    assert len(frame) == n_jobs * (1 + 2)  # none + (self, cross) × one layer set × one fraction
    assert set(frame.inject) == {"self", "cross", "none"} and set(frame.origin) == {"generated", "rendered"}
    assert set(frame.edit) == {"colour", "shape"} and set(frame.layer_set) == {"all", "none"}
    assert (frame[frame.inject == "self"].n_layers == 7).all() and (frame[frame.inject == "cross"].n_layers == 7).all()
    assert frame.success.dtype == bool and frame.source_present.dtype == bool
    iou = frame.iou.dropna()
    assert ((iou >= 0) & (iou <= 1)).all()
    assert (frame.displacement.dropna() >= 0).all()
    assert frame[frame.inject == "none"].fraction.isna().all()
    assert (frame[frame.inject != "none"].fraction == 0.5).all()
