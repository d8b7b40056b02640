"""The judges the field trusts (GenEval's protocol, VQA yes-probability), the presence-only CLIP / detector judges,
and judge agreement with known truth: the rules on hand-worked cases, and each judge from a tiny random folder."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_judges import SIZE, WIDTH, _towers
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
    SwinConfig,
)

from probe.cli import main
from probe.judge_agreement import Case, agreement_table, cohen_kappa, judge_rows, shapes_agreement
from probe.judges import (
    GENEVAL_BACKGROUND,
    GENEVAL_COLOURS,
    ClipJudge,
    DetectorJudge,
    GenevalJudge,
    Instance,
    VqaJudge,
    _geneval_models,
    geneval_verdicts,
    judge_from_spec,
    masked_crop,
    parse_judge_spec,
    question,
    questions,
    vqa_verdicts,
    yes_probability,
)
from probe.models import project_tokenizer
from probe.shapes.judge import judge as exact_judge
from probe.shapes.world import COLOURS, SHAPES, Shape, render

RGB = {**COLOURS, "pink": (240, 130, 190), "brown": (120, 70, 30), "black": (0, 0, 0), "white": (255, 255, 255)}
STATUSES = {"present", "mixed", "missing"}


# -- tiny random models, saved to folders and loaded from them --------------------------------------------------------


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _tiny_clip():
    tok = project_tokenizer()
    text, vision = _towers(tok)
    model = _seeded(lambda: CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)))
    images = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return model, CLIPProcessor(image_processor=images, tokenizer=tok)


def _tiny_mask2former(labels=SHAPES):
    """A random Mask2Former (Swin backbone) whose classes are ``labels`` (the shapes world's shapes)."""
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=len(labels), id2label=dict(enumerate(labels)),
                               label2id={s: i for i, s in enumerate(labels)}, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, num_queries=8, encoder_layers=1, decoder_layers=2,
                               encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2,
                               use_pretrained_backbone=False)
    model = _seeded(lambda: Mask2FormerForUniversalSegmentation(config))
    return model, Mask2FormerImageProcessor(size={"height": 64, "width": 64})


VQA_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "?", "is", "there", "a", "an", "yes", "no",
             *COLOURS, *SHAPES]


def _tiny_blip(folder):
    (folder / "vocab.txt").write_text("\n".join(VQA_WORDS) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"))
    text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=VQA_WORDS.index("[DEC]"),
                sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, encoder_hidden_size=WIDTH)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                  image_size=SIZE, patch_size=8)
    model = _seeded(lambda: BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision,
                                                                projection_dim=16)))
    return model, BlipProcessor(image_processor=BlipImageProcessor(size={"height": SIZE, "width": SIZE}),
                                tokenizer=tok)


@pytest.fixture(scope="module")
def geneval_dir(tmp_path_factory):
    """A folder holding a tiny segmenter as detector/ and a tiny CLIP as clip/ (``--judge geneval:DIR``)."""
    folder = tmp_path_factory.mktemp("geneval")
    for name, (model, processor) in (("detector", _tiny_mask2former()), ("clip", _tiny_clip())):
        model.save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa")
    model, processor = _tiny_blip(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scene():
    return render([Shape("circle", "red", 18, 20, 11), Shape("square", "blue", 46, 44, 11)])[0]


# -- GenEval's protocol: the rule on hand-worked cases ----------------------------------------------------------------


def _nearest_colour(crop) -> np.ndarray:
    """A stand-in for CLIP: scores each GenEval colour by minus the distance from the mean of the crop's pixels that
    are not the grey background."""
    pixels = np.asarray(crop, float).reshape(-1, 3)
    shown = pixels[np.abs(pixels - GENEVAL_BACKGROUND).sum(axis=1) > 0]
    return -np.array([np.linalg.norm(shown.mean(axis=0) - RGB[c]) for c in GENEVAL_COLOURS])


def _box_mask(x0, y0, x1, y1, size=(40, 60)) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _two_colours() -> np.ndarray:
    """40×60 pixels: red on the left third, blue on the right third, white between."""
    image = np.full((40, 60, 3), 255, np.uint8)
    image[:, :20] = RGB["red"]
    image[:, 40:] = RGB["blue"]
    return image


def _no_colour_read(crop, noun):
    raise AssertionError("no colour should be read here")


def test_geneval_counts_an_instance_above_0_3_only():
    image = _two_colours()
    found = [Instance("circle", 0.31, _box_mask(0, 0, 10, 10)), Instance("square", 0.29, _box_mask(40, 0, 50, 10)),
             Instance("triangle", 0.3, _box_mask(20, 0, 30, 10))]
    verdicts = geneval_verdicts(image, found, "a circle and a square and a triangle", _no_colour_read)
    assert [v.status for v in verdicts] == ["present", "missing", "missing"]  # 0.3 itself is not above 0.3
    assert [v.score for v in verdicts] == [0.31, 0.29, 0.3]  # a missing subject keeps its best score
    assert verdicts[0].box == (0.0, 0.0, 10 / 60, 10 / 40)
    looser = geneval_verdicts(image, found, ["circle", "square", "ellipse"], _no_colour_read, threshold=0.2)
    assert [v.status for v in looser] == ["present", "present", "missing"]
    assert looser[2].score == 0.0 and looser[2].box == (0.0, 0.0, 0.0, 0.0)  # no ellipse at all


def test_masked_crop_is_the_mask_on_grey_cut_to_its_box():
    image = _two_colours()
    mask = np.zeros((40, 60), bool)
    mask[5:15, 35:50] = True  # white columns 35–39, blue 40–49
    mask[5, 35] = False
    crop = np.asarray(masked_crop(image, mask))
    assert crop.shape == (10, 15, 3)
    np.testing.assert_array_equal(crop[0, 0], GENEVAL_BACKGROUND)  # outside the mask: grey
    np.testing.assert_array_equal(crop[1:, :5], np.broadcast_to([255, 255, 255], (9, 5, 3)))
    np.testing.assert_array_equal(crop[:, 5:], np.broadcast_to(RGB["blue"], (10, 10, 3)))
    with pytest.raises(ValueError, match="mask's shape"):
        masked_crop(image, mask[:20])
    with pytest.raises(ValueError, match="empty"):
        masked_crop(image, np.zeros((40, 60), bool))


def test_geneval_reads_the_colour_on_the_most_confident_instance_mask():
    image = _two_colours()
    blue_circle, red_circle = _box_mask(42, 5, 58, 35), _box_mask(2, 5, 18, 35)
    read = []

    def scores(crop, noun):
        read.append((np.asarray(crop).shape, noun))
        return _nearest_colour(crop)

    found = [Instance("circle", 0.9, blue_circle), Instance("circle", 0.5, red_circle)]
    verdicts = geneval_verdicts(image, found, "a red circle and a blue circle", scores)
    # GenEval reads colour on the top-ranked instance: the blue one, for both subjects
    assert [(v.status, v.attribute) for v in verdicts] == [("mixed", "blue"), ("present", "blue")]
    assert read == [((30, 16, 3), "circle")] * 2  # the crop is the mask's box
    swapped = [Instance("circle", 0.4, blue_circle), Instance("circle", 0.8, red_circle)]
    assert [v.status for v in geneval_verdicts(image, swapped, "a red circle", scores)] == ["present"]
    assert [v.status for v in geneval_verdicts(image, found, "a big circle", _no_colour_read)] == ["present"]
    with pytest.raises(ValueError, match="one per colour"):
        geneval_verdicts(image, found, "a red circle", lambda crop, noun: [1.0, 2.0])


# -- VQA: questions and the yes-probability ---------------------------------------------------------------------------


def test_questions_from_a_prompt():
    assert question("circle", "red") == "Is there a red circle?"
    assert question("ellipse") == "Is there an ellipse?"
    assert question("circle", "orange") == "Is there an orange circle?"
    assert questions("a red circle and an orange ellipse and a square") == [
        ("Is there a circle?", "Is there a red circle?"),
        ("Is there an ellipse?", "Is there an orange ellipse?"),
        ("Is there a square?", None)]
    assert questions("a photo of a red cat") == [("Is there a cat?", "Is there a red cat?")]  # no framing
    assert questions([("blue", "square"), "cat"]) == [("Is there a square?", "Is there a blue square?"),
                                                      ("Is there a cat?", None)]


def test_yes_probability_is_the_softmax_of_the_two_answer_logits():
    logits = torch.tensor([[0.3, 2.0, -1.0, 5.0], [1.5, -0.5, 0.0, -7.0]])
    yes, no = 1, 2
    by_hand = [math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0)), math.exp(-0.5) / (math.exp(-0.5) + math.exp(0.0))]
    np.testing.assert_allclose(yes_probability(logits, yes, no).numpy(), by_hand, rtol=1e-6)


def test_vqa_rule():
    verdicts = vqa_verdicts("a red circle and a blue square and a triangle", [0.9, 0.7, 0.49],
                            [0.2, 0.5, math.nan], threshold=0.5)
    assert [v.status for v in verdicts] == ["mixed", "present", "missing"]
    assert [v.attribute for v in verdicts] == ["", "blue", ""]
    assert [v.status for v in vqa_verdicts(["cat"], [0.5], [math.nan], 0.5)] == ["present"]  # ≥ the threshold
    with pytest.raises(ValueError, match="2 subjects but 1 object"):
        vqa_verdicts("a cat and a dog", [0.5], [math.nan, math.nan])


# -- each judge from a tiny random folder -----------------------------------------------------------------------------


def test_vqa_judge_from_a_folder(vqa_dir, scene):
    judge = VqaJudge(str(vqa_dir), device="cpu")
    asked = ["Is there a circle?", "Is there a red circle?", "Is there a square?"]
    p = judge.yes_probabilities(scene, asked)
    # independently: transformers' own generate() gives the first answer token's logits, one question at a time
    model, processor = judge.model, judge.processor
    yes, no = VQA_WORDS.index("yes"), VQA_WORDS.index("no")
    for q, got in zip(asked, p):
        inputs = processor(images=[scene], text=[q], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
        y, n = out.logits[0][0, yes].item(), out.logits[0][0, no].item()
        assert got == pytest.approx(math.exp(y) / (math.exp(y) + math.exp(n)), rel=1e-4)
    cut = float(np.median(p))
    verdicts = judge_from_spec(f"vqa:{vqa_dir}@{cut}", device="cpu")(scene, "a red circle and a square")
    expected = vqa_verdicts("a red circle and a square", [p[0], p[2]], [p[1], math.nan], cut)
    assert [v.status for v in verdicts] == [v.status for v in expected]
    assert [v.score for v in verdicts] == pytest.approx([v.score for v in expected])
    assert {v.status for v in verdicts} <= STATUSES


def test_geneval_judge_from_a_folder(geneval_dir, scene):
    judge = judge_from_spec(f"geneval:{geneval_dir}@0.0", device="cpu")
    assert repr(judge) == f"judge(geneval:{geneval_dir}@0.0)"
    inner = judge.fn
    assert isinstance(inner, GenevalJudge) and inner.threshold == 0.0
    found = inner.instances(scene)
    # the instances are the processor's own post-processing of the model's output, masks at the image's size
    with torch.no_grad():
        out = inner.detector(**inner.detector_processor(images=[scene], return_tensors="pt"))
    direct = inner.detector_processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=[(64, 64)],
                                                                         return_binary_maps=True)[0]
    assert [(d.label, d.score) for d in found] == [(SHAPES[i["label_id"]], i["score"]) for i in direct["segments_info"]]
    assert found and all(d.mask.shape == (64, 64) and d.mask.dtype == bool for d in found)
    # the colour scores are CLIP's cosine similarity with each colour's averaged, normalised prompt embeddings
    crop = masked_crop(scene, found[0].mask)
    clip, processor = inner.clip, inner.clip_processor
    with torch.no_grad():
        image = clip(**processor(text=["a"], images=[crop], return_tensors="pt", padding=True)).image_embeds[0]
        expected = []
        for colour in GENEVAL_COLOURS:
            texts = [f"a photo of a {colour} circle", f"a photo of a {colour}-colored circle",
                     f"a photo of a {colour} object"]
            t = clip(**processor(text=texts, images=[crop], return_tensors="pt", padding=True)).text_embeds
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            expected.append(float(image @ t / image.norm() / t.norm()))
    np.testing.assert_allclose(inner.colour_scores(crop, "circle"), expected, atol=1e-5)
    verdicts = judge(scene, "a red circle and a blue square")
    assert [v.subject for v in verdicts] == ["circle", "square"] and {v.status for v in verdicts} <= STATUSES
    assert all(v.status == "missing" for v in GenevalJudge(str(geneval_dir / "detector"), str(geneval_dir / "clip"),
                                                           device="cpu", threshold=1.0)(scene, ["circle", "square"]))
    with pytest.raises(ValueError, match="no class 'cat'; its classes are circle, ellipse, square, triangle"):
        judge(scene, "a cat and a circle")


def test_geneval_classes_of_several_words():
    model, processor = _tiny_mask2former(["dog", "hot dog", "dining table", "circle"])
    clip, clip_processor = _tiny_clip()
    judge = GenevalJudge(model, clip, detector_processor=processor, clip_processor=clip_processor, device="cpu")
    assert judge.classes("a photo of a red dining table and a hot dog and a brown dog") == [
        ("red", "dining table"), ("", "hot dog"), ("brown", "dog")]
    with pytest.raises(ValueError, match="no class 'table'"):
        judge.classes("a table")


def test_specs_of_the_trusted_judges(tmp_path):
    assert parse_judge_spec("geneval@0.31").threshold == 0.31
    assert parse_judge_spec("vqa:./blip@0.6").model == "./blip"
    with pytest.raises(ValueError, match=r"from 0 to 1 \(a probability of \"yes\"\)"):
        parse_judge_spec("vqa@1.5")
    with pytest.raises(ValueError, match=r"\(an instance score\), got 'x'; e.g. geneval@0.3"):
        parse_judge_spec("geneval:DIR@x")
    assert _geneval_models("") == ("facebook/mask2former-swin-small-coco-instance", "openai/clip-vit-large-patch14")
    assert _geneval_models("a/seg, b/clip") == ("a/seg", "b/clip")
    (tmp_path / "detector").mkdir()
    (tmp_path / "clip").mkdir()
    assert _geneval_models(str(tmp_path)) == (str(tmp_path / "detector"), str(tmp_path / "clip"))


def test_clip_and_detector_judges_are_presence_only(scene):
    """They cannot see attributes: whatever the threshold, a prompt with colours gets present or missing, never
    mixed."""
    clip = ClipJudge(*_tiny_clip(), device="cpu")
    tok = project_tokenizer()
    text, vision = _towers(tok)
    owl = _seeded(lambda: OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision,
                                                                projection_dim=WIDTH)))
    owl_processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size={"height": SIZE, "width": SIZE},
                                                                         crop_size={"height": SIZE, "width": SIZE}),
                                    tokenizer=tok)
    prompt = "a red circle and a blue square"
    seen = set()
    for cut in (-1.0, 0.0, 0.5, 1.0):
        seen |= {v.status for v in clip.verdicts(scene, prompt, cut)}
    for cut in (0.0, 0.5, 1.01):
        seen |= {v.status for v in DetectorJudge(owl, owl_processor, device="cpu", threshold=cut)(scene, prompt)}
    assert seen == {"present", "missing"}


# -- agreement with known truth ---------------------------------------------------------------------------------------


def test_agreement_table_against_a_hand_count():
    truth = ["present", "present", "present", "mixed", "mixed", "missing", "missing", "missing", "present", "missing"]
    said = ["present", "present", "missing", "mixed", "present", "missing", "missing", "present", "present", "mixed"]
    category = ["two"] * 6 + ["three"] * 4
    table = agreement_table(pd.DataFrame({"truth": truth, "said": said, "category": category})).set_index("category")
    # all 10: agree on 6; truth shares present .4, mixed .2, missing .4; said present .5, mixed .2, missing .3
    expected_chance = 0.4 * 0.5 + 0.2 * 0.2 + 0.4 * 0.3  # 0.36
    assert table.loc["all", "n"] == 10 and table.loc["all", "accuracy"] == pytest.approx(0.6)
    assert table.loc["all", "kappa"] == pytest.approx((0.6 - expected_chance) / (1 - expected_chance))
    counted = ["present_as_present", "present_as_missing", "mixed_as_present", "missing_as_present",
               "missing_as_mixed", "missing_as_missing", "mixed_as_mixed"]
    assert table.loc["all", counted].tolist() == [3, 1, 1, 1, 1, 2, 1]
    assert table.loc["all", ["present_as_mixed", "mixed_as_missing"]].tolist() == [0, 0]
    # "two": truth P P P X X M, said P P M X P M: agree 4 of 6; chance (3·3 + 2·1 + 1·2) / 36
    assert table.loc["two", "accuracy"] == pytest.approx(4 / 6)
    assert table.loc["two", "kappa"] == pytest.approx((4 / 6 - 13 / 36) / (1 - 13 / 36))
    assert table.loc["three", "n"] == 4 and table.loc["three", "accuracy"] == pytest.approx(0.5)
    from sklearn.metrics import cohen_kappa_score

    assert table.loc["all", "kappa"] == pytest.approx(cohen_kappa_score(truth, said))
    assert math.isnan(cohen_kappa(["present"] * 3, ["present"] * 3))  # one status everywhere: undefined


def test_exact_judge_agrees_with_the_shapes_truth():
    rows, table = shapes_agreement(exact_judge, n_scenes=40, seed=3)
    assert (table.accuracy == 1).all() and (table.kappa == 1).all()
    assert list(table.category) == ["all", "2 subjects", "3 subjects"] and table.n.tolist() == [100, 40, 60]
    assert set(rows.truth) == STATUSES  # every status occurs in the truth
    # the one case where the exact judge's statuses and object-level truth part: a red square alone for "a red
    # circle and a blue square" (the circle is not drawn; the exact judge calls it mixed, its colour being on the
    # square)
    alone = render([Shape("square", "red", 32, 32, 11)])[0]
    case = Case("alone", alone, "a red circle and a blue square", ("circle", "square"), ("missing", "mixed"))
    assert judge_rows(exact_judge, [case]).said.tolist() == ["mixed", "mixed"]


def _hand_table(rows: pd.DataFrame) -> dict:
    """Accuracy and confusion counts by counting rows one at a time."""
    counts, right = {}, 0
    for t, s in zip(rows.truth, rows.said):
        counts[f"{t}_as_{s}"] = counts.get(f"{t}_as_{s}", 0) + 1
        right += t == s
    return {"n": len(rows), "accuracy": right / len(rows), **counts}


def test_a_tiny_random_judge_agreement_and_the_command(geneval_dir, tmp_path, capsys):
    judge = judge_from_spec(f"geneval:{geneval_dir}@0.1", device="cpu")
    rows, table = shapes_agreement(judge, n_scenes=4, seed=1)
    assert len(rows) == 2 + 3 + 2 + 3 and {"mixed", "missing"} <= set(rows.said) <= STATUSES  # 0.1: some found
    for name, part in [("all", rows), *rows.groupby("category")]:
        row = table.set_index("category").loc[name]
        for key, value in _hand_table(part).items():
            assert row[key] == pytest.approx(value), (name, key)
    # the same scenes as files and a truth CSV, through the command
    from probe.judge_agreement import write_shapes_truth

    truth = write_shapes_truth(tmp_path / "scenes", n_scenes=4, seed=1)
    assert sorted(p.name for p in (tmp_path / "scenes").iterdir())[:2] == ["scene_0000.png", "scene_0001.png"]
    assert main(["judge-agreement", "--judge", f"geneval:{geneval_dir}@0.1", "--images", str(tmp_path / "scenes"),
                 "--truth", str(truth), "--out", str(tmp_path / "table.csv"), "--rows", str(tmp_path / "rows.csv"),
                 "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "table.csv"), table, check_dtype=False)
    assert pd.read_csv(tmp_path / "rows.csv").said.tolist() == rows.said.tolist()
    pd.read_csv(truth).drop(columns="subject").to_csv(tmp_path / "bad.csv", index=False)
    assert main(["judge-agreement", "--judge", "exact", "--images", str(tmp_path / "scenes"),
                 "--truth", str(tmp_path / "bad.csv")]) == 2
    assert "lacks the column(s) subject" in capsys.readouterr().err


def test_guidance_study_with_the_geneval_judge(geneval_dir, tmp_path, capsys):
    """`probe study guidance --quick --judge geneval:DIR` on the tiny model runs and writes its table."""
    out = tmp_path / "study"
    assert main(["study", "guidance", "--quick", "--model", "tiny", "--judge", f"geneval:{geneval_dir}",
                 "--out", str(out), "--device", "cpu", "--set", "n_images=2", "--set", "steps=2",
                 "--set", "seeds_per_prompt=1", "--set", "methods=('none', 'ae')", "--set", "initno=(False,)"]) == 0
    assert "== guidance ==" in capsys.readouterr().out
    images = pd.read_csv(out / "guidance_images.csv")
    assert len(images) == 4 and set(images.method) == {"none", "ae"}
    assert {s for row in images.statuses for s in row.split(",")} <= STATUSES
    assert images.missing.all()  # random weights score every instance well below GenEval's 0.3
    assert f"--judge geneval:{geneval_dir}" in (out / "README.md").read_text()
