"""Subject maps are made once (probe.analysis.subjects): guidance's live maps, the guidance and overlap studies,
the out-of-core analysis, the lab and the explorer all give one recording's subject maps, and they equal maps
computed here from the raw recorded cross-attention with numpy alone."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import probe
from probe.analysis import lazy
from probe.analysis.probes import attn_tensor, phrase_indices
from probe.analysis.subjects import (
    diffusers_softmax_tokens,
    softmax_tokens,
    subject_maps,
    word_tokens,
)
from probe.consumers.maps import GUIDANCE_PASSES, REAL_PASSES, MapCollector
from probe.models import Layer, attention_layers
from probe.prompts import subject_keys, word_positions
from probe.steer.guide import Schedule, generate
from probe.studies.overlap import _subject_maps, overlap_chunk
from probe.tap import Call
from probe.ui import lab
from probe.ui.explore import Controls, ViewModel

PROMPT, SUBJECTS = "a red circle and a blue square", ["circle", "square"]
SEED, STEPS, GROUP = 5, 3, "cross/res16"
RAW_ATOL = 5e-5  # a live float32 map against the float16 recording (values ~0.02: float16 steps of ~1e-5)
AE_ATOL = 5e-4  # the A&E view: softmax(100·A) magnifies those differences (seen: 5e-6 raw, 2.4e-5 A&E)


@pytest.fixture(scope="module")
def recorded(tiny, tmp_path_factory):
    """One recording of the tiny model in memory, and the same recording saved and opened lazily."""
    tree = probe.record(tiny, PROMPT, seeds=[SEED], steps=STEPS, progress=False)
    path = tmp_path_factory.mktemp("subjects") / "rec.zarr"
    probe.save(tree, path)
    return tree, lazy.open_store(path)


# -- the independent computation -----------------------------------------------------------------------------------


def _smooth(maps: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """A&E's 3×3 Gaussian (exp(-(x / 2σ)²), normalised), reflect padding, written out with numpy."""
    k = np.exp(-((np.arange(3) - 1) / (2 * sigma)) ** 2)
    k /= k.sum()
    padded = np.pad(maps, [(0, 0)] * (maps.ndim - 2) + [(1, 1), (1, 1)], mode="reflect")
    h, w = maps.shape[-2:]
    return sum(k[i] * k[j] * padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3))


def _expected(tree, view: str = "maps") -> np.ndarray:
    """(step, subject, y, x): the layer mean of the raw recorded array, the columns of every token that spells the
    word (averaged); the A&E view softmaxes 100·A over the prompt's words (no <|startoftext|>, <|endoftext|>)."""
    attn = tree[GROUP]["attn"].isel(sample=0)
    values = np.asarray(attn.values, np.float64).mean(attn.dims.index("layer"))  # (step, y, x, token)
    texts = [str(t) for t in tree[GROUP]["token_text"].values[0]]
    if view == "ae":
        words = [i for i, t in enumerate(texts) if t and not t.startswith("<|")]
        z = 100 * values[..., words]
        soft = np.exp(z - z.max(-1, keepdims=True))
        values = np.zeros_like(values)
        values[..., words] = soft / soft.sum(-1, keepdims=True)
    maps = np.stack([values[..., [i for i, t in enumerate(texts) if t == w]].mean(-1) for w in SUBJECTS], 1)
    return _smooth(maps) if view == "ae" else maps


def _close(got, want, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol)


# -- the five readers -------------------------------------------------------------------------------------------------


def test_guidance_reads_the_recorded_subject_maps(tiny, recorded):
    """Guidance's own evaluation at step 1 (the latent the pipeline is about to denoise: nothing is guided) and the
    guidance study's real-pass maps equal the recording's subject maps."""
    tree, _ = recorded
    step = 1
    seen = []

    def look(maps):  # an objective that only looks: the A&E loss, the maps kept
        seen.append(maps)
        return 1 - maps.subjects.amax((-2, -1)).amin(-1)

    layers = [layer for layer in attention_layers(tiny) if layer.grid == (16, 16) and layer.kind == "cross"]
    real = MapCollector(layers, passes=REAL_PASSES, steps=[step], image=0)
    generate(tiny, PROMPT, subjects=SUBJECTS, objective=look, seed=SEED, steps=STEPS, output_type="np",
             schedule=Schedule(alter_fraction=0.0, thresholds={step: 0.0}), consumers=[real], progress=False)
    (live,) = seen
    _close(live.subjects[0].detach(), _expected(tree, "ae")[step], AE_ATOL)
    tokens, words = subject_keys(tiny, PROMPT, SUBJECTS)
    _close(subject_maps(live.cross[0].detach(), tokens), _expected(tree)[step], RAW_ATOL)
    study = real.maps[step]["cross"].reshape(16, 16, -1)
    _close(subject_maps(study, tokens), _expected(tree)[step], RAW_ATOL)
    _close(subject_maps(study, tokens, words, view="ae"), _expected(tree, "ae")[step], AE_ATOL)


def test_overlap_study_reads_the_recorded_subject_maps(recorded):
    tree, _ = recorded
    cross, ds = attn_tensor(tree[GROUP])
    maps, ae = _subject_maps(cross.mean(2)[0], ds.isel(sample=0), SUBJECTS)
    _close(maps, _expected(tree))
    _close(ae, _expected(tree, "ae"))
    present = SimpleNamespace(status="present")
    _, examples = overlap_chunk(tree, 16, judge=lambda image, prompt: [present, present])
    _close(examples[0].maps, _expected(tree)[-1])  # the examples figure's maps: the last step


def test_lazy_reads_the_recorded_subject_maps(recorded):
    tree, store = recorded
    for view in ("maps", "ae"):
        got = lazy.subject_maps(store[GROUP], SUBJECTS, view=view)
        assert got.chunks is not None  # out of core: nothing computed until asked
        _close(got.isel(sample=0).compute().values, _expected(tree, view))


def test_lab_reads_the_recorded_subject_maps(recorded):
    tree, _ = recorded
    for step in range(STEPS):
        maps = lab.subject_maps(tree, 0, step, group=GROUP)
        assert list(maps.subject.values) == SUBJECTS
        _close(maps.values, _expected(tree)[step])


def test_explorer_reads_the_recorded_subject_maps(recorded):
    tree, store = recorded
    for source in (tree, store):
        model = ViewModel(source)
        for step in range(STEPS):
            view = model.view(Controls(sample=0, step=step, layer="res16"))
            assert view.subjects == SUBJECTS
            _close(view.subject_maps, _expected(tree)[step])


# -- the rules --------------------------------------------------------------------------------------------------------


def test_softmax_runs_over_the_words_of_word_positions(tiny, tiny_left, recorded):
    """The one rule for A&E's softmax: the prompt's word tokens, as word_positions gives them, for a recording's
    tokens and for a live pipeline, with right and with left padding."""
    tree, _ = recorded
    texts = [str(t) for t in tree[GROUP]["token_text"].values[0]]
    assert softmax_tokens(texts) == word_positions(tiny.tokenizer, PROMPT) == [1, 2, 3, 4, 5, 6, 7]
    for pipe in (tiny, tiny_left):
        assert subject_keys(pipe, PROMPT, SUBJECTS)[1] == word_positions(pipe.tokenizer, PROMPT)
    assert softmax_tokens(["<|startoftext|>", "a", "cat", "<|endoftext|>", "", ""]) == [1, 2]
    assert diffusers_softmax_tokens(6) == [1, 2, 3, 4]
    cross = torch.rand(4, 4, 6)
    cross[..., 3:] = 10.0  # end and padding hold the mass: they take no part in the softmax
    ae = subject_maps(cross, [[2]], [1, 2], view="ae", kernel_size=1)
    expected = torch.softmax(100 * cross[..., [1, 2]], -1)[..., 1]
    torch.testing.assert_close(ae[0], expected)


def test_a_words_tokens_are_every_copy_and_a_phrase_is_its_words():
    tokens = ["<|startoftext|>", "a", "red", "circle", "and", "a", "red", "square", "<|endoftext|>", ""]
    assert word_tokens(tokens, ["red circle", "red square"]) == [[2, 3], [6, 7]]  # the two reds in turn
    assert word_tokens(tokens, ["circle", "square#1"]) == [[3], [7]]
    assert phrase_indices(tokens, "red#2 square") == [6, 7]
    with pytest.raises(ValueError, match="red#1"):  # one "red" named for two: say which
        phrase_indices(tokens, "red circle")
    sd3 = ["<|startoftext|>", "a", "cat", "<|endoftext|>", "▁a", "▁cat", "</s>"]
    assert word_tokens(sd3, ["cat"], ["clip"] * 4 + ["t5"] * 3) == [[2, 5]]  # CLIP's copy and T5's


def test_one_map_collector_for_guidance_and_the_studies():
    layer = Layer("a.attn2", "cross", (2, 2), 2)
    probs = torch.cat([torch.full((1, 2, 4, 5), 1.0), torch.full((1, 2, 4, 5), 3.0)])
    live = MapCollector([layer], passes=GUIDANCE_PASSES, detach=False)
    real = MapCollector([layer], passes=REAL_PASSES, steps=[3], image=0)
    guidance, cfg = Call(layer, 3, 1.0, "guidance", 1), Call(layer, 3, 1.0, "cfg", 2)
    assert live.wants(guidance) and not live.wants(cfg)
    assert real.wants(cfg) and not real.wants(guidance) and not real.wants(Call(layer, 4, 1.0, "cfg", 2))
    grad = probs[:1].clone().requires_grad_()
    live.on_probs(guidance, grad)
    real.on_probs(cfg, probs)
    assert live.mean(3)["cross"].shape == (1, 4, 5) and live.mean(3)["cross"].requires_grad
    torch.testing.assert_close(real.maps[3]["cross"], torch.full((4, 5), 3.0))
    with pytest.raises(RuntimeError, match="step 2"):
        live.mean(2)
