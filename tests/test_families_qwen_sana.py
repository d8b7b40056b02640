"""Qwen-Image (joint attention, text first, Qwen's rotary embedding) and Sana (linear self-attention, softmax
cross-attention) on tiny random pipelines: the tap's maps against an independent softmax of the q and k each model
hands to its attention function, recordings against the plain pipeline, guidance with every objective, editing,
inversion of a real image, and Sana's self-attention refused by name."""

import inspect

import numpy as np
import pytest
import torch
from spied import attention_inputs, softmax
from tensors import assert_a_small_step_descends

import probe
from probe.families import family
from probe.families.qwen import QwenImage
from probe.families.sana import Sana
from probe.prompts import text_layout
from probe.shapes.world import Shape, render
from probe.steer.edit import edit, injected_layers
from probe.steer.guide import OBJECTIVES, Guide, Schedule, generate
from probe.steer.inversion import decode, encode, invert, regenerate
from probe.steer.pipelines import initial_noise
from probe.tap import Call, Consumer, Tap

PROMPT, SUBJECTS = "a cat and a dog", ["cat", "dog"]
QWEN, SANA = "tiny-qwen-image", "tiny-sana"
MAX_SEQ = 16
STEPS = 2
# Sana: sides are multiples of 32 px and its pipeline bins sizes to an aspect-ratio table unless told not to
OWN = {QWEN: {}, SANA: {"use_resolution_binning": False}}
NON_SQUARE = {QWEN: (32, 48), SANA: (32, 64)}  # the smallest non-square size each pipeline takes
TOLERANCE = 1e-4  # float32: the tap's maps against an independent softmax


@pytest.fixture(scope="module", params=[QWEN, SANA])
def dit(request):
    return request.param, probe.load(request.param)


def _kw(name: str, height: int = 32, width: int = 32) -> dict:
    return {"height": height, "width": width, "max_sequence_length": MAX_SEQ, **OWN[name]}


def _plain(pipe, name: str, prompt: str = PROMPT, output_type: str = "np", seed: int = 0, **kw):
    kw = {**_kw(name), **kw}
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type=output_type, guidance_scale=7.5, **kw).images


class Views(Consumer):
    """Every view of the real passes at step 0, in call order."""

    def __init__(self):
        self.seen = []

    def wants(self, call: Call) -> bool:
        return call.step == 0 and call.pass_ in ("cfg", "cond")

    def on_probs(self, call, probs):
        self.seen.append((call.layer.key, call.pass_, call.layer.grid, probs.detach().clone()))


def _spied_run(pipe, name: str, **kw):
    """The plain pipeline's images and (q, k, scale, mask) of every attention call of the transformer at step 0, as
    handed to F.scaled_dot_product_attention (Qwen: through dispatch_attention_fn's native backend)."""
    with attention_inputs(probe.tap.denoiser(pipe)) as calls:
        images = _plain(pipe, name, **kw)
    return images, calls[0]


@pytest.mark.parametrize("square", [True, False], ids=["square", "non-square"])
def test_views_equal_an_independent_softmax_of_what_the_model_scores(dit, square):
    """Qwen-Image: one softmax over [text; image] per block, sliced into its four relations; Sana: the cross-attention
    softmax over the text keys (padding masked) is the cross view whole, and its linear self-attention calls no
    softmax at all. At a square and the smallest non-square size, the plain and the tapped images are equal."""
    name, pipe = dit
    height, width = (32, 32) if square else NON_SQUARE[name]
    plain, spied = _spied_run(pipe, name, height=height, width=width)
    views = Views()
    with Tap(pipe, [views], height=height, width=width), torch.no_grad():
        tapped = _plain(pipe, name, height=height, width=width)
    np.testing.assert_allclose(tapped, plain, atol=1e-6)
    grid = (height // 4, width // 4)  # ×2 autoencoder, 2×2 patches
    n_image = grid[0] * grid[1]
    by_module: dict[str, list] = {}
    for (module, kind), pass_, seen_grid, probs in views.seen:
        assert seen_grid == grid and pass_ == ("cond" if name == QWEN else "cfg")
        by_module.setdefault(module, []).append((kind, probs))
    assert len(spied) == len(by_module) == 2  # one softmax per block: Qwen's joint attn, Sana's attn2 (attn1 linear)
    for (q, k, scale, mask), (module, got) in zip(spied, by_module.items()):
        probs = softmax(q, k, scale, mask)
        if name == QWEN:
            assert module.endswith(".attn")
            n_text = probs.shape[-1] - n_image
            text, image = slice(0, n_text), slice(n_text, None)
            blocks = {"cross": (image, text), "self": (image, image), "text_image": (text, image),
                      "text_text": (text, text)}
        else:
            assert module.endswith(".attn2") and mask is not None and q.shape[-2] == n_image
            blocks = {"cross": (slice(None), slice(None))}
        assert {kind for kind, _ in got} == set(blocks)
        for kind, view in got:
            rows, keys = blocks[kind]
            assert (view.double() - probs[..., rows, keys]).abs().max() < TOLERANCE, (module, kind)


def test_a_recording_is_the_plain_generation_and_holds_its_maps(dit):
    name, pipe = dit
    kinds = ("cross", "self") if name == QWEN else ("cross",)
    height, width = NON_SQUARE[name]
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=STEPS, guidance_scale=7.5, kinds=kinds, progress=False,
                        **_kw(name, height, width))
    plain = _plain(pipe, name, height=height, width=width)
    diff = np.abs(tree["images"]["image"].values[0].astype(int) - (plain[0] * 255).round().astype(int))
    assert diff.max() <= 1
    h, w = height // 4, width // 4
    cross = tree[f"cross/res{h}x{w}"]
    texts = [str(t) for t in cross.token_text.values[0] if t]
    assert texts[-5:] == ["a", "cat", "and", "a", "dog"] and texts.count("cat") == 1
    assert texts[:-5] == ([] if name == QWEN else ["<bos>"])  # Qwen's template tokens are not the prompt's
    row = cross["attn"].isel(sample=0, step=1).mean("layer").values  # (y, x, token)
    assert row.shape[:2] == (h, w) and np.all(np.nansum(row, -1) <= 1 + 2e-3) and np.all(np.nansum(row, -1) > 0)
    if name == QWEN:  # the rows of the joint softmax hold the text and the image keys together
        self_rows = tree[f"self/res{h}x{w}"]["attn"].isel(sample=0, step=1, layer=0).values.reshape(h * w, h * w)
        assert np.all(self_rows.sum(-1) + np.nansum(row, -1).reshape(-1) <= 1 + 4e-3)


def test_the_text_keys_are_the_tokens_the_pipeline_encodes(dit):
    """The family's view of the text keys equals the ids the text encoder receives, cut as the pipeline cuts them
    (Qwen: its template's 34 first tokens dropped; Sana: the first and the last max_sequence_length − 1 kept)."""
    name, pipe = dit
    seen = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("input_ids", args[0] if args else None),
                                                  kwargs["attention_mask"])), with_kwargs=True)
    try:
        with torch.no_grad():
            if name == QWEN:
                embeds, _ = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=MAX_SEQ)
            else:
                instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
                embeds, *_ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, device="cpu",
                                                max_sequence_length=MAX_SEQ, complex_human_instruction=instruction)
    finally:
        hook.remove()
    ids, mask = seen[0]
    if name == QWEN:
        fed = ids[0][mask[0].bool()][pipe.prompt_template_encode_start_idx:][:MAX_SEQ]
    else:
        fed = ids[0][[0, *range(ids.shape[1] - MAX_SEQ + 1, ids.shape[1])]]
    keys = family(pipe).text_parts(pipe, MAX_SEQ)[0][1]
    view = keys(PROMPT, padding="max_length", max_length=MAX_SEQ, truncation=True)
    assert view.input_ids[: embeds.shape[1]] == fed.tolist() and len(fed) == embeds.shape[1]
    layout = text_layout(pipe, PROMPT, max_sequence_length=MAX_SEQ)
    assert [layout.texts[layout.positions.index(p)] for p in layout.positions if layout.texts[
        layout.positions.index(p)] in SUBJECTS] == SUBJECTS
    words = pipe.tokenizer.convert_ids_to_tokens(fed.tolist())
    for word in SUBJECTS:  # each subject's key holds the subject's own token
        position = layout.positions[layout.texts.index(word)]
        assert words[position].lstrip("Ġ▁") == word


def test_a_sweeps_subject_placement_reads_the_text_keys_view(dit):
    """The sweeps place subjects through the family's text-keys tokenizer (prompt_tokens, token_positions): its
    tokens read as the prompt's words and sit where text_layout puts them, not as the bare tokenizer spells them
    (Qwen's "Ġcat" would not be found)."""
    _, pipe = dit
    prompt = "a red cat and a blue dog"
    tok = probe.prompts.text_keys_tokenizer(pipe)
    layout = text_layout(pipe, prompt)
    assert probe.prompts.prompt_tokens(tok, prompt) == layout.texts
    assert probe.prompts.token_positions(tok, prompt) == layout.positions
    found = probe.prompts.subject_indices(tok, prompt, ["cat", "dog"])
    assert [[layout.texts[layout.positions.index(p)] for p in at] for at in found] == [["cat"], ["dog"]]


def test_a_prompt_the_text_keys_would_cut_is_refused_not_shortened(dit):
    """Qwen-Image keeps max_sequence_length keys after its template's prefix, Sana the last max_sequence_length − 1
    of its instruction and prompt: a prompt longer than that is refused by name (its last words would be cut); the
    longest that fits is laid out whole (the template's closing tokens may be cut: the model still reads every word)."""
    name, pipe = dit
    room = MAX_SEQ if name == QWEN else MAX_SEQ - 1  # Sana: its first key is the instruction's start token
    fits, cut = " ".join(["cat"] * room), " ".join(["cat"] * (room + 1))
    texts = text_layout(pipe, fits, max_sequence_length=MAX_SEQ).texts
    assert texts == (["<bos>"] if name == SANA else []) + fits.split()
    with pytest.raises(ValueError, match=r"tokens inside the pipeline's template.*prompt's last words would be cut"):
        text_layout(pipe, cut, max_sequence_length=MAX_SEQ)


def test_an_attention_module_the_family_does_not_know_is_named_not_left_untapped(dit):
    """A denoiser with one more attention module than its family maps is refused, the module named."""
    import copy

    name, pipe = dit
    net = pipe.transformer
    block = net.transformer_blocks[0]
    net.add_module("extra", copy.deepcopy(block.attn if name == QWEN else block.attn2))
    try:
        with pytest.raises(TypeError, match=r"the (Qwen-Image|Sana) family does not know: extra \("):
            family(pipe).modules(net)
    finally:
        del net.extra
    assert "extra" not in "".join(family(pipe).modules(net))


def test_the_tiny_byte_level_tokenizer_has_the_same_ids_in_every_process(monkeypatch):
    """The tiny Qwen-Image tokenizer is built, not trained or stored: its ids must not follow the order in which the
    tokenizers library lists the byte alphabet (another in each process), or the same weights would read other
    embedding rows in another process."""
    from tokenizers import pre_tokenizers

    from probe.families.words import CHAT_TOKENS, byte_level

    here = byte_level(CHAT_TOKENS, "<|endoftext|>", texts=["user\n"]).get_vocab()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for order in (sorted(alphabet), sorted(alphabet, reverse=True)):
        monkeypatch.setattr(pre_tokenizers.ByteLevel, "alphabet", staticmethod(lambda order=order: list(order)))
        assert byte_level(CHAT_TOKENS, "<|endoftext|>", texts=["user\n"]).get_vocab() == here


# -- guidance ----------------------------------------------------------------------------------------------------------

NEEDS_SELF = {name for name, objective in OBJECTIVES.items() if objective.needs_self}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_small_step_lowers_each_objective(dit, objective):
    """Every objective descends on Qwen-Image; on Sana those of cross-attention alone do, and one that needs
    self-attention maps is refused, saying that Sana's self-attention is linear."""
    name, pipe = dit
    if name == SANA and objective in NEEDS_SELF:
        with pytest.raises(ValueError, match="linear attention.*no self-attention map"):
            Guide(pipe, PROMPT, SUBJECTS, objective, steps=4, max_sequence_length=MAX_SEQ)
        return
    with Guide(pipe, PROMPT, SUBJECTS, objective, steps=4, max_sequence_length=MAX_SEQ) as guide:
        assert_a_small_step_descends(guide, initial_noise(pipe, torch.Generator().manual_seed(1), None, None), (8, 8))


def test_unguided_generate_is_the_plain_pipeline_and_guidance_moves_it(dit):
    name, pipe = dit
    kw = {"seed": 0, "steps": 3, "guidance_scale": 7.5, "output_type": "np", "progress": False, **_kw(name)}
    unguided = generate(pipe, PROMPT, subjects=SUBJECTS, schedule=Schedule(alter_fraction=0.0, thresholds={}), **kw)
    plain = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                 guidance_scale=7.5, **_kw(name)).images
    np.testing.assert_allclose(unguided.images, plain, atol=1e-5)
    guided = generate(pipe, PROMPT, subjects=SUBJECTS, schedule=Schedule(thresholds={}), **kw)
    assert np.abs(guided.images - plain).max() > 1e-3 and len(guided.history) == 2


# -- editing -----------------------------------------------------------------------------------------------------------

SOURCE, TARGET = "a red circle", "a blue circle"  # one token each: cross-attention aligns them


class Keep(Consumer):
    def __init__(self, kind: str):
        self.kind, self.seen = kind, {}

    def wants(self, call: Call) -> bool:
        return call.layer.kind == self.kind

    def on_probs(self, call, probs):
        self.seen[call.layer.name, call.step] = probs


@pytest.mark.parametrize("inject", ["self", "cross"])
def test_an_injection_copies_the_sources_block_in_chosen_layers_and_steps_only(dit, inject):
    name, pipe = dit
    if name == SANA and inject == "self":
        with pytest.raises(ValueError, match="linear attention"):
            edit(pipe, SOURCE, TARGET, seed=3, inject="self", steps=STEPS, output_type="latent", **_kw(name))
        return
    same = edit(pipe, SOURCE, SOURCE, seed=3, inject=inject, inject_steps=1.0, steps=STEPS, guidance_scale=7.5,
                output_type="latent", **_kw(name))
    torch.testing.assert_close(same.edited, _plain(pipe, name, SOURCE, "latent", 3)[0], atol=1e-4, rtol=0)
    before, after = Keep(inject), Keep(inject)
    every = [layer.name for layer in injected_layers(pipe, inject, height=32, width=32)]
    chosen = every[:1]
    edit(pipe, SOURCE, TARGET, seed=3, inject=inject, layers=chosen, inject_steps=[1], steps=STEPS, guidance_scale=7.5,
         before=[before], after=[after], output_type="latent", **_kw(name))
    src, tgt = (0, 1) if name == QWEN else (2, 3)  # Qwen runs [source, target]; Sana [uncond ×2, cond ×2]
    assert set(before.seen) == {(layer, step) for layer in every for step in range(STEPS)}
    for (layer, step), pre in before.seen.items():
        post = after.seen[layer, step]
        if layer in chosen and step == 1:
            assert torch.equal(post[tgt], pre[src]) and not torch.equal(pre[tgt], pre[src])
            assert torch.equal(post[:tgt], pre[:tgt])
        else:
            assert post is pre


# -- real images -------------------------------------------------------------------------------------------------------


def _circle():
    return render([Shape("circle", "red", 15.0, 17.0, 8.0)], size=32)[0]


def test_decode_is_the_pipelines_own_decoding_and_encode_its_inverse(dit):
    name, pipe = dit
    latents = _plain(pipe, name, SOURCE, "latent")
    images = _plain(pipe, name, SOURCE, "np")
    np.testing.assert_array_equal(decode(pipe, latents[0], 32, 32), (images[0] * 255).round().clip(0, 255)
                                  .astype(np.uint8))
    latent = encode(pipe, _circle())
    assert latent.shape == latents.shape[1:]
    x = torch.from_numpy(_circle()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():  # the latent as each pipeline samples it, computed here from the autoencoder's own outputs
        if name == QWEN:  # a one-frame video, normalised per channel, packed 2×2
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
            expected = (pipe.vae.encode(x[:, :, None]).latent_dist.mean - mean) / std
            expected = pipe._pack_latents(expected, 1, expected.shape[1], *expected.shape[-2:])
        else:  # deep compression: one latent, scaled
            expected = pipe.vae.encode(x).latent * pipe.vae.config.scaling_factor
    torch.testing.assert_close(latent, expected[0])


def test_a_real_image_is_inverted_and_edited_from_its_trajectory(dit):
    name, pipe = dit
    inversion = invert(pipe, _circle(), SOURCE, steps=10, height=32, width=32)
    from_inverted = regenerate(pipe, inversion, output_type="latent", **_kw(name))
    from_random = pipe(SOURCE, num_inference_steps=10, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                       output_type="latent", **_kw(name)).images[0]
    assert from_inverted.shape == inversion.clean.shape
    assert (from_inverted - inversion.clean).abs().mean() < 0.25 * (from_random - inversion.clean).abs().mean()
    inversion = invert(pipe, _circle(), SOURCE, steps=STEPS, height=32, width=32)
    inputs = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)
    try:
        result = edit(pipe, SOURCE, TARGET, image=inversion, inject="cross", steps=STEPS, guidance_scale=1.0,
                      output_type="latent", **_kw(name))
    finally:
        hook.remove()
    assert len(inputs) == STEPS and result.settings.real_image
    for i, batch in enumerate(inputs):
        assert torch.equal(batch[0], inversion.latents[i])
    assert torch.equal(inputs[0][1], inversion.noise)
    assert torch.equal(result.source, inversion.clean) and not torch.equal(result.edited, inversion.clean)


# -- what Sana has no map of -------------------------------------------------------------------------------------------


def test_sanas_self_attention_is_refused_by_name_and_its_cross_attention_recorded():
    pipe = probe.load(SANA)
    for kinds in (("self",), ("cross", "self")):
        with pytest.raises(ValueError, match="Sana.*linear attention.*no self-attention map.*kinds=\\('cross',\\)"):
            probe.record(pipe, PROMPT, seeds=[0], steps=1, kinds=kinds, progress=False, **_kw(SANA))
    assert family(pipe).unmapped(pipe.transformer) == {"self": Sana().unmapped(None)["self"]}
    assert not QwenImage().unmapped(None)
    layers = probe.tap.attention_layers(pipe, 32, 32)
    assert {layer.kind for layer in layers} == {"cross"} and all(la.name.endswith("attn2") for la in layers)


def test_qwen_true_cfg_records_the_conditional_pass_and_is_the_plain_generation():
    """With a negative prompt, QwenImagePipeline runs the conditional and unconditional halves apart (named by its
    cache_context): the recording keeps the conditional one, and the images are the plain pipeline's."""
    pipe = probe.load(QWEN)
    cfg = {"negative_prompt": "a dog", "true_cfg_scale": 4.0, **_kw(QWEN)}
    passes = []

    class Passes(Consumer):
        def wants(self, call: Call) -> bool:
            passes.append(call.pass_)
            return False

    with Tap(pipe, [Passes()], height=32, width=32), torch.no_grad():
        _plain(pipe, QWEN, **cfg)
    assert set(passes) == {"cond", "uncond"} and passes.count("cond") == passes.count("uncond")
    # record's guidance_scale is the pipeline's classifier-free guidance: Qwen-Image's true_cfg_scale
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=STEPS, guidance_scale=4.0, kinds=("cross",), progress=False,
                        negative_prompt="a dog", **_kw(QWEN))
    plain = _plain(pipe, QWEN, **cfg)
    assert np.abs(tree["images"]["image"].values[0].astype(int) - (plain[0] * 255).round().astype(int)).max() <= 1
    recorder_view = Views()
    with Tap(pipe, [recorder_view], height=32, width=32), torch.no_grad():
        _plain(pipe, QWEN, **cfg)
    cond = [probs for (_, kind), pass_, _, probs in recorder_view.seen if kind == "cross" and pass_ == "cond"]
    recorded = tree["cross/res8"]["attn"].isel(sample=0, step=0).values  # (layer, y, x, token)
    positions = text_layout(pipe, PROMPT, max_sequence_length=MAX_SEQ).positions
    for layer, probs in enumerate(cond):
        expected = probs[0].float().mean(0)[:, positions].reshape(8, 8, -1)
        torch.testing.assert_close(torch.from_numpy(recorded[layer].astype("float32")), expected, atol=2e-3,
                                   rtol=1e-2)


def test_qwen_reference_images_and_sanas_binned_sizes_are_refused_not_misread():
    pipe = probe.load(QWEN)
    views = Views()
    inputs = {"hidden_states": torch.randn(1, 128, 16), "encoder_hidden_states": torch.randn(1, 5, 16),
              "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 8, 8), (1, 8, 8)]], "return_dict": False}
    with pytest.raises(probe.tap.TapError, match="reference images"), Tap(pipe, [views]) as tap:
        with tap.pass_("cond", 0), torch.no_grad():
            pipe.transformer(**inputs)
    sana = probe.load(SANA)
    binned = {**_kw(SANA), "use_resolution_binning": True}  # 32 px → the 512 px bin
    with pytest.raises(probe.tap.TapError, match="use_resolution_binning=False"):
        probe.record(sana, PROMPT, seeds=[0], steps=1, guidance_scale=7.5, kinds=("cross",), progress=False, **binned)


def test_the_studies_run_on_qwen_image_and_sanas_probe_study_is_refused(tmp_path):
    """The studies on Qwen-Image as on SD3 and FLUX (probes of both kinds, edits of generated and rendered sources;
    guidance is checked above, objective by objective); Sana's probe study needs self-attention maps and is refused."""
    from probe.studies.editing import edit_study
    from probe.studies.probing import probe_study

    pipe = probe.load(QWEN)
    with pytest.warns(UserWarning, match="random test model"):
        probed = probe_study(pipe, steps=3, quick=True, out=tmp_path, progress=False)
    assert set(probed.accuracy.kind) == {"cross", "self"} and probed.accuracy.accuracy.between(0, 1).all()
    with pytest.warns(UserWarning, match="random test model"):
        edits = edit_study(pipe, steps=2, quick=True, out=tmp_path, progress=False).results
    assert set(edits.origin) == {"generated", "rendered"} and edits.n_layers[edits.inject == "self"].gt(0).all()
    with pytest.raises(ValueError, match="linear attention"):
        probe_study(probe.load(SANA), steps=3, quick=True, out=tmp_path, progress=False)


def test_kept_padding_records_every_text_key_so_each_softmax_row_sums_to_one(dit):
    """keep_padding=True keeps every text key (Qwen-Image's template tail, Sana's instruction token and padding): a
    query's row over them, with its image keys on Qwen-Image's joint softmax, holds all of its probability."""
    name, pipe = dit
    kinds = ("cross", "self") if name == QWEN else ("cross",)
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=STEPS, guidance_scale=7.5, kinds=kinds, keep_padding=True,
                        progress=False, **_kw(name))
    cross = tree["cross/res8"]["attn"].isel(sample=0).values.astype("float64")  # (step, layer, y, x, token)
    texts = [str(t) for t in tree["cross/res8"].token_text.values[0]]
    total = cross.sum(-1)
    if name == QWEN:
        assert texts == ["a", "cat", "and", "a", "dog", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
        total = total + tree["self/res8"]["attn"].isel(sample=0).values.astype("float64").sum((-2, -1))
    else:
        assert len(texts) == MAX_SEQ and texts[:6] == ["<bos>", "a", "cat", "and", "a", "dog"]
    np.testing.assert_allclose(total, 1.0, atol=5e-3)


def test_shared_token_cross_injection_keeps_the_targets_own_word_columns(dit):
    """cross_tokens="shared" copies the source's columns of the text keys both prompts share (the template's, the
    instruction's, padding) and keeps the target's own for the swapped word."""
    name, pipe = dit
    before, after = Keep("cross"), Keep("cross")
    edit(pipe, SOURCE, TARGET, seed=3, inject="cross", cross_tokens="shared", inject_steps=[0], steps=STEPS,
         guidance_scale=7.5, before=[before], after=[after], output_type="latent", **_kw(name))
    source, target = (text_layout(pipe, p, keep_padding=True, max_sequence_length=MAX_SEQ).texts
                      for p in (SOURCE, TARGET))
    swapped = [k for k, (a, b) in enumerate(zip(source, target)) if a != b]
    assert [(source[k], target[k]) for k in swapped] == [("red", "blue")]
    src, tgt = (0, 1) if name == QWEN else (2, 3)
    for (layer, step), pre in before.seen.items():
        if step == 0:
            post = after.seen[layer, step]
            shared = [k for k in range(pre.shape[-1]) if k not in swapped]
            assert len(shared) + 1 == pre.shape[-1] == len(source)
            assert torch.equal(post[tgt][..., shared], pre[src][..., shared])
            assert torch.equal(post[tgt][..., swapped], pre[tgt][..., swapped])


def test_qwen_text_queries_are_recorded_per_token():
    """text→image and text→text on Qwen-Image: each recorded token's row is the tap's view of that token's query
    (head mean), at the prompt's key positions (the prompt's tokens lead its text keys)."""
    pipe = probe.load(QWEN)
    views = Views()
    with Tap(pipe, [views], height=32, width=32), torch.no_grad():
        _plain(pipe, QWEN)
    tree = probe.record(pipe, PROMPT, seeds=[0], steps=STEPS, guidance_scale=7.5, kinds=("text_image", "text_text"),
                        keep_steps=[0], progress=False, **_kw(QWEN))
    positions = text_layout(pipe, PROMPT, max_sequence_length=MAX_SEQ).positions
    assert positions == [0, 1, 2, 3, 4]
    seen = {key: probs for key, pass_, _, probs in views.seen}
    for layer in tree["text_image/res8"].layer.values:
        block = seen[str(layer), "text_image"][0].float().mean(0)  # (text, image)
        got = tree["text_image/res8"]["attn"].sel(layer=layer).values[0, 0].astype("float32")
        torch.testing.assert_close(torch.from_numpy(got), block[positions].reshape(5, 8, 8), atol=2e-3, rtol=1e-2)
        square = seen[str(layer), "text_text"][0].float().mean(0)[positions][:, positions]
        got = tree["text_text/res8"]["attn"].sel(layer=layer).values[0, 0].astype("float32")
        torch.testing.assert_close(torch.from_numpy(got), square, atol=2e-3, rtol=1e-2)
