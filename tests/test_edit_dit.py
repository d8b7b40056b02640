"""Self-attention injection editing and flow-matching inversion on diffusion transformers (SD3, FLUX)."""

import numpy as np
import pytest
import torch

import probe
from probe.models import attention_layers
from probe.shapes.world import Shape, render
from probe.steer.edit import edit, injected_layers
from probe.steer.inversion import decode, encode, flow_invert, invert, regenerate
from probe.tap import Call, Consumer

FAMILIES = ["tiny-sd3", "tiny-flux"]
SOURCE, TARGET = "a red circle", "a blue square"
SIZE = 32  # pixels: a 16×16 latent, an 8×8 token grid
STEPS = 3
SEED = 3
MAX_SEQ = 16
KW = {"height": SIZE, "width": SIZE, "max_sequence_length": MAX_SEQ}


@pytest.fixture(scope="module", params=FAMILIES)
def dit(request):
    return request.param, probe.load(request.param)


def _circle():
    return render([Shape("circle", "red", 15.0, 17.0, 8.0)], size=SIZE)[0]


def _plain(pipe, prompt):
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                output_type="latent", **KW).images  # edit's default guidance: the pipeline's own


class Keep(Consumer):
    def __init__(self):
        self.seen = {}

    def wants(self, call: Call) -> bool:
        return call.layer.kind == "self"

    def on_probs(self, call, probs):
        self.seen[call.layer.name, call.step] = probs


def test_self_injection_of_a_prompt_into_itself_is_the_plain_generation(dit):
    _, pipe = dit
    result = edit(pipe, SOURCE, SOURCE, seed=SEED, inject_steps=1.0, steps=STEPS, output_type="latent", **KW)
    assert result.settings.layers and result.settings.steps == tuple(range(STEPS))
    torch.testing.assert_close(result.edited, _plain(pipe, SOURCE)[0], atol=1e-4, rtol=0)


def test_the_targets_image_block_becomes_the_sources_in_chosen_layers_and_steps_only(dit):
    name, pipe = dit
    before, after = Keep(), Keep()
    every = [la.name for la in attention_layers(pipe, SIZE, SIZE) if la.kind == "self"]
    assert [la.name for la in injected_layers(pipe, "self", height=SIZE, width=SIZE)] == every  # one grid: all
    chosen = every[:2]
    edit(pipe, SOURCE, TARGET, seed=SEED, layers=chosen, inject_steps=[1], steps=STEPS, before=[before],
         after=[after], output_type="latent", **KW)
    cfg = name == "tiny-sd3"  # SD3 runs [uncond_src, uncond_tgt, cond_src, cond_tgt]; FLUX [src, tgt]
    src, tgt = (2, 3) if cfg else (0, 1)
    assert set(before.seen) == {(layer, step) for layer in every for step in range(STEPS)}
    for (layer, step), pre in before.seen.items():
        post = after.seen[layer, step]
        if layer in chosen and step == 1:
            assert torch.equal(post[tgt], pre[src]) and not torch.equal(pre[tgt], pre[src])
            assert torch.equal(post[:tgt], pre[:tgt])  # the source and the unconditional rows untouched
        else:
            assert post is pre


def test_decode_is_the_pipelines_own_decoding_and_encode_its_inverse(dit, monkeypatch):
    _, pipe = dit
    monkeypatch.setitem(pipe.vae.config, "shift_factor", 0.1)  # the real SD3 / FLUX autoencoders shift latents
    monkeypatch.setattr(pipe.vae.config, "shift_factor", 0.1)  # (a FrozenDict: its items are attributes too)
    latents = _plain(pipe, SOURCE)
    with torch.no_grad():
        own = pipe.image_processor.postprocess(pipe.vae.decode(
            (pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor) if latents.ndim == 3 else latents)
            / pipe.vae.config.scaling_factor + 0.1).sample, output_type="np")[0]
    np.testing.assert_array_equal(decode(pipe, latents[0]), (own * 255).round().clip(0, 255).astype(np.uint8))
    latent = encode(pipe, _circle())
    with torch.no_grad():  # the latent as the pipeline would sample it: shifted, scaled, FLUX's tokens packed
        x = torch.from_numpy(_circle()).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = (pipe.vae.encode(x).latent_dist.mean - 0.1) * pipe.vae.config.scaling_factor
    if latents.ndim == 3:
        expected = pipe._pack_latents(expected, 1, *expected.shape[1:])
    torch.testing.assert_close(latent, expected[0])
    assert latent.shape == latents.shape[1:]


@pytest.fixture(params=FAMILIES)
def blind(request):
    """A transformer whose velocity ignores the latent (the image tokens' embedding zeroed): the Euler inversion is
    then exactly the sampler run backwards."""
    pipe = probe.load(request.param)
    embed = pipe.transformer.pos_embed.proj if request.param == "tiny-sd3" else pipe.transformer.x_embedder
    with torch.no_grad():
        embed.weight.zero_()
        embed.bias.zero_()
    return pipe


def test_flow_inversion_is_exact_when_the_velocity_ignores_the_latent(blind):
    inversion = flow_invert(blind, _circle(), SOURCE, steps=6, height=SIZE, width=SIZE)
    assert inversion.latents.shape[0] == 7 and inversion.timesteps.shape == (6,)
    torch.testing.assert_close(inversion.clean, encode(blind, _circle(), SIZE, SIZE))
    regenerated = regenerate(blind, inversion, output_type="latent", height=SIZE, width=SIZE)
    torch.testing.assert_close(regenerated, inversion.clean, atol=1e-5, rtol=0)


def test_inverted_noise_regenerates_the_image_far_better_than_a_random_start(dit):
    _, pipe = dit
    inversion = invert(pipe, _circle(), SOURCE, steps=10, height=SIZE, width=SIZE)
    from_inverted = regenerate(pipe, inversion, output_type="latent", height=SIZE, width=SIZE)
    from_random = pipe(SOURCE, num_inference_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                       output_type="latent", height=SIZE, width=SIZE).images[0]
    assert from_inverted.shape == inversion.clean.shape
    assert (from_inverted - inversion.clean).abs().mean() < 0.25 * (from_random - inversion.clean).abs().mean()


def test_real_image_editing_pins_the_source_row_to_the_flow_trajectory(dit):
    name, pipe = dit
    if name == "tiny-sd3":
        with pytest.raises(ValueError, match="guidance_scale=1"):
            flow_invert(pipe, _circle(), SOURCE, steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE)
    inversion = invert(pipe, _circle(), SOURCE, steps=STEPS, height=SIZE, width=SIZE)
    inputs = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        result = edit(pipe, SOURCE, "a blue circle", image=inversion, steps=STEPS, guidance_scale=1.0,
                      output_type="latent", **KW)
    finally:
        hook.remove()
    assert len(inputs) == STEPS and result.settings.real_image
    for i, batch in enumerate(inputs):
        assert torch.equal(batch[0], inversion.latents[i])
    assert torch.equal(inputs[0][1], inversion.noise)  # both rows start from the inverted noise
    assert torch.equal(result.source, inversion.clean) and not torch.equal(result.edited, inversion.clean)


def test_edit_refuses_a_prompt_its_template_would_cut():
    """FLUX.2's chat template takes keys too: a prompt that the pipeline would cut inside it is refused by edit as by
    record, not edited without its last words."""
    pipe = probe.load("tiny-flux2")
    long = " ".join(["a red circle and a blue square"] * 70)
    with pytest.raises(ValueError, match="tokens inside the pipeline's template"):
        edit(pipe, long, long.replace("red", "green"), seed=0, steps=2, height=32, width=32)
