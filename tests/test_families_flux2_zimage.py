"""FLUX.2 (Flux2Pipeline, Flux2KleinPipeline) and Z-Image: the tap against an independent softmax of what the model
scores, recording against the plain pipeline, guidance with every objective, self- and cross-injection editing and
the inversion of a real image, on small random pipelines."""

import numpy as np
import pytest
import torch
from spied import attention_inputs, softmax
from tensors import assert_a_small_step_descends

import probe
from probe.models import attention_layers
from probe.shapes.world import Shape, render
from probe.steer.edit import edit
from probe.steer.guide import OBJECTIVES, Guide, Schedule, generate
from probe.steer.inversion import decode, encode, flow_invert, invert, regenerate
from probe.steer.pipelines import initial_noise
from probe.tap import Call, Consumer, Tap

PROMPT = "a cat and a dog"
NAMES = ["tiny-flux2", "tiny-flux2-klein", "tiny-zimage"]
SEQ = {"tiny-flux2": 160, "tiny-flux2-klein": 32, "tiny-zimage": 64}  # Flux2Pipeline's system message is long
GUIDANCE = {"tiny-flux2": 4.0, "tiny-flux2-klein": 4.0, "tiny-zimage": 5.0}  # the pipelines' own defaults
NO_CFG = {"tiny-flux2": 4.0, "tiny-flux2-klein": 1.0, "tiny-zimage": 0.0}  # the conditional branch alone
SIZES = [(32, 32), (32, 48), (32, 40)]  # px: 8×8, 8×12 and 8×10 tokens (Z-Image pads 80 image tokens to 96)
ROW = 32  # Z-Image pads each sample's image and caption tokens to a multiple of this
LONG = " and ".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle"))


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return request.param, probe.load(request.param)


def _kw(name, height=32, width=32, **extra):
    return {"height": height, "width": width, "max_sequence_length": SEQ[name], **extra}


def _run(name, pipe, steps=2, **extra):
    return pipe(prompt=PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                guidance_scale=extra.pop("guidance_scale", GUIDANCE[name]), **extra)


class Views(Consumer):
    """Every view the tap hands out at step 0 (every pass), in call order."""

    def __init__(self):
        self.seen = []

    def wants(self, call: Call) -> bool:
        return call.step == 0

    def on_probs(self, call, probs):
        self.seen.append((call.layer.name, call.layer.kind, call.pass_, probs.detach().clone()))


def _spied_run(name, pipe, **kw):
    """The plain pipeline's own q, k, scale and key mask at every attention call of the transformer, in order."""
    with attention_inputs(pipe.transformer) as calls:
        images = _run(name, pipe, output_type="np", **kw).images
    return [spied for call in calls for spied in call], images


def _blocks(name, module, n_image, n_keys):
    """(query rows, key columns) of each relation, written from the model code (not from the family)."""
    if name != "tiny-zimage":  # FLUX.2: [text (the padded templated sequence); image]
        text, image = slice(0, n_keys - n_image), slice(n_keys - n_image, None)
        return {"cross": (image, text), "self": (image, image), "text_image": (text, image), "text_text": (text, text)}
    if module.startswith("noise_refiner"):  # the image tokens alone, then their padding
        return {"self": (slice(0, n_image), slice(0, n_image))}
    if module.startswith("context_refiner"):  # the caption alone
        return {"text_text": (slice(None), slice(None))}
    image, text = slice(0, n_image), slice(-(-n_image // ROW) * ROW, None)  # the caption after the padded image
    return {"cross": (image, text), "self": (image, image), "text_image": (text, image), "text_text": (text, text)}


def _calls(views):
    """The views grouped by attention call (consecutive views of one module)."""
    calls = []
    for module, kind, pass_, probs in views:
        if not calls or calls[-1][0] != module:
            calls.append((module, pass_, {}))
        calls[-1][2][kind] = probs
    return calls


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_views_equal_an_independent_softmax_of_what_the_model_scores(model, size):
    """The plain run's own q and k (spied at F.scaled_dot_product_attention, with its key mask) → softmax(q·kᵀ·scale),
    sliced by the layout the model code sets up, equal the tap's views (float32, < 1e-4) at square and non-square
    sizes, every relation of every module, every pass of step 0 (Klein's cond and uncond, Z-Image's CFG batch)."""
    name, pipe = model
    kw = _kw(name, *size)
    if name == "tiny-zimage":  # a caption over 32 tokens beside one under: the batch's shorter one is key-masked
        kw["negative_prompt"] = LONG
    spied, plain = _spied_run(name, pipe, **kw)
    views = Views()
    with Tap(pipe, [views], height=size[0], width=size[1]), torch.no_grad():
        tapped = _run(name, pipe, output_type="np", **kw).images
    np.testing.assert_allclose(tapped, plain, atol=1e-5)
    n_image = (size[0] // 4) * (size[1] // 4)  # ×2 autoencoder, 2×2 latent pixels per token
    calls = _calls(views.seen)
    modules = probe.tap.layers.attention_modules(pipe.transformer)
    passes = {"tiny-flux2": ["cond"], "tiny-flux2-klein": ["cond", "uncond"], "tiny-zimage": ["cfg"]}[name]
    assert [p for _, p, _ in calls] == [p for p in passes for _ in modules]
    for (module, _, got), (q, k, scale, mask) in zip(calls, spied, strict=False):
        probs = softmax(q, k, scale, mask)
        blocks = _blocks(name, module, n_image, probs.shape[-1])
        assert set(got) == set(blocks), module
        for kind, (rows, keys) in blocks.items():
            assert got[kind].shape == probs[..., rows, keys].shape, (module, kind)
            assert (got[kind] - probs[..., rows, keys]).abs().max() < 1e-4, (module, kind)
    if name == "tiny-zimage":
        masks = [m is not None for *_, m in spied[: len(modules)]]
        assert masks == [not module.startswith("noise_refiner") for module in modules]  # caption keys masked
        assert bool(n_image % ROW) == (size == (32, 40))  # 80 image tokens: padded ones among the keys


@pytest.mark.parametrize("name", ["tiny-flux2", "tiny-flux2-klein"])
def test_flux2_reference_images_are_refused_not_split_as_the_image(name):
    from PIL import Image

    pipe = probe.load(name)
    reference = Image.fromarray(_circle(64))  # the pipelines take references of 64 px and more
    with pytest.raises(probe.tap.TapError, match="reference images"), Tap(pipe, [Views()], height=32, width=32):
        _run(name, pipe, image=reference, output_type="np", **_kw(name))


def test_the_text_keys_are_the_templated_prompts_own_tokens(model):
    """text_layout's positions are where the text encoder sees the prompt's words inside the chat template."""
    name, pipe = model
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][0]),
                                                       with_kwargs=True)
    try:
        with torch.no_grad():
            pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=SEQ[name])
    finally:
        hook.remove()
    layout = probe.prompts.text_layout(pipe, PROMPT, max_sequence_length=SEQ[name])
    assert layout.texts == PROMPT.split()
    ids = seen[0].tolist()
    if name == "tiny-zimage":  # the caption is the unpadded sequence
        ids = ids[: int((seen[0] != pipe.tokenizer.pad_token_id).sum())]
    words = pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert [ids[p] for p in layout.positions] == words
    assert layout.positions[0] > 2  # the template's tokens come first
    keys, _ = probe.prompts.subject_keys(pipe, PROMPT, ["cat", "dog"], SEQ[name])
    tok = probe.prompts.text_keys_tokenizer(pipe)  # the sweeps' placement agrees with guidance's
    assert probe.prompts.subject_indices(tok, PROMPT, ["cat", "dog"]) == keys == [[layout.positions[1]],
                                                                                  [layout.positions[4]]]


RELATIONS = ("cross", "self", "text_image", "text_text")


def _expected(kind, probs, blocks, positions):
    """One relation of one call's conditional row, head mean, the prompt's tokens only: (queries, keys) flattened."""
    rows, keys = blocks[kind]
    block = probs[:, rows, keys].mean(0)
    if kind in ("text_image", "text_text"):
        block = block[positions]
    return block[:, positions] if kind in ("cross", "text_text") else block


@pytest.mark.parametrize("size", [(32, 32), (32, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_recording_is_the_plain_generation_and_holds_the_independent_softmax(model, size):
    """Every relation of every module, recorded at step 0, equals the spied q·k softmax of the plain run's
    conditional row (head mean, float16 storage); the images equal the plain pipeline's."""
    name, pipe = model
    kw = _kw(name, *size)
    spied, plain = _spied_run(name, pipe, **kw)
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=2, progress=False, guidance_scale=GUIDANCE[name],
                        kinds=RELATIONS, **kw)
    got = tree["images"]["image"].values[0].astype(int)
    assert np.abs(got - (plain[0] * 255).round().astype(int)).max() <= 1
    h, w = size[0] // 4, size[1] // 4
    group = f"res{h}" if h == w else f"res{h}x{w}"
    assert [str(t) for t in tree[f"cross/{group}"].token_text.values[0] if t] == PROMPT.split()
    positions = probe.prompts.text_layout(pipe, PROMPT, max_sequence_length=SEQ[name]).positions
    modules = list(probe.tap.layers.attention_modules(pipe.transformer))
    cond = 0 if name == "tiny-zimage" else -1  # Z-Image's CFG batch is [cond; uncond]; FLUX.2's first pass is cond
    checked = set()
    for kind in RELATIONS:
        recording = tree[f"{kind}/{group}"]
        for layer in recording.layer.values:
            q, k, scale, mask = spied[modules.index(str(layer))]  # step 0, the first pass
            probs = softmax(q, k, scale, mask)[cond]
            expected = _expected(kind, probs, _blocks(name, str(layer), h * w, probs.shape[-1]), positions)
            recorded = torch.from_numpy(recording["attn"].sel(layer=layer).values[0, 0].astype(np.float32))
            torch.testing.assert_close(recorded.reshape(expected.shape), expected, atol=5e-4, rtol=1e-2)
            checked.add((str(layer), kind))
    every = {(m, kind) for m in modules for kind in _blocks(name, m, h * w, 10**4)}
    assert checked == every  # every relation every module computes


def test_kept_padding_is_every_caption_key_the_denoiser_has():
    """Z-Image pads the caption to a multiple of 32 with pad tokens of its own: keep_padding records all of those keys
    (template and pads included), each equal to the spied softmax's caption columns."""
    name, pipe = "tiny-zimage", probe.load("tiny-zimage")
    kw = _kw(name, 32, 40)
    spied, _ = _spied_run(name, pipe, **kw)
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=1, progress=False, guidance_scale=GUIDANCE[name],
                        keep_padding=True, **kw)
    layout = probe.prompts.text_layout(pipe, PROMPT, keep_padding=True, max_sequence_length=SEQ[name])
    assert len(layout.positions) == ROW and layout.texts[layout.positions.index(4)] == "cat"  # <|im_start|>user\na cat
    cross = tree["cross/res8x10"]
    modules = list(probe.tap.layers.attention_modules(pipe.transformer))
    for layer in cross.layer.values:
        q, k, scale, mask = spied[modules.index(str(layer))]
        probs = softmax(q, k, scale, mask)[0]  # the conditional row
        expected = _expected("cross", probs, _blocks(name, str(layer), 80, probs.shape[-1]), layout.positions)
        recorded = torch.from_numpy(cross["attn"].sel(layer=layer).values[0, 0].astype(np.float32))
        torch.testing.assert_close(recorded.reshape(expected.shape), expected, atol=5e-4, rtol=1e-2)


# -- guidance --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_small_step_lowers_each_objective(model, objective):
    name, pipe = model
    with Guide(pipe, PROMPT, ["cat", "dog"], objective, steps=4, **_kw(name)) as guide:
        assert_a_small_step_descends(guide, initial_noise(pipe, torch.Generator().manual_seed(1), 32, 32), (8, 8))


def test_unguided_generate_is_the_plain_pipeline_and_guidance_moves_it(model):
    name, pipe = model
    still = Schedule(alter_fraction=0.0, thresholds={})
    kw = {"seed": 0, "steps": 3, "output_type": "np", "progress": False, "guidance_scale": GUIDANCE[name], **_kw(name)}
    unguided = generate(pipe, PROMPT, subjects=["cat", "dog"], schedule=still, **kw)
    plain = _run(name, pipe, steps=3, output_type="np", **_kw(name)).images
    np.testing.assert_allclose(unguided.images, plain, atol=1e-5)
    guided = generate(pipe, PROMPT, subjects=["cat", "dog"], schedule=Schedule(thresholds={}), **kw)
    assert np.abs(guided.images - plain).max() > 1e-3 and len(guided.history) == 2  # steps 0 and 1 of 3
    assert guided.history["loss"].notna().all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_guided_generation_lowers_each_objective_where_it_refines(model, objective):
    """Through the pipeline's own loop (step 0's latent enters as latents=, in the pipeline's layout): three
    refinement iterations at step 0 leave the objective below where it started, and the image moves."""
    name, pipe = model
    schedule = Schedule(scale_factor=1.0, alter_fraction=0.0, thresholds={0: 1.0}, max_refinement=3)
    kw = {"seed": 0, "steps": 2, "output_type": "np", "progress": False, "guidance_scale": GUIDANCE[name], **_kw(name)}
    guided = generate(pipe, PROMPT, subjects=["cat", "dog"], objective=objective, schedule=schedule, **kw)
    row = guided.history.iloc[0]
    assert row.refinement_iterations == 3 and row.loss < row.initial_loss
    plain = _run(name, pipe, output_type="np", **_kw(name)).images
    assert np.abs(guided.images - plain).max() > 1e-4


# -- editing ---------------------------------------------------------------------------------------------------------

SOURCE, TARGET = "a red circle", "a blue circle"  # one token each: cross-injection aligns them
STEPS = 3
SEED = 3


class Keep(Consumer):
    """The probabilities of one kind in the generation's own passes (the conditional or the CFG batch)."""

    def __init__(self, kind):
        self.kind, self.seen = kind, {}

    def wants(self, call: Call) -> bool:
        return call.layer.kind == self.kind and call.pass_ in ("cfg", "cond")

    def on_probs(self, call, probs):
        self.seen[call.layer.name, call.step] = probs


def _plain_latent(name, pipe, prompt, **kw):
    return pipe(prompt=prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                guidance_scale=GUIDANCE[name], output_type="latent", **_kw(name), **kw).images


def test_self_injection_of_a_prompt_into_itself_is_the_plain_generation(model):
    name, pipe = model
    result = edit(pipe, SOURCE, SOURCE, seed=SEED, inject_steps=1.0, steps=STEPS, output_type="latent",
                  guidance_scale=GUIDANCE[name], **_kw(name))
    assert result.settings.layers and result.settings.steps == tuple(range(STEPS))
    torch.testing.assert_close(result.edited, _plain_latent(name, pipe, SOURCE)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("inject", ["self", "cross"])
def test_the_targets_block_becomes_the_sources_in_chosen_layers_and_steps_only(model, inject):
    name, pipe = model
    before, after = Keep(inject), Keep(inject)
    every = [la.name for la in attention_layers(pipe, 32, 32) if la.kind == inject]
    chosen = every[:2]
    result = edit(pipe, SOURCE, TARGET, seed=SEED, inject=inject, layers=chosen, inject_steps=[1], steps=STEPS,
                  before=[before], after=[after], output_type="latent", guidance_scale=GUIDANCE[name], **_kw(name))
    assert result.settings.layers == tuple(chosen)
    src, tgt = 0, 1  # FLUX.2's conditional pass is [source, target]; Z-Image's CFG batch starts with it
    assert set(before.seen) == {(layer, step) for layer in every for step in range(STEPS)}
    for (layer, step), pre in before.seen.items():
        post = after.seen[layer, step]
        if layer in chosen and step == 1:
            assert torch.equal(post[tgt], pre[src]) and not torch.equal(pre[tgt], pre[src])
            keep = [i for i in range(pre.shape[0]) if i != tgt]  # the source and the unconditional rows untouched
            assert torch.equal(post[keep], pre[keep])
        else:
            assert post is pre
    assert not torch.equal(result.edited, result.source)


def test_shared_token_cross_injection_keeps_the_targets_own_word_columns(model):
    """cross_tokens="shared": the target's columns of the swapped word (red → blue, found among every text key of the
    templated prompts) stay its own; every other column becomes the source's."""
    name, pipe = model
    before, after = Keep("cross"), Keep("cross")
    result = edit(pipe, SOURCE, TARGET, seed=SEED, inject="cross", cross_tokens="shared", inject_steps=[0], steps=2,
                  before=[before], after=[after], output_type="latent", guidance_scale=GUIDANCE[name], **_kw(name))
    layouts = [probe.prompts.text_layout(pipe, p, keep_padding=True, max_sequence_length=SEQ[name])
               for p in (SOURCE, TARGET)]
    swapped = [p for p, a, b in zip(layouts[0].positions, layouts[0].texts, layouts[1].texts) if a != b]
    assert [layouts[1].texts[layouts[1].positions.index(p)] for p in swapped] == ["blue"]
    for layer in result.settings.layers:
        pre, post = before.seen[layer, 0], after.seen[layer, 0]
        shared = [k for k in range(pre.shape[-1]) if k not in swapped]
        assert torch.equal(post[1][..., shared], pre[0][..., shared])
        assert torch.equal(post[1][..., swapped], pre[1][..., swapped])
        assert not torch.equal(pre[0][..., swapped], pre[1][..., swapped])


# -- real images -----------------------------------------------------------------------------------------------------

def _circle(size=32):
    return render([Shape("circle", "red", 15.0, 17.0, 8.0)], size=size)[0]


def test_decode_is_the_pipelines_own_decoding_and_encode_its_inverse(model):
    """FLUX.2: unpacked, batch-norm statistics undone, unpatchified (Flux2Pipeline's own steps); Z-Image: scaled and
    shifted. At a non-square size, against the pipeline's own image; encode against the pipeline's own encoder."""
    name, pipe = model
    kw = {"height": 32, "width": 48, "max_sequence_length": SEQ[name]}
    latent = pipe(prompt=SOURCE, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  guidance_scale=NO_CFG[name], output_type="latent", **kw).images
    image = pipe(prompt=SOURCE, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 guidance_scale=NO_CFG[name], output_type="np", **kw).images[0]
    if name != "tiny-flux2-klein":  # Klein's latent output is already unpacked, so only Flux2Pipeline's is checked
        np.testing.assert_array_equal(decode(pipe, latent[0], 32, 48), (image * 255).round().clip(0, 255)
                                      .astype(np.uint8))
    x = torch.from_numpy(_circle()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        if name == "tiny-zimage":
            vae = pipe.vae
            expected = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        else:
            expected = pipe._pack_latents(pipe._encode_vae_image(x, generator=None))
    torch.testing.assert_close(encode(pipe, _circle(), 32, 32), expected[0])


@pytest.fixture(params=NAMES)
def blind(request):
    """A transformer whose velocity ignores the latent (the image tokens' embedding zeroed): the Euler inversion is
    then exactly the sampler run backwards."""
    pipe = probe.load(request.param)
    net = pipe.transformer
    embed = net.all_x_embedder["2-1"] if request.param == "tiny-zimage" else net.x_embedder
    with torch.no_grad():
        embed.weight.zero_()
        if embed.bias is not None:
            embed.bias.zero_()
    return request.param, pipe


def test_flow_inversion_is_exact_when_the_velocity_ignores_the_latent(blind):
    name, pipe = blind
    inversion = flow_invert(pipe, _circle(), SOURCE, steps=6, height=32, width=32, guidance_scale=NO_CFG[name])
    assert inversion.latents.shape[0] == 7 and inversion.timesteps.shape == (6,)
    torch.testing.assert_close(inversion.clean, encode(pipe, _circle(), 32, 32))
    regenerated = _sampled(name, pipe, regenerate(pipe, inversion, output_type="latent", height=32, width=32))
    torch.testing.assert_close(regenerated, inversion.clean, atol=1e-5, rtol=0)


def _sampled(name, pipe, latent):
    """A pipeline's one latent output in the layout it samples in (Klein's output is unpacked and de-normalised)."""
    return probe.families.family(pipe).pack(pipe, latent[None])[0] if name == "tiny-flux2-klein" else latent


def test_inverted_noise_regenerates_the_image_far_better_than_a_random_start(model):
    name, pipe = model
    inversion = invert(pipe, _circle(), SOURCE, steps=10, height=32, width=32, guidance_scale=NO_CFG[name])
    assert inversion.guidance_scale == NO_CFG[name]
    from_inverted = _sampled(name, pipe, regenerate(pipe, inversion, output_type="latent", height=32, width=32))
    from_random = _sampled(name, pipe, pipe(prompt=SOURCE, num_inference_steps=10, guidance_scale=NO_CFG[name],
                                            output_type="latent", generator=torch.Generator().manual_seed(0),
                                            height=32, width=32).images[0])
    assert from_inverted.shape == inversion.clean.shape
    assert (from_inverted - inversion.clean).abs().mean() < 0.25 * (from_random - inversion.clean).abs().mean()


def test_an_inversion_at_a_guidance_the_conditional_branch_cannot_give_is_refused(model):
    name, pipe = model
    if name == "tiny-flux2":  # its guidance is an input of the transformer: any scale inverts
        assert invert(pipe, _circle(), SOURCE, steps=1, height=32, width=32, guidance_scale=7.0).guidance_scale == 7
        return
    with pytest.raises(ValueError, match=f"guidance_scale={NO_CFG[name]:g}"):
        flow_invert(pipe, _circle(), SOURCE, steps=2, guidance_scale=GUIDANCE[name], height=32, width=32)


def test_real_image_editing_pins_the_source_row_to_the_flow_trajectory(model):
    name, pipe = model
    inversion = invert(pipe, _circle(), SOURCE, steps=STEPS, height=32, width=32, guidance_scale=NO_CFG[name])
    inputs = []

    def keep(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        inputs.append(torch.stack(x).squeeze(2) if isinstance(x, list) else x.clone())

    hook = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        result = edit(pipe, SOURCE, TARGET, image=inversion, steps=STEPS, guidance_scale=NO_CFG[name],
                      output_type="latent", **_kw(name))
    finally:
        hook.remove()
    assert len(inputs) == STEPS and result.settings.real_image
    for i, batch in enumerate(inputs):
        assert torch.equal(batch[0], inversion.latents[i])
    assert torch.equal(inputs[0][1], inversion.noise)  # both rows start from the inverted noise
    assert not torch.equal(inputs[-1][1], inversion.latents[-2])


def test_a_prompt_that_is_a_word_of_the_template_is_placed_where_the_prompt_is(model):
    """"assistant" is also the template's generation prompt after the prompt: its key is the prompt's own place,
    where the first word of any prompt sits."""
    name, pipe = model
    first = probe.prompts.text_layout(pipe, PROMPT, max_sequence_length=SEQ[name]).positions[0]
    layout = probe.prompts.text_layout(pipe, "assistant", max_sequence_length=SEQ[name])
    assert layout.texts == ["assistant"] and layout.positions == [first]


def test_a_prompt_that_fits_alone_but_not_inside_flux2s_template_is_refused():
    """FLUX.2 [dev] puts a system message before the prompt: a prompt shorter than max_sequence_length that its
    pipeline would cut inside the template is refused with both counts, by text_layout and by record before a
    step runs; one that fits with the template is laid out whole."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    pipe = probe.load("tiny-flux2")

    def templated_tokens(prompt: str) -> int:  # as Flux2Pipeline tokenises it, untruncated
        text = pipe.tokenizer.apply_chat_template(format_input([prompt], pipe.system_message)[0], tokenize=False)
        return len(pipe.tokenizer(text, add_special_tokens=False).input_ids)

    length, template = 64, templated_tokens("")
    fits, cut = " ".join(["cat"] * (length - template)), " ".join(["cat"] * (length - 1))
    assert template > 16 and len(pipe.tokenizer(cut).input_ids) < length < templated_tokens(cut)
    assert probe.prompts.text_layout(pipe, fits, max_sequence_length=length).texts == fits.split()
    expected = rf"is {templated_tokens(cut)} tokens inside the pipeline's template.*reads at most {length}"
    with pytest.raises(ValueError, match=expected):
        probe.prompts.text_layout(pipe, cut, max_sequence_length=length)
    with pytest.raises(ValueError, match=expected):
        probe.record(pipe, cut, seeds=[0], steps=1, progress=False, **_kw("tiny-flux2", max_sequence_length=length))


def test_a_byte_level_chat_tokenizer_gives_the_prompts_words_at_their_positions():
    """Qwen's and Mistral's tokenizers are byte-level BPEs ("Ġcat"): the prompt's tokens read as its words, at the
    positions the templated sequence gives them, the template and the padding left out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from probe.families.keys import TextKeys, templated, verbatim
    from probe.families.words import CHAT_TEMPLATE, CHAT_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([PROMPT, "a red circle and a blue square", "user assistant"] * 5, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=CHAT_TOKENS,  # room to merge every word whole
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>",
                                  additional_special_tokens=CHAT_TOKENS[1:])
    tok.chat_template = CHAT_TEMPLATE
    render = verbatim(lambda p: tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True))
    chat = TextKeys(tok, templated(tok, render, 32, pad=True), 32)
    padded = chat(PROMPT, padding="max_length", max_length=32, truncation=True)
    raw = tok.convert_ids_to_tokens(padded["input_ids"])
    positions = [i for i, m in enumerate(padded["attention_mask"]) if m]
    assert [raw[i] for i in positions] == ["a", "Ġcat", "Ġand", "Ġa", "Ġdog"] and positions[0] == 3  # after "user\n"
    assert chat.convert_ids_to_tokens([padded["input_ids"][i] for i in positions]) == PROMPT.split()
    assert chat.convert_ids_to_tokens(chat(PROMPT)["input_ids"]) == PROMPT.split()


def test_zimage_past_its_cfg_truncation_records_the_conditional_call():
    """Past ``cfg_truncation`` Z-Image runs the conditional branch alone: that call is the conditional pass, and its
    maps equal the spied softmax of that call (its one sample), not half of a batch it does not have."""
    name, pipe = "tiny-zimage", probe.load("tiny-zimage")
    kw = _kw(name, cfg_truncation=0.3)
    with attention_inputs(pipe.transformer) as calls:
        _run(name, pipe, steps=3, output_type="np", **kw)
    assert [c[0][0].shape[0] for c in calls] == [2, 1, 1]  # CFG at step 0 only
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=3, progress=False, guidance_scale=GUIDANCE[name],
                        kinds=("cross",), **kw)
    positions = probe.prompts.text_layout(pipe, PROMPT, max_sequence_length=SEQ[name]).positions
    modules = list(probe.tap.layers.attention_modules(pipe.transformer))
    recording = tree["cross/res8"]
    for step in (0, 2):
        for layer in recording.layer.values:
            q, k, scale, mask = calls[step][modules.index(str(layer))]
            expected = _expected("cross", softmax(q, k, scale, mask)[0], _blocks(name, str(layer), 64, k.shape[-2]),
                                 positions)
            recorded = recording["attn"].sel(layer=layer).values[0, step].astype(np.float32)
            torch.testing.assert_close(torch.from_numpy(recorded).reshape(expected.shape), expected, atol=5e-4,
                                       rtol=1e-2)
