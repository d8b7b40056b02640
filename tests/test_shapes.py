"""The shapes world and the training loop of the built-in model."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from probe.shapes import model as M
from probe.shapes.train import TrainConfig, export, train
from probe.shapes.world import COLOURS, Shape, caption, coverage, render, scene_for, shapes_dataset


def test_scenes_are_deterministic_and_disjoint():
    for i in range(50):
        a, b = scene_for(3, i, 3), scene_for(3, i, 3)
        assert a == b
        _, labels = render(a)
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        colours = [o.colour for o in a]
        assert len(set(colours)) == 3


def test_render_paints_each_object_in_its_colour():
    scene = [Shape("square", "red", 20, 20, 10), Shape("circle", "blue", 46, 44, 10)]
    image, labels = render(scene)
    assert tuple(image[20, 20]) == COLOURS["red"] and tuple(image[44, 46]) == COLOURS["blue"]
    assert labels[20, 20] == 1 and labels[44, 46] == 2 and labels[2, 2] == 0
    # a square of half-extent 8.5 px covers 17×17 = 289 px; a circle of radius 10 covers π·100 px
    assert coverage(scene[0]).sum() == pytest.approx(17 * 17, rel=0.01)
    assert coverage(scene[1]).sum() == pytest.approx(np.pi * 100, rel=0.01)
    assert caption(scene) == "a red square and a blue circle"


def test_dataset_matches_renders():
    ds = shapes_dataset(6, seed=1)
    again = shapes_dataset(6, seed=1)
    assert ds["caption"] == again["caption"]
    for row in ds:
        scene = [Shape(**{k: v for k, v in o.items() if k != "box"}) for o in row["objects"]]
        image, labels = render(scene)
        assert np.array_equal(np.asarray(row["image"]), image)
        assert np.array_equal(np.asarray(row["labels"]), labels)
        assert row["caption"] == caption(scene)


def test_training_runs_resumes_and_exports(tmp_path):
    arch = M.ShapesConfig(unet_channels=(32, 32, 32), vae_channels=(8, 8, 8))
    cfg = TrainConfig(arch=arch, vae_steps=2, vae_batch_size=2, pool_size=16, batch_size=4, checkpoint_minutes=10)
    first = train(tmp_path / "run", minutes=0.15, cfg=cfg)
    assert first.stage == "unet" and first.step > 0
    with pytest.raises(FileExistsError, match="resume"):
        train(tmp_path / "run", minutes=0.01, cfg=cfg)
    second = train(tmp_path / "run", minutes=0.05, resume=True, cfg=cfg)
    assert second.step > first.step and second.vae_step == first.vae_step
    folder = export(second, tmp_path / "model")
    warm = train(tmp_path / "warm", minutes=0.02, cfg=cfg, init_from=folder)
    assert warm.step > second.step and warm.scaling == pytest.approx(second.scaling)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae.config.scaling_factor == pytest.approx(second.scaling)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_v_prediction_learns_the_velocity_and_resumes_as_v(tmp_path):
    from probe.shapes.train import Trainer

    arch = M.ShapesConfig(unet_channels=(32, 32, 32), vae_channels=(8, 8, 8), prediction="v_prediction")
    trainer = Trainer(tmp_path, TrainConfig(arch=arch))
    x0, noise, t = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16), torch.tensor([0, 500, 999])
    alpha_bar = trainer.sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # by hand
    assert torch.allclose(trainer.target(x0, noise, t), expected, atol=1e-6)
    assert torch.equal(Trainer(tmp_path, TrainConfig()).target(x0, noise, t), noise)  # ε-prediction
    assert trainer.sched.config.prediction_type == "v_prediction"
    assert trainer.sched.config.timestep_spacing == "trailing"
    cfg = TrainConfig(arch=arch, vae_steps=2, vae_batch_size=2, pool_size=16, batch_size=4)
    train(tmp_path / "run", minutes=0.05, cfg=cfg)
    resumed = train(tmp_path / "run", minutes=0.01, resume=True, cfg=TrainConfig(vae_steps=2, pool_size=16,
                                                                                 batch_size=4))
    assert resumed.cfg.arch.prediction == "v_prediction"  # from the checkpoint, not from the defaults
    folder = export(resumed, tmp_path / "model")
    assert StableDiffusionPipeline.from_pretrained(folder).scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction"):
        M.scheduler("x0")


def test_learning_rate_warms_up_holds_and_cools_down(tmp_path):
    from probe.shapes.train import Trainer

    arch = M.ShapesConfig(unet_channels=(32, 32, 32), vae_channels=(8, 8, 8))
    trainer = Trainer(tmp_path, TrainConfig(arch=arch, lr=1e-3, warmup_steps=100, cooldown_minutes=10))
    assert trainer.lr_at(0) == pytest.approx(1e-5)  # warm-up: (step + 1) / 100
    assert trainer.lr_at(49) == pytest.approx(5e-4)
    assert trainer.lr_at(500, minutes_left=30) == pytest.approx(1e-3)  # before the cool-down
    assert trainer.lr_at(500, minutes_left=5) == pytest.approx(5e-4)  # halfway through it
    assert trainer.lr_at(500, minutes_left=0) == pytest.approx(1e-4)  # floor: 10%
    held = Trainer(tmp_path, TrainConfig(arch=arch, lr=1e-3, warmup_steps=100))
    assert held.lr_at(500, minutes_left=0) == pytest.approx(1e-3)  # no cool-down unless asked


def test_single_object_rates_match_a_recount_and_reach_the_card():
    """The card's single-object numbers equal a plain generate-and-judge recount of the same images."""
    import probe
    from probe.shapes import evaluate
    from probe.shapes.judge import detect, judge

    pipe = probe.load("shapes")
    rates = evaluate.single_object(pipe, seeds_per_prompt=1, steps=3)
    prompts = [f"a {c} {s}" for c in COLOURS for s in ("circle", "square", "triangle", "ellipse")]
    seeds = [evaluate.HELD_OUT_SEED + i for i in range(len(prompts))]
    images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=3,
                  guidance_scale=evaluate.GUIDANCE, output_type="np").images
    images = [(im * 255).round().astype(np.uint8) for im in images]
    assert rates["images"] == len(prompts)
    assert rates["correct"] == pytest.approx(np.mean([judge(im, p)[0].status == "present"
                                                      for im, p in zip(images, prompts)]))
    assert rates["exactly_one_object"] == pytest.approx(np.mean([len(detect(im)) == 1 for im in images]))
    metrics = {"single_object": rates, "two_objects": {k: 0.0 for k in ("both_correct", "any_missing",
               "subject_present", "subject_missing", "subject_wrong_colour", "subject_wrong_shape", "subject_mixed")}
               | {"images": 0}, "localisation": {}, "judge_accuracy": 1.0, "seconds_per_image_50_steps": 1.0,
               "steps": 3, "guidance_scale": evaluate.GUIDANCE}
    training = {"arch": M.ShapesConfig().to_dict(), "scaling_factor": 1.0, "vae_steps": 1, "unet_steps": 1,
                "batch_size": 1}
    card = evaluate.write_card("unused", metrics, training)
    assert f"| single object correct ≥ 95% | {rates['correct']:.1%} | {'yes' if rates['correct'] >= 0.95 else 'no'} |" \
        in card
    assert f"| {rates['correct']:.1%} |" in card.split("## Measured")[1]


def test_positive_control_is_the_guidance_study_of_ae_against_none(tiny, tmp_path):
    import pandas as pd

    from probe.shapes import evaluate

    control = evaluate.positive_control(tiny, n_images=2, out=tmp_path, progress=False, steps=3, step_size=0.5)
    rows = pd.read_csv(tmp_path / "guidance_images.csv")
    assert control["ae_step_size"] == 0.5 and rows[rows.method == "ae"].step_size.eq(0.5).all()
    assert control["calibration"] == []  # a given step is not calibrated
    assert set(rows.method) == {"none", "ae"} and control["pairs"] == len(rows) // 2
    wide = rows.pivot_table(index=["prompt", "seed"], columns="method", values="missing")
    assert control["missing_difference"] == pytest.approx((wide["ae"] - wide["none"]).mean())
    assert control["missing_ae"] == pytest.approx(rows[rows.method == "ae"].missing.mean())
    assert control["ae_loss_start_median"] == pytest.approx(rows[rows.method == "ae"].loss_start.median())
    low, high = control["missing_difference_ci"]
    assert low <= control["missing_difference"] <= high


# -- the testbed recipe: caption noise, grounding, left padding -------------------------------------------------------


def test_caption_noise_names_an_object_the_image_lacks():
    from probe.shapes.train import _images

    cfg = TrainConfig(object_weights=(0.0, 1.0), caption_noise=1.0, distinct_shapes=True)
    batch = _images(3, 0, 12, cfg)
    for caption_, drawn, labels, words in zip(batch.captions, batch.drawn, batch.labels, batch.words):
        assert drawn.count(False) == 1 and caption_ == " and ".join(f"a {c} {s}" for c, s in words)
        absent = drawn.index(False) + 1
        assert not (labels == absent).any() and (labels == 3 - absent).any()  # only the drawn object is labelled
        assert words[0][1] != words[1][1]  # distinct nouns


def test_caption_noise_per_scene_size():
    from probe.shapes.train import _images

    cfg = TrainConfig(object_weights=(0.0, 0.5, 0.5), caption_noise=(0.0, 0.0, 1.0), distinct_shapes=True)
    batch = _images(3, 0, 24, cfg)
    sizes = {len(drawn) for drawn in batch.drawn}
    assert sizes == {2, 3}
    for drawn in batch.drawn:  # two-object captions are all true, three-object ones all name an absent object
        assert drawn.count(False) == (1 if len(drawn) == 3 else 0)


def test_attribute_noise_swaps_two_colours_and_leaves_them_ungrounded():
    from probe.shapes.train import _images

    cfg = TrainConfig(object_weights=(0.0, 1.0), attribute_noise=1.0, distinct_shapes=True)
    batch = _images(3, 0, 12, cfg)
    tok = M.tokenizer(padding_side="left")
    for caption_, words, drawn, labels, image in zip(batch.captions, batch.words, batch.drawn, batch.labels,
                                                     batch.images):
        (c1, s1), (c2, s2) = (part.split()[1:] for part in caption_.split(" and "))
        # the image holds each noun in the other one's colour: pixel colour under object k is the swapped colour
        if c1 == c2:
            continue
        assert words == [(s1,), (s2,), (c1,), (c2,)] and drawn == [True, True, None, None]
        ids = tok([caption_], padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
        from probe.shapes.grounding import UNSUPERVISED, token_objects

        assign = token_objects(tok, [words], [drawn], ids)[0]
        texts = tok.convert_ids_to_tokens(ids[0])
        assert {texts[j] for j in range(M.MAX_TOKENS) if assign[j] > 0} == {f"{s1}</w>", f"{s2}</w>"}
        assert {texts[j] for j in range(M.MAX_TOKENS) if assign[j] == UNSUPERVISED} == {f"{c1}</w>", f"{c2}</w>"}
        from probe.shapes.world import COLOURS

        rgb = ((image.permute(1, 2, 0) + 1) * 127.5).round()
        drawn_colour = rgb[labels == 1].mean(0)  # object 1's pixels are drawn in colour c2
        assert torch.allclose(drawn_colour, torch.tensor(COLOURS[c2], dtype=torch.float), atol=40)


def test_nouns_only_grounding_leaves_every_colour_word_unsupervised():
    from probe.shapes.grounding import token_objects
    from probe.shapes.train import _images

    cfg = TrainConfig(object_weights=(0.0, 0.0, 1.0), distinct_shapes=True, ground_colours=False)
    batch = _images(5, 0, 8, cfg)
    tok = M.tokenizer(padding_side="left")
    ids = tok(batch.captions, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
    assign = token_objects(tok, batch.words, batch.drawn, ids)
    for b, caption_ in enumerate(batch.captions):
        parts = [part.split()[1:] for part in caption_.split(" and ")]
        texts = tok.convert_ids_to_tokens(ids[b])
        grounded = {texts[j]: int(assign[b, j]) for j in range(M.MAX_TOKENS) if assign[b, j] > 0}
        assert grounded == {f"{noun}</w>": k + 1 for k, (_, noun) in enumerate(parts)}  # each noun on its object
        assert {texts[j] for j in range(M.MAX_TOKENS) if assign[b, j] < 0} == {f"{c}</w>" for c, _ in parts}


def test_coverage_term_is_binary_cross_entropy_of_the_peak_scaled_map():
    from probe.shapes.grounding import grounding_loss

    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :8] = 1  # object 1 fills the top half (128 of 256 cells at 16²)
    inside = torch.zeros(1, 256, 1)
    inside[:, :64] = 1 / 64  # all mass on half of the object: own mass 1, peak-scaled map 1 on 64 cells, 0 elsewhere
    eps = 1e-6
    pixel = (64 * -np.log(1 - eps) + 64 * -np.log(eps) + 128 * -np.log(1 - eps)) / 256  # the uncovered half costs
    assert float(grounding_loss([inside], labels, torch.tensor([[1]]), 1, coverage=0.5)) == pytest.approx(
        0.5 * pixel, rel=1e-4)
    full = torch.zeros(1, 256, 1)
    full[:, :128] = 1 / 128  # covers the whole object: both terms ≈ 0
    assert float(grounding_loss([full], labels, torch.tensor([[1]]), 1, coverage=0.5)) == pytest.approx(0, abs=1e-5)


def _explicit_cross_maps(unet, run) -> tuple[list[torch.Tensor], list]:
    """Every ``attn2`` call's head-mean softmax(QKᵀ/√d), rebuilt from the module's own to_q / to_k on the hidden
    states it received, independently of any processor or tap; and ``run()``'s result."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: seen.append((m, args[0], kwargs)), with_kwargs=True)
             for name, m in unet.named_modules() if name.endswith("attn2")]
    try:
        out = run()
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for attn, hidden, kwargs in seen:
        q, k = attn.to_q(hidden), attn.to_k(kwargs["encoder_hidden_states"])
        q, k = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k))  # (batch, heads, tokens, d)
        maps.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1))
    return maps, out


def test_grounding_loss_through_the_tap_equals_explicit_attention_and_trains_the_same():
    """The training grounding term reads the UNet's cross-attention through the tap: its maps, loss and gradients
    equal those of softmax(QKᵀ/√d) computed by hand from each attn2 module's inputs."""
    from types import SimpleNamespace

    from probe.shapes.grounding import capture_cross, grounding_loss, token_objects

    torch.manual_seed(0)
    arch = M.ShapesConfig(unet_channels=(32, 32, 32), attention_head_dim=2, text_layers=1)
    unet, tok = M.unet(arch), M.tokenizer()
    text = M.text_encoder(arch, len(tok))
    parts = SimpleNamespace(unet=unet, scheduler=M.scheduler(), vae_scale_factor=4)  # what the tap reads of a pipeline
    scenes = [scene_for(5, i, 2, distinct_shapes=True) for i in range(3)]
    labels = torch.from_numpy(np.stack([render(s)[1] for s in scenes]))
    ids = tok([caption(s) for s in scenes], padding="max_length", max_length=M.MAX_TOKENS,
              return_tensors="pt").input_ids
    assign = token_objects(tok, [[(o.colour, o.shape) for o in s] for s in scenes], [[True, True]] * 3, ids)
    latents, t = torch.randn(3, 4, 16, 16), torch.tensor([100, 500, 900])
    emb = text(ids).last_hidden_state
    before = dict(unet.attn_processors)

    def loss_and_grads(maps):
        loss = grounding_loss(maps, labels, assign, 2, coverage=1.0)
        params = [emb, *unet.parameters()]
        return loss, torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)

    with capture_cross(parts) as tapped:
        explicit, _ = _explicit_cross_maps(unet, lambda: unet(latents, t, emb))
    assert dict(unet.attn_processors) == before  # the tap left the UNet's own processors in place
    assert [m.shape for m in tapped] == [m.shape for m in explicit] and len(tapped) == 7  # 16, 8, 4, 8, 8, 16, 16
    for a, b in zip(tapped, explicit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    loss, grads = loss_and_grads(tapped)
    loss_ref, grads_ref = loss_and_grads(explicit)
    assert 0 < float(loss.detach()) and (assign > 0).sum() == 12  # every colour word and noun is supervised
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert sum(g is not None for g in grads) > 10
    for g, g_ref in zip(grads, grads_ref):
        assert (g is None) == (g_ref is None)
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_own_mass_and_grounding_loss_by_hand():
    from probe.shapes.grounding import grounding_loss, own_mass

    maps = torch.tensor([[[0.4, 0.0], [0.1, 0.2], [0.0, 0.6], [0.5, 0.2]]])  # (1, 4 pixels, 2 tokens)
    masks = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # pixels 0, 1 → object 1; pixel 2 → 2
    assign = torch.tensor([[1, 2]])
    # token 0: mass 1.0 in all, 0.5 on object 1; token 1: mass 1.0, 0.6 on object 2
    torch.testing.assert_close(own_mass(maps, masks, assign), torch.tensor([[0.5, 0.6]]))
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :8] = 1  # object 1 fills the top half
    top = torch.zeros(1, 256, 1)
    top[:, :128] = 1 / 128  # a token whose map is the top half: own mass 1, loss 0
    half = torch.full((1, 256, 1), 1 / 256)  # a flat map: own mass 0.5, loss 0.25
    assert float(grounding_loss([top], labels, torch.tensor([[1]]), 1)) == pytest.approx(0.0)
    assert float(grounding_loss([half], labels, torch.tensor([[1]]), 1)) == pytest.approx(0.25)
    assert float(grounding_loss([half], labels, torch.tensor([[-1]]), 1)) == 0.0  # an absent object is not taught


def test_token_objects_find_words_where_left_padding_puts_them():
    from probe.shapes.grounding import ABSENT, token_objects

    tok = M.tokenizer(padding_side="left")
    ids = tok(["a red circle and a blue square"], padding="max_length", max_length=M.MAX_TOKENS,
              return_tensors="pt").input_ids
    assign = token_objects(tok, [[("red", "circle"), ("blue", "square")]], [[True, False]], ids)
    words = tok.convert_ids_to_tokens(ids[0])
    assert {words[j] for j in range(M.MAX_TOKENS) if assign[0, j] == 1} == {"red</w>", "circle</w>"}
    assert {words[j] for j in range(M.MAX_TOKENS) if assign[0, j] == ABSENT} == {"blue</w>", "square</w>"}
    assert assign[0, : M.MAX_TOKENS - 9].eq(0).all()  # the padding, before the start token


def test_the_testbed_recipe_trains_resumes_with_its_data_and_exports_a_masked_left_padded_model(tmp_path):
    from dataclasses import replace

    from probe.shapes.train import TESTBED

    arch = replace(TESTBED.arch, unet_channels=(32, 32, 32), vae_channels=(8, 8, 8))
    cfg = replace(TESTBED, arch=arch, vae_steps=2, vae_batch_size=2, pool_size=16, batch_size=4)
    first = train(tmp_path / "run", minutes=0.1, cfg=cfg)
    assert first.step > 0 and first.last_grounding > 0
    resumed = train(tmp_path / "run", minutes=0.02, resume=True, cfg=TrainConfig(vae_steps=2, pool_size=16,
                                                                                  batch_size=4))
    assert resumed.cfg.caption_noise == TESTBED.caption_noise and resumed.cfg.grounding_weight > 0
    changed = train(tmp_path / "run", minutes=0.02, resume=True, keep=("attribute_noise",),
                    cfg=TrainConfig(vae_steps=2, pool_size=16, batch_size=4, attribute_noise=0.5))
    assert changed.cfg.attribute_noise == 0.5 and changed.cfg.caption_noise == TESTBED.caption_noise
    assert changed.pool[1].ne(resumed.pool[1]).any()  # the pool was rebuilt with the new captions
    with pytest.raises(ValueError, match="only data fields"):
        train(tmp_path / "run", minutes=0.01, resume=True, keep=("lr",), cfg=TrainConfig())
    folder = export(resumed, tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.tokenizer.padding_side == "left" and pipe.text_encoder.config.use_attention_mask
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_absent_term_is_the_squared_object_mass_of_a_named_but_absent_word():
    from probe.shapes.grounding import ABSENT, grounding_loss

    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :8] = 1  # object 1 fills the top half
    absent = torch.zeros(1, 256, 1)
    absent[:, 96:160] = 1 / 64  # a quarter of the grid: half of it on the object, half on the background
    loss = grounding_loss([absent], labels, torch.tensor([[ABSENT]]), 1, absent=2.0)
    assert float(loss) == pytest.approx(2.0 * 0.5 ** 2)
    assert float(grounding_loss([absent], labels, torch.tensor([[ABSENT]]), 1)) == 0.0  # weight 0: no term


def test_colour_grounding_share_grounds_colour_words_in_that_share_of_captions():
    from probe.shapes.grounding import token_objects
    from probe.shapes.train import _images

    cfg = TrainConfig(object_weights=(0.0, 1.0), distinct_shapes=True, ground_colours=0.5)
    batch = _images(3, 0, 400, cfg)
    tok = M.tokenizer(padding_side="left")
    ids = tok(batch.captions, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
    assign = token_objects(tok, batch.words, batch.drawn, ids)
    grounded_per_caption = (assign > 0).sum(1)  # 2 nouns, plus 2 colour words where colours are grounded
    assert set(grounded_per_caption.tolist()) <= {2, 4}
    share = float((grounded_per_caption == 4).float().mean())
    assert 0.43 < share < 0.57  # 400 Bernoulli(0.5) draws: ± 3.5 standard errors
