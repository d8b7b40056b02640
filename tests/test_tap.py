"""The tap against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import probe
from probe.models import attention_layers, select_layers
from probe.tap import Call, Consumer, Tap, TapError

LAYER = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"


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
        with Tap(tiny, [consumer]) as tap, tap.pass_("user", 0):
            tapped = tiny.unet(x, t, ctx).sample
    assert len({name for name, _, _ in consumer.seen}) == len(attention_layers(tiny))
    torch.testing.assert_close(tapped, plain, atol=1e-5, rtol=1e-5)


def test_tap_wraps_and_restores_exactly_the_processors_that_were_there(tiny):
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    custom = AttnProcessor()
    tiny.unet.set_attn_processor({**tiny.unet.attn_processors, f"{name}.processor": custom})
    before = dict(tiny.unet.attn_processors)
    with Tap(tiny):
        inside = tiny.unet.attn_processors
        assert all(inside[k].original is before[k] for k in before)  # wrapped, not replaced
        with pytest.raises(RuntimeError, match="already installed"):
            Tap(tiny).__enter__()
    after = tiny.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    tiny.unet.set_attn_processor(AttnProcessor2_0())


class Doubling(AttnProcessor2_0):
    """A user's processor: diffusers' own, with its output doubled."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * super().__call__(attn, hidden_states, *args, **kwargs)


class Decoupled:
    """IP-Adapter's pattern: the text attention, plus a second attention over extra (image-prompt) keys."""

    def __init__(self, extra: torch.Tensor):
        self.extra = extra

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        text = F.scaled_dot_product_attention(q, split(attn.to_k(encoder_hidden_states)),
                                              split(attn.to_v(encoder_hidden_states)))
        extra = self.extra.expand(b, -1, -1)
        image = F.scaled_dot_product_attention(q, split(attn.to_k(extra)), split(attn.to_v(extra)))
        out = (text + 0.5 * image).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def test_other_processors_keep_their_effect_and_their_probabilities_are_seen(tiny):
    """A user's processor, a classic (get_attention_scores) one and an IP-Adapter-style decoupled one: the tap
    changes no output while it computes their probabilities, and the decoupled one's are the text softmax."""
    cross, self_name = LAYER, LAYER.replace("attn2", "attn1")
    other = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    extra = torch.randn(1, 3, tiny.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    default = dict(tiny.unet.attn_processors)
    tiny.unet.set_attn_processor({**default, f"{cross}.processor": Decoupled(extra),
                                  f"{self_name}.processor": Doubling(), f"{other}.processor": AttnProcessor()})
    x, t, ctx = _unet_inputs(tiny)
    kept = {}

    class Keep(Everything):
        def on_probs(self, call, probs):
            kept[call.layer.key] = probs

    try:
        with torch.no_grad():
            plain = tiny.unet(x, t, ctx).sample
            with Tap(tiny, [Keep()]) as tap, tap.pass_("user", 0):
                tapped = tiny.unet(x, t, ctx).sample
            attn = tiny.unet.get_submodule(cross)
            outs = {"q": [], "k": []}
            handles = [attn.to_q.register_forward_hook(lambda m, a, o: outs["q"].append(o)),
                       attn.to_k.register_forward_hook(lambda m, a, o: outs["k"].append(o))]
            with Tap(tiny, [Keep()]) as tap, tap.pass_("user", 0):
                tiny.unet(x, t, ctx)
            for handle in handles:
                handle.remove()
    finally:
        tiny.unet.set_attn_processor(default)
    torch.testing.assert_close(tapped, plain, atol=1e-5, rtol=1e-5)
    q, k = (o.view(2, -1, attn.heads, o.shape[-1] // attn.heads).transpose(1, 2) for o in (outs["q"][0], outs["k"][0]))
    torch.testing.assert_close(kept[(cross, "cross")], (q @ k.transpose(-1, -2) * attn.scale).softmax(-1),
                               atol=1e-5, rtol=1e-5)
    assert (other, "cross") in kept and (self_name, "self") in kept


class Opaque:
    """A processor that computes attention by hand (no SDPA, no get_attention_scores): the tap cannot see into it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        w = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return attn.to_out[1](attn.to_out[0](w @ v))


def test_a_processor_the_tap_cannot_read_is_refused_by_name_only_when_needed(tiny):
    default = dict(tiny.unet.attn_processors)
    tiny.unet.set_attn_processor({**default, f"{LAYER}.processor": Opaque()})
    x, t, ctx = _unet_inputs(tiny)
    try:
        with torch.no_grad():
            plain = tiny.unet(x, t, ctx).sample
            with Tap(tiny, [Consumer()]):  # nobody asks for probabilities: the processor runs as it is
                torch.testing.assert_close(tiny.unet(x, t, ctx).sample, plain)
            with Tap(tiny, [Everything()]) as tap, tap.pass_("user", 0):
                with pytest.raises(TapError, match=f"{LAYER}.*Opaque"):
                    tiny.unet(x, t, ctx)
    finally:
        tiny.unet.set_attn_processor(default)


@pytest.mark.parametrize("scheduler", ["heun", "dpmpp_2m_karras", "euler_ancestral"])
def test_every_scheduler_records_exactly_its_steps(tiny, scheduler):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler

    made = {"heun": lambda c: HeunDiscreteScheduler.from_config(c),
            "dpmpp_2m_karras": lambda c: DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True),
            "euler_ancestral": lambda c: EulerAncestralDiscreteScheduler.from_config(c)}[scheduler]
    pipe = probe.load("tiny")
    pipe.scheduler = made(pipe.scheduler.config)
    seen = []

    class Passes(Everything):
        def on_probs(self, call, probs):
            seen.append((call.step, call.timestep, call.pass_))

    with Tap(pipe, [Passes()]), torch.no_grad():
        pipe("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    schedule = pipe.scheduler.timesteps.tolist()
    first_order = schedule[::2] if scheduler == "heun" else schedule
    real = sorted({(s, t) for s, t, p in seen if p == "cfg"})
    assert real == [(i, float(t)) for i, t in enumerate(first_order)] and len(real) == 4
    corrections = {s for s, _, p in seen if p == "correction"}
    assert corrections == (set(range(3)) if scheduler == "heun" else set())


def test_steps_and_passes_are_told_not_guessed(tiny):
    steps = []

    class Steps(Everything):
        def on_probs(self, call, probs):
            steps.append((call.step, call.pass_, call.batch))

    def extra_forward(pipe, i, t, kw):
        with torch.no_grad(), tap.pass_("user", i):  # an extra pass, named by the code that runs it
            pipe.unet(kw["latents"], t, kw["prompt_embeds"][:1])
        return {}

    with Tap(tiny, [Steps()]) as tap:
        tiny("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=extra_forward, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert sorted(set(steps)) == sorted({(i, "cfg", 2) for i in range(4)} | {(i, "user", 1) for i in range(4)})


def test_an_unplaced_pass_is_an_error_for_a_recording(tiny):
    def untold(pipe, i, t, kw):  # an extra pass nobody named: the recorder refuses it instead of keeping it
        pipe.unet(kw["latents"], t, kw["prompt_embeds"][:1])
        return {}

    with pytest.raises(TapError, match="conditional rows|steps 0"):
        probe.record(tiny, "a cat", seeds=0, steps=3, kinds=("cross",), progress=False,
                     callback_on_step_end=untold, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])


def test_layer_grids_match_the_hidden_states(tiny):
    grids = {}

    class Grids(Everything):
        def on_probs(self, call, probs):
            grids[call.layer.key] = (call.layer.grid, probs.shape[-2])

    with Tap(tiny, [Grids()]), torch.no_grad():
        tiny("a cat", num_inference_steps=1, height=48, width=32)
    for layer in attention_layers(tiny, 48, 32):
        grid, queries = grids[layer.key]
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


@pytest.mark.parametrize("mean_heads", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_the_read_only_path_equals_an_explicit_softmax_with_masks(mean_heads, mask_kind):
    """The fused kernel's output plus exp(q·kᵀ·s + mask − lse) for the wanted block, head by head or whole, equal
    softmax(q·kᵀ·s + mask) of the same q and k, and the kernel's output is plain SDPA's."""
    from probe.tap.core import _Intercept, attention_probs
    from probe.tap.layers import Layer, Split

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 12, 10) > 0.3
        mask[..., 0] = True  # every query keeps a key
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 12, 10)

    class Read(Consumer):
        def __init__(self):
            self.mean_heads, self.seen = mean_heads, None

        def wants(self, call):
            return True

        def on_probs(self, call, probs):
            self.seen = probs

    reader = Read()
    call = Call(Layer("m", "cross", (3, 4), 3), 0, 1.0, "cond", 2)
    intercept = _Intercept(None, [(call, [reader])], Split(slice(None), None, slice(2, 9)))
    with torch.no_grad():
        out = intercept.sdpa(q, k, v, attn_mask=mask, scale=0.3)
    expected = attention_probs(q, k, mask, 0.3)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                      scale=0.3))
    block = expected[..., 2:9]
    if mean_heads:  # head by head where the fused kernel ran (a float mask or none), all heads where it did not
        assert reader.seen.shape[1] == (3 if mask_kind == "bool" else 1)
        torch.testing.assert_close(reader.seen.mean(1), block.mean(1))
    else:
        torch.testing.assert_close(reader.seen, block)


class Means(Consumer):
    """Head-mean conditional blocks of every call, in the order they reach it; ``batched`` as asked."""

    mean_heads = conditional_only = True

    def __init__(self, batched: bool):
        self.batched, self.seen = batched, []

    def wants(self, call: Call) -> bool:
        return call.pass_ == "cfg"

    def on_probs(self, call, probs):
        self.seen.append((call.layer.key, call.step, call.conditional(probs)[:, 0].clone()))


def test_small_blocks_are_scored_together_at_the_end_of_the_denoiser_call(monkeypatch):
    """Batched, the built-in model's blocks of one shape are scored in one go after the denoiser call (one scoring
    per shape instead of one per layer), and each equals the block scored at once."""
    from probe.tap import core

    pipe = probe.load("shapes")
    scorings = []
    real = core._score
    monkeypatch.setattr(core, "_score", lambda blocks: scorings.append(len(blocks)) or real(blocks))
    seen = {}
    for batched in (False, True):
        scorings.clear()
        consumer = Means(batched)
        with Tap(pipe, [consumer]), torch.no_grad():
            pipe("a red circle and a blue square", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        seen[batched] = consumer.seen
        layers = attention_layers(pipe)
        shapes = {(layer.kind, layer.grid) for layer in layers}
        per_call = len(layers) if not batched else len(shapes)
        assert len(scorings) == 2 * per_call  # two denoiser calls
    by_key = {(key, step): block for key, step, block in seen[False]}
    assert len(by_key) == len(seen[True]) == 2 * len(attention_layers(pipe))
    for key, step, block in seen[True]:
        torch.testing.assert_close(block, by_key[key, step], atol=1e-6, rtol=1e-5)
    assert [k for k, s, _ in seen[True]] != [k for k, s, _ in seen[False]]  # they came late, by shape
