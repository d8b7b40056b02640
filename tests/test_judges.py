"""Judges: the exact shapes judge, and CLIP / OWL-ViT judges run on tiny random models built offline."""

import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
)

from probe.judges import ClipJudge, DetectorJudge, ExactJudge, judge_from_spec
from probe.models import project_tokenizer
from probe.shapes.world import Shape, render

SIZE = 32  # pixels of the tiny vision towers' input
WIDTH = 32  # hidden width of the tiny towers; OWL-ViT needs its text width equal to the projection


def _towers(tok) -> tuple[dict, dict]:
    text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                  image_size=SIZE, patch_size=8)
    return text, vision


@pytest.fixture(scope="module")
def tiny_clip():
    tok = project_tokenizer()
    text, vision = _towers(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return model, CLIPProcessor(image_processor=images, tokenizer=tok)


@pytest.fixture(scope="module")
def tiny_owl():
    tok = project_tokenizer()
    text, vision = _towers(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=WIDTH))
    images = OwlViTImageProcessor(size={"height": SIZE, "width": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return model, OwlViTProcessor(image_processor=images, tokenizer=tok)


@pytest.fixture(scope="module")
def scene():
    objects = [Shape("circle", "red", 18, 20, 11), Shape("square", "blue", 46, 44, 11)]
    return render(objects)[0]


def test_exact_judge_sees_present_and_missing_subjects(scene):
    judge = ExactJudge()
    statuses = judge(scene, "a red circle and a blue square")
    assert [(s.colour, s.shape, s.status) for s in statuses] == [("red", "circle", "present"),
                                                                ("blue", "square", "present")]
    only_circle = render([Shape("circle", "red", 18, 20, 11)])[0]
    assert [s.status for s in judge(only_circle, "a red circle and a blue square")] == ["present", "missing"]
    assert judge.summary(only_circle, "a red circle and a blue square")["n_missing"] == 1


def test_clip_min_object_similarity(tiny_clip, scene, tmp_path):
    model, processor = tiny_clip
    judge = ClipJudge(model, processor, device="cpu")
    images = [scene, np.full_like(scene, 200)]
    sims = judge.similarities(images, ["cat", "dog", "frog"])
    assert sims.shape == (2, 3) and np.all(np.abs(sims) <= 1 + 1e-6)
    # the same cosine similarity computed by hand from CLIP's own embeddings
    with torch.no_grad():
        inputs = processor(text=[f"a photo of a {w}" for w in ["cat", "dog", "frog"]], images=images,
                           return_tensors="pt", padding=True)
        out = model(**inputs)
    manual = torch.nn.functional.normalize(out.image_embeds, dim=-1) @ torch.nn.functional.normalize(
        out.text_embeds, dim=-1).T
    np.testing.assert_allclose(sims, manual.numpy(), atol=1e-5)
    np.testing.assert_allclose(judge(images, "a cat and a dog and a frog"), sims.min(axis=1))
    np.testing.assert_allclose(judge(scene / 255.0, ["cat"]), sims[:1, 0], atol=1e-5)  # float images in 0-1
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    np.testing.assert_allclose(ClipJudge(str(tmp_path), device="cpu").similarities(images, ["cat", "dog", "frog"]),
                               sims, atol=1e-5)  # loaded by local folder
    # as a study's judge from the command line: present where the similarity reaches the threshold
    cut = float(np.median(sims[0]))
    spec = f"clip:{tmp_path}@{cut}"
    study_judge = judge_from_spec(spec, device="cpu")
    verdicts = study_judge(scene, "a cat and a dog and a frog")
    assert [v.status for v in verdicts] == ["present" if x >= cut else "missing" for x in sims[0]]
    assert repr(study_judge) == f"judge({spec})"  # stable between runs: resumable study rows key on it
    with pytest.raises(ValueError, match="unknown judge 'vlm'"):
        judge_from_spec("vlm")


def test_detector_scores_boxes_and_threshold(tiny_owl, scene, tmp_path):
    model, processor = tiny_owl
    verdicts = DetectorJudge(model, processor, device="cpu", threshold=0.0)(scene, "a cat and a dog")
    assert [v.subject for v in verdicts] == ["cat", "dog"]
    assert all(v.status == "present" and 0 <= v.score <= 1 for v in verdicts)
    strict = DetectorJudge(model, processor, device="cpu", threshold=1.01)(scene, ["cat", "dog"])
    assert [v.status for v in strict] == ["missing", "missing"]
    assert [v.score for v in strict] == [v.score for v in verdicts]
    with torch.no_grad():
        inputs = processor(text=[["a photo of a cat", "a photo of a dog"]], images=[scene], return_tensors="pt")
        best = model(**inputs).logits.sigmoid().amax(1)[0]
    np.testing.assert_allclose([v.score for v in verdicts], best.numpy(), atol=1e-6)
    for v in verdicts:
        x0, y0, x1, y1 = v.box
        assert x0 <= x1 and y0 <= y1
    many = DetectorJudge(model, processor, device="cpu").detect(np.stack([scene, scene]), ["cat"])
    assert len(many) == 2 and many[0][0].score == pytest.approx(many[1][0].score)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = DetectorJudge(str(tmp_path), device="cpu", threshold=0.0)(scene, ["cat", "dog"])
    np.testing.assert_allclose([v.score for v in reloaded], [v.score for v in verdicts], atol=1e-6)


def test_missing_judge_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="judge model folder .* does not exist"):
        ClipJudge(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="pass the model's processor"):
        DetectorJudge(object())


def test_a_study_on_a_users_model_prompts_and_judge_from_the_command_line(tiny_owl, tmp_path, capsys):
    """`probe study guidance --model DIR --prompts FILE --judge detector:DIR@T`: the user's prompts are the ones
    generated, the user's detector judges them, and the index's rerun command says so."""
    import pandas as pd

    from probe.cli import main

    model, processor = tiny_owl
    model.save_pretrained(tmp_path / "owl")
    processor.save_pretrained(tmp_path / "owl")
    probe_folder = tmp_path / "sd"
    import probe

    probe.load("tiny").save_pretrained(probe_folder)
    prompts = tmp_path / "mine.txt"
    prompts.write_text("a cat and a dog\na cat and a dog\na frog and a bird | frog, bird\n")  # a duplicate line
    out = tmp_path / "study"
    judge = f"detector:{tmp_path / 'owl'}@0.0"
    with pytest.warns(UserWarning, match="no prompts beyond the study's"):  # all of them in the study
        assert main(["study", "guidance", "--model", str(probe_folder), "--prompts", str(prompts), "--judge", judge,
                     "--out", str(out), "--set", "n_images=2", "--set", "steps=2", "--set", "seeds_per_prompt=1",
                     "--set", "methods=('none', 'ae')", "--set", "initno=(False,)"]) == 0
    images = pd.read_csv(out / "guidance_images.csv")
    assert sorted(set(images.prompt)) == ["a cat and a dog", "a frog and a bird"]  # each prompt once
    assert images[images.method == "ae"].step_size.eq(20.0).all()  # the schedule's own step
    assert (images.statuses == "present,present").all()  # threshold 0: the detector finds every subject
    index = (out / "README.md").read_text()
    assert f"--judge {judge}" in index and f"--prompts {prompts}" in index and f"--model {probe_folder}" in index
    assert "design:" in capsys.readouterr().out  # the power calculation is printed
    with pytest.raises(SystemExit, match="--prompts applies to the guidance and self_cross"):
        main(["study", "overlap", "--model", "tiny", "--prompts", str(prompts)])
