"""The tap against independent computations."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import probe
from probe.models import attention_layers, select_layers
from probe.tap import Call, Consumer, Tap


class Everything(Consumer):
    """Asks for explicit probabilities everywhere and keeps what it saw."""

    def __init__(self):
        self.seen = []

    def wants(self, call: Call) -> bool:
        return True

    def on_probs(self, call, probs):
        self.seen.append((call.layer.name, call.step, tuple(probs.shape)))


def _unet_inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    x = torch.randn(batch, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor(500), ctx


def test_idle_tap_is_exactly_the_default_processor(tiny):
    x, t, ctx = _unet_inputs(tiny)
    with torch.no_grad():
        plain = tiny.unet(x, t, ctx).sample
        with Tap(tiny):
            tapped = tiny.unet(x, t, ctx).sample
    assert (plain - tapped).abs().max() <= 1e-6


def test_explicit_probabilities_give_the_same_outputs(tiny):
    x, t, ctx = _unet_inputs(tiny)
    consumer = Everything()
    with torch.no_grad():
        plain = tiny.unet(x, t, ctx).sample
        with Tap(tiny, [consumer]):
            tiny.unet(x, t, ctx)  # first call only sets the step
            tapped = tiny.unet(x, t, ctx).sample
    assert len({name for name, _, _ in consumer.seen}) == len(attention_layers(tiny))
    torch.testing.assert_close(tapped, plain, atol=1e-5, rtol=1e-5)


def test_tap_restores_exactly_the_processors_that_were_there(tiny):
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    custom = AttnProcessor()
    tiny.unet.set_attn_processor({**tiny.unet.attn_processors, f"{name}.processor": custom})
    before = dict(tiny.unet.attn_processors)
    with Tap(tiny):
        assert not any(p is custom for p in tiny.unet.attn_processors.values())
        with pytest.raises(RuntimeError, match="already installed"):
            Tap(tiny).__enter__()
    after = tiny.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    tiny.unet.set_attn_processor(AttnProcessor2_0())


def test_step_comes_from_the_timestep_not_a_counter(tiny):
    steps = []

    class Steps(Consumer):
        def on_step(self, step, timestep):
            steps.append((step, timestep))

    def extra_forward(pipe, i, t, kw):
        # an extra denoiser pass at the same timestep (as guidance does) must not shift the step
        with torch.no_grad():
            pipe.unet(kw["latents"], t, kw["prompt_embeds"][:1])
        return {}

    with Tap(tiny, [Steps()]):
        tiny("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=extra_forward, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    timesteps = [float(t) for t in tiny.scheduler.timesteps]
    assert steps == [(i, t) for i, t in enumerate(timesteps)]


def test_layer_grids_match_the_hidden_states(tiny):
    grids = {}

    class Grids(Everything):
        def on_probs(self, call, probs):
            grids[call.layer.name] = (call.layer.grid, probs.shape[-2])

    with Tap(tiny, [Grids()]), torch.no_grad():
        tiny("a cat", num_inference_steps=1, height=48, width=32)
    for layer in attention_layers(tiny, 48, 32):
        grid, queries = grids[layer.name]
        assert grid == layer.grid and grid[0] * grid[1] == queries


def test_layer_selection_and_errors(tiny):
    layers = attention_layers(tiny)
    assert {layer.grid for layer in select_layers(layers, [16])} == {(16, 16)}
    assert [layer.name for layer in select_layers(layers, "up_blocks.1.*", kinds=("cross",))] == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    assert len(select_layers(layers, "re:mid_block")) == 2
    with pytest.raises(ValueError, match="matches no"):
        select_layers(layers, ["up_blocks.9.*"])
    with pytest.raises(ValueError, match="unknown attention kinds"):
        select_layers(layers, kinds=("joint",))


def test_a_denoiser_without_attention_is_refused():
    from diffusers import UNet2DConditionModel

    pipe = probe.load("tiny")
    pipe.unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32,
    )
    with pytest.raises(TypeError, match="no attention modules"):
        Tap(pipe)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="works offline"):
        probe.load(str(tmp_path / "nowhere"))
