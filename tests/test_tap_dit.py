"""The tap on diffusion transformers (SD3 joint attention, FLUX double and single stream), against a plain run."""

import numpy as np
import pytest
import torch
from tensors import assert_a_small_step_descends

import probe
from probe.steer.guide import OBJECTIVES, Guide, Schedule, generate
from probe.steer.pipelines import initial_noise
from probe.tap import Call, Consumer, Tap

PROMPT = "a cat and a dog"
FAMILIES = ["tiny-sd3", "tiny-flux"]
MAX_SEQ = 16


@pytest.fixture(scope="module", params=FAMILIES)
def dit(request):
    return request.param, probe.load(request.param)


class Views(Consumer):
    """Every layer's cross and self view of the real pass at step 0, in call order."""

    def __init__(self):
        self.seen = []

    def wants(self, call: Call) -> bool:
        return call.step == 0 and call.pass_ in ("cfg", "cond")

    def on_probs(self, call, probs):
        self.seen.append((call.layer.key, call.pass_, probs.detach().clone()))


def _run(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                max_sequence_length=MAX_SEQ, **kw)


def test_views_equal_an_independent_softmax_of_what_the_model_scores(dit):
    """A plain run's own q and k (spied at F.scaled_dot_product_attention) → softmax(q·kᵀ·scale), sliced by the
    family's documented layout (SD3: image first; FLUX: text first), equal the tap's views."""
    name, pipe = dit
    spied, inside = [], []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if inside:  # the transformer's calls only, not the text encoders'
            spied.append((query.detach().clone(), key.detach().clone(), scale))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    net = probe.tap.denoiser(pipe)
    hooks = [net.register_forward_pre_hook(lambda *a: inside.append(1)),
             net.register_forward_hook(lambda *a: inside.clear())]
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            plain = _run(pipe).images
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()
    views = Views()
    with Tap(pipe, [views]), torch.no_grad():
        tapped = _run(pipe).images
    modules = probe.tap.layers.attention_modules(probe.tap.denoiser(pipe))
    per_step = len(modules)
    n_image = 64  # 8×8 tokens at 32 px
    by_module = {}
    for key, pass_, probs in views.seen:
        by_module.setdefault(key[0], []).append((key[1], pass_, probs))
    for index, (module, got) in enumerate(by_module.items()):
        q, k, scale = spied[index % per_step]
        probs = torch.softmax(q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5), dim=-1)
        n_text = probs.shape[-1] - n_image
        if name == "tiny-sd3":
            image, text = slice(0, n_image), slice(n_image, None)
        else:
            image, text = slice(n_text, None), slice(0, n_text)
        blocks = {"cross": (image, text), "self": (image, image),
                  "text_image": (text, image), "text_text": (text, text)}
        for kind, pass_, view in got:
            assert pass_ == ("cfg" if name == "tiny-sd3" else "cond")
            rows, keys = blocks[kind] if not module.endswith("attn2") else (slice(None), slice(None))
            assert (view - probs[..., rows, keys]).abs().max() < 2e-3, (module, kind)
        assert {kind for kind, _, _ in got} == ({"self"} if module.endswith("attn2") else set(blocks))


    np.testing.assert_allclose(plain, tapped, atol=1e-5)


def test_record_on_a_transformer_matches_the_plain_pipeline(dit):
    name, pipe = dit
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=2, progress=False, max_sequence_length=MAX_SEQ)
    plain = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=MAX_SEQ).images  # record runs the pipeline's own guidance scale
    diff = np.abs(tree["images"]["image"].values[0].astype(int) - (plain[0] * 255).round().astype(int))
    assert diff.max() <= 1
    cross = tree["cross/res8"]
    assert list(cross.timestep.values) == [float(t) for t in pipe.scheduler.timesteps]
    texts = [str(t) for t in cross.token_text.values[0] if t]
    if name == "tiny-sd3":  # CLIP's tokens, then T5's
        assert list(cross.encoder.values[0][: len(texts)]).count("clip") == len(texts) // 2
    assert texts.count("cat") == (2 if name == "tiny-sd3" else 1)
    row = cross["attn"].isel(sample=0, step=1).mean("layer").values  # (y, x, token): mass on the prompt's tokens
    assert np.all(np.nansum(row, -1) <= 1 + 2e-3) and np.all(np.nansum(row, -1) > 0)
    self_rows = tree["self/res8"]["attn"].isel(sample=0, step=1, layer=0).values.reshape(64, 64)
    assert np.all(self_rows.sum(-1) <= 1 + 2e-3)


def test_text_query_relations_are_recorded_per_token(dit):
    """text→image and text→text: each recorded token's row is the tap's view of that token's query, head mean."""
    name, pipe = dit
    kinds = ("cross", "text_image", "text_text")
    views = Views()
    with Tap(pipe, [views]), torch.no_grad():
        _run(pipe)
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=2, kinds=kinds, keep_steps=[0], progress=False,
                        max_sequence_length=MAX_SEQ)
    text_image, text_text = tree["text_image/res8"], tree["text_text/res8"]
    assert text_image["attn"].dims == ("sample", "step", "layer", "token", "y", "x")
    assert text_text["attn"].dims == ("sample", "step", "layer", "token", "key_token")
    texts = [str(t) for t in text_image.token_text.values[0]]
    assert texts == [str(t) for t in tree["cross/res8"].token_text.values[0]]
    positions = probe.prompts.text_layout(pipe, PROMPT, max_sequence_length=MAX_SEQ).positions
    seen = {(key, pass_): probs for key, pass_, probs in views.seen}
    rows = 1 if name == "tiny-sd3" else 0  # the conditional half of SD3's CFG batch
    for layer in text_image.layer.values:
        block = seen[(str(layer), "text_image"), "cfg" if rows else "cond"][rows].float().mean(0)  # (text, image)
        expected = block[positions].reshape(len(positions), 8, 8)
        got = torch.from_numpy(text_image["attn"].sel(layer=layer).values[0, 0, : len(positions)].astype("float32"))
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-2)
        square = seen[(str(layer), "text_text"), "cfg" if rows else "cond"][rows].float().mean(0)
        expected = square[positions][:, positions]
        got = torch.from_numpy(text_text["attn"].sel(layer=layer).values[0, 0, : len(positions), : len(positions)]
                               .astype("float32"))
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-2)
    if len(texts) > len(positions):  # padding slots of a shorter prompt are NaN, as for cross-attention
        assert np.isnan(text_text["attn"].values[0, 0, :, len(positions):]).all()


def test_text_query_kinds_are_refused_where_text_never_queries(tiny):
    with pytest.raises(ValueError, match="no attention layers of kinds"):
        probe.record(tiny, PROMPT, seeds=[0], steps=1, kinds=("text_image",), progress=False)
    with pytest.raises(ValueError, match="unknown attention kinds"):
        probe.record(tiny, PROMPT, seeds=[0], steps=1, kinds=("image_text",), progress=False)


def _flux2():
    """A tiny random FLUX.2 transformer (double- and single-stream blocks) and a pipeline-like holder for the tap."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    net = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    pipe = SimpleNamespace(transformer=net.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae_scale_factor=8,
                           default_sample_size=16)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(8), torch.arange(8), torch.arange(1))[None]
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(6))[None]
    inputs = {"hidden_states": torch.randn(1, 64, 16), "encoder_hidden_states": torch.randn(1, 6, 32),
              "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": text_ids, "return_dict": False}
    return pipe, inputs


def test_flux2_views_equal_an_independent_softmax_and_the_output_is_untouched():
    pipe, inputs = _flux2()
    spied, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        spied.append((query.detach().clone(), key.detach().clone(), scale))
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            plain = pipe.transformer(**inputs)[0]
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    views = Views()
    with Tap(pipe, [views]) as tap, torch.no_grad(), tap.pass_("cond", 0):
        tapped = pipe.transformer(**inputs)[0]
    torch.testing.assert_close(tapped, plain, atol=1e-5, rtol=1e-5)
    assert len(spied) == 2 and len(views.seen) == 8  # two modules × four relations
    text, image = slice(0, 6), slice(6, None)  # FLUX.2 puts text first, like FLUX.1
    blocks = {"cross": (image, text), "self": (image, image), "text_image": (text, image), "text_text": (text, text)}
    for i, ((module, kind), _, view) in enumerate(views.seen):
        q, k, scale = spied[i // 4]
        probs = torch.softmax(q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5), dim=-1)
        rows, keys = blocks[kind]
        assert (view - probs[..., rows, keys]).abs().max() < 2e-3, (module, kind)
    with pytest.raises(probe.tap.TapError, match="reference-image tokens"), Tap(pipe, [views]) as tap:
        with tap.pass_("cond", 0):
            pipe.transformer(**inputs, num_ref_tokens=4)


# -- guidance on transformers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_small_step_lowers_each_objective_on_a_transformer(dit, objective):
    _, pipe = dit
    with Guide(pipe, PROMPT, ["cat", "dog"], objective, steps=4, max_sequence_length=MAX_SEQ) as guide:
        assert_a_small_step_descends(guide, initial_noise(pipe, torch.Generator().manual_seed(1), None, None), (8, 8))


def test_unguided_generate_is_the_plain_pipeline_and_guidance_moves_it(dit):
    _, pipe = dit
    still = Schedule(alter_fraction=0.0, thresholds={})
    kw = {"seed": 0, "steps": 3, "output_type": "np", "progress": False, "max_sequence_length": MAX_SEQ}
    unguided = generate(pipe, PROMPT, subjects=["cat", "dog"], schedule=still, **kw)
    plain = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=MAX_SEQ).images  # generate runs the pipeline's own guidance scale
    np.testing.assert_allclose(unguided.images, plain, atol=1e-5)
    guided = generate(pipe, PROMPT, subjects=["cat", "dog"], schedule=Schedule(thresholds={}), **kw)
    assert np.abs(guided.images - plain).max() > 1e-3 and len(guided.history) == 2  # steps 0 and 1 of 3


def test_a_caching_hook_is_refused_not_recorded_around():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = probe.load("tiny-flux")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(probe.tap.TapError, match="caching hooks.*fbc_leader_block_hook"):
        probe.record(pipe, PROMPT, seeds=[0], steps=2, progress=False, max_sequence_length=MAX_SEQ)
