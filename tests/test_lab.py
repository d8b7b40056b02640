"""The classroom lab: every checker says ✓ to a right answer and gives a hint, not the answer, to a wrong one; the
right answers here are computed independently (xarray and numpy on the recording, rendered scenes with known
contents). Each lab notebook runs in a real JupyterLab with every checker saying "not answered yet".

Set ``PROBE_SCREENSHOTS=1`` to run the notebooks at their classroom size and write the screenshots to
``figures/lab_<part>.png``; otherwise they run with ``PROBE_STEPS=4`` and the screenshots go to a temporary folder.
"""

import importlib.util
import math
import os
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
import torch

import probe
from probe.analysis.overlap import com_distance, compactness, kl_divergence, pair_indices, soft_iou
from probe.shapes.judge import judge
from probe.shapes.world import Shape, render
from probe.steer.edit import EditResult, EditSettings
from probe.steer.guide import GuideResult
from probe.ui import lab

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "notebooks" / "lab"
TWO, THREE = "a red circle and a blue square", "a red ellipse and a green triangle and a yellow square"
STEPS = 8
SEEDS = [0, 2, 5, 8]  # the built-in model at 8 steps: the two-object prompt misses a subject on 0 and 8, mixes on 2


@pytest.fixture(scope="module")
def tree():
    """Two prompts × four seeds, every kind: the two-object images come out both ways (all present, not)."""
    return probe.record(probe.load("shapes"), [TWO, THREE], seeds=SEEDS, steps=STEPS, progress=False)


def _status(result):
    return result.status


# -- independent answers ---------------------------------------------------------------------------------------


def _tokens(tree, group="cross/res16", sample=0):
    return [str(t) for t in tree[group]["attn"].isel(sample=sample)["token_text"].values]


def _word_map(tree, word, step):
    """The exercise's definition, written with xarray alone."""
    cross = tree["cross/res16"]["attn"].isel(sample=0).sel(step=step)
    return cross.isel(token=_tokens(tree).index(word)).astype("float32").mean("layer").values


def _layer_peaks(tree, word):
    peaks = {}
    for group in tree["cross"].children:
        attn = tree[f"cross/{group}"]["attn"].isel(sample=0, step=-1)
        top = attn.isel(token=_tokens(tree, f"cross/{group}").index(word)).astype("float32").max(["y", "x"])
        peaks.update({str(name): float(v) for name, v in zip(top["layer"].values, top.values)})
    return peaks


def _correlations_with_final(tree, word):
    """np.corrcoef of the word's res8 layer-mean map at each step with its map at the last step."""
    attn = tree["cross/res8"]["attn"].isel(sample=0).astype("float32").mean("layer")
    maps = attn.isel(token=_tokens(tree, "cross/res8").index(word)).values.reshape(STEPS, -1)
    return np.array([np.corrcoef(m, maps[-1])[0, 1] for m in maps])


def _settled(correlations, at_least):
    return next(s for s in range(len(correlations)) if (correlations[s:] >= at_least).all())


def _min_max_iou(a, b):
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def _judged(tree):
    """Per sample: (statuses, prompt), from the judge on the recorded pixels."""
    prompts = [str(p) for p in tree["cross/res16"]["prompt"].values]
    return [([s.status for s in judge(image, p)], p) for image, p in zip(tree["images"]["image"].values, prompts)]


def _auc(scores, labels):
    """ROC AUC by counting pairs (ties count half)."""
    positive, negative = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def _two_object_separation(tree):
    """|AUC − 0.5| per statistic at the last step among the two-object images (maps from xarray, statistics from
    probe.analysis.overlap's definitions)."""
    judged = _judged(tree)
    two = [k for k, (_, p) in enumerate(judged) if p == TWO]
    stats = {name: [] for name in lab.STATISTICS}
    for k in two:
        attn = tree["cross/res16"]["attn"].isel(sample=k, step=-1).astype("float32").mean("layer")
        tokens = _tokens(tree, sample=k)
        a, b = (torch.from_numpy(attn.isel(token=tokens.index(w)).values) for w in ("circle", "square"))
        stats["soft_iou"].append(float(soft_iou(a, b)))
        stats["com_distance"].append(float(com_distance(a, b)))
        stats["kl_sym"].append(float(kl_divergence(a, b, "sym")))
        stats["compactness"].append(float(compactness(a, b)))
    failed = np.array([any(s != "present" for s in judged[k][0]) for k in two])
    return {name: abs(_auc(np.array(v), failed) - 0.5) for name, v in stats.items()}, failed


# -- the registry ------------------------------------------------------------------------------------------------


def test_every_part_has_two_or_three_exercises_and_each_is_asked_in_its_notebook():
    for number, part in enumerate(lab.PARTS, start=1):
        keys = [e.key for e in lab.exercises(part)]
        assert 2 <= len(keys) <= 3
        code = [c.source for c in nbformat.read(LAB / f"{number}_{part}.ipynb", 4).cells if c.cell_type == "code"]
        asked = [k for c in code for k in re.findall(r'lab\.check\("([\w.]+)"', c)]
        assert asked == keys
        for key in keys:
            cell = next(c for c in code if f'lab.check("{key}"' in c)
            assert re.search(r"None  # your code", cell), f"{key}: the notebook holds a placeholder answer"
    with pytest.raises(ValueError, match="unknown part"):
        lab.exercises("homework")
    with pytest.raises(KeyError, match="no exercise"):
        lab.grade("observe.nothing", 1)


def test_placeholders_are_not_answered_yet_and_check_prints(tree, capsys):
    assert lab.grade("observe.peak_layer", None, tree).status == "unanswered"
    assert lab.grade("observe.word_map", lambda tree, word, step: None, tree).status == "unanswered"
    assert lab.grade("measure.soft_iou", lambda a, b: None, tree).status == "unanswered"
    assert lab.grade("intervene.objective", lambda maps: None).status == "unanswered"
    lab.check("observe.settle_step", None, tree)
    assert capsys.readouterr().out.startswith("… observe.settle_step: not answered yet")
    lab.check("observe.settle_step", -7, tree)
    assert capsys.readouterr().out.startswith("✗ observe.settle_step: hint:")


# -- part 1: observe ---------------------------------------------------------------------------------------------


def test_word_map(tree):
    assert lab.grade("observe.word_map", _word_map, tree).correct

    def one_layer(tree, word, step):
        cross = tree["cross/res16"]["attn"].isel(sample=0).sel(step=step)
        return cross.isel(token=_tokens(tree).index(word), layer=0).values

    def next_token(tree, word, step):
        cross = tree["cross/res16"]["attn"].isel(sample=0).sel(step=step)
        return cross.isel(token=_tokens(tree).index(word) + 1).mean("layer").values

    def every_layer(tree, word, step):
        cross = tree["cross/res16"]["attn"].isel(sample=0).sel(step=step)
        return cross.isel(token=_tokens(tree).index(word)).values

    def broken(tree, word, step):
        raise KeyError(word)

    for wrong, says in ((one_layer, "one layer"), (next_token, "another token"), (every_layer, "shape"),
                        (broken, "raised KeyError"), ("circle", "a function")):
        result = lab.grade("observe.word_map", wrong, tree)
        assert result.status == "wrong" and says in result.message, result.message


def test_peak_layer(tree):
    peaks = _layer_peaks(tree, "circle")
    best, worst = max(peaks, key=peaks.get), min(peaks, key=peaks.get)
    block = best.removesuffix(".attn2")
    group = next(g for g in tree["cross"].children if best in tree[f"cross/{g}"]["layer"].values)
    for spelling in (best, block, f"{group}/{best}", f"{group} · {block}"):  # as listed, and as the explorer shows it
        assert lab.grade("observe.peak_layer", spelling, tree).correct, spelling
    result = lab.grade("observe.peak_layer", worst, tree)
    assert result.status == "wrong" and "another layer goes higher" in result.message
    assert block not in result.message and f"{peaks[best]:.3f}" not in result.message
    for nonsense in ("up_blocks.9.attentions.0", 3):
        assert lab.grade("observe.peak_layer", nonsense, tree).status == "wrong"


def test_settle_step(tree):
    correlations = _correlations_with_final(tree, "blue")
    accepted = {_settled(correlations, at_least) for at_least in (0.89, 0.9, 0.91)}
    assert lab.grade("observe.settle_step", _settled(correlations, 0.9), tree).correct
    assert lab.grade("observe.settle_step", np.int64(_settled(correlations, 0.9)), tree).correct
    early, late = min(accepted) - 1, max(accepted) + 1
    assert early >= 0 and late < STEPS, f"the map settles at an end of the recording: {correlations.round(2)}"
    result = lab.grade("observe.settle_step", early, tree)
    assert result.status == "wrong" and "look later" in result.message
    result = lab.grade("observe.settle_step", late, tree)
    assert result.status == "wrong" and "look earlier" in result.message
    assert not any(re.search(rf"\b{step}\b", result.message.replace("0.9", "")) for step in accepted)
    for nonsense in (STEPS, 1.5, "3"):
        assert lab.grade("observe.settle_step", nonsense, tree).status == "wrong"


# -- part 2: measure ---------------------------------------------------------------------------------------------


def test_soft_iou(tree):
    assert lab.grade("measure.soft_iou", _min_max_iou, tree).correct

    def raw(a, b):
        return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())

    def per_pixel(a, b):
        return np.minimum(a, b) / np.maximum(a, b)

    def distance(a, b):
        return 1 - _min_max_iou(a, b)

    for wrong, says in ((raw, "scaling a map"), (per_pixel, "one number"), (distance, "identical maps")):
        result = lab.grade("measure.soft_iou", wrong, tree)
        assert result.status == "wrong" and says in result.message, result.message


def test_missing_rate(tree):
    judged = _judged(tree)
    missing = sum("missing" in statuses for statuses, _ in judged) / len(judged)
    failed = sum(any(s != "present" for s in statuses) for statuses, _ in judged) / len(judged)
    assert failed != missing, "some image fails without a missing subject"
    assert lab.grade("measure.missing_rate", missing, tree).correct
    assert lab.grade("measure.missing_rate", np.float32(missing), tree).correct
    result = lab.grade("measure.missing_rate", failed, tree)
    assert result.status == "wrong" and "count only those where one is 'missing'" in result.message
    assert lab.grade("measure.missing_rate", len(judged) + 1, tree).message.startswith("hint: give a share")
    result = lab.grade("measure.missing_rate", (missing + 0.37) % 1, tree)
    assert result.status == "wrong" and f"{missing:.0%}" not in result.message


def test_best_statistic(tree):
    separation, failed = _two_object_separation(tree)
    assert failed.any() and not failed.all(), "the two-object images come out both ways"
    best, worst = max(separation, key=separation.get), min(separation, key=separation.get)
    assert lab.grade("measure.best_statistic", best, tree).correct
    if separation[worst] < separation[best]:
        result = lab.grade("measure.best_statistic", worst, tree)
        assert result.status == "wrong" and "another statistic separates better" in result.message
        assert best not in result.message
    assert "column names" in lab.grade("measure.best_statistic", "iou", tree).message
    alike = tree.isel(sample=[0])  # one image: nothing to separate
    assert "record more seeds" in lab.grade("measure.best_statistic", best, alike).message


def test_helpers_agree_with_the_recording(tree):
    maps = lab.subject_maps(tree, sample=0, step=-1)
    assert list(maps.subject.values) == ["circle", "square"]
    np.testing.assert_allclose(maps.sel(subject="circle").values, _word_map(tree, "circle", STEPS - 1), atol=1e-3)
    stats = lab.overlap_table(tree)
    assert len(stats) == 8 * STEPS and set(lab.STATISTICS) <= set(stats.columns)
    last = stats[(stats["sample"] == 0) & (stats.step == STEPS - 1)].iloc[0]
    assert math.isclose(last.soft_iou, _min_max_iou(*maps.values), rel_tol=1e-4)
    three = lab.overlap_table(tree).query("sample == 4 and step == 0").iloc[0]  # three subjects: mean over pairs
    m3 = lab.subject_maps(tree, sample=4, step=0).values
    assert math.isclose(three.soft_iou, np.mean([_min_max_iou(m3[i], m3[j]) for i, j in pair_indices(3)]),
                        rel_tol=1e-4)
    judged = lab.verdicts(tree)
    assert list(judged.statuses) == [", ".join(s) for s, _ in _judged(tree)]
    grid, curves = lab.image_grid(tree, judged, columns=4), lab.plot_statistics(stats, judged)
    assert sum(ax.has_data() for ax in grid.axes) == 8 and len(curves.axes) == len(lab.STATISTICS)
    plt.close(grid)
    plt.close(curves)


# -- part 3: intervene -------------------------------------------------------------------------------------------


def _scene(*objects):
    return render([Shape(shape, colour, cx, cy, 8) for shape, colour, cx, cy in objects])[0]


def test_fixed():
    both = _scene(("circle", "red", 18, 18), ("square", "blue", 44, 44))
    lost = _scene(("circle", "red", 18, 18))
    swapped = _scene(("circle", "blue", 18, 18), ("square", "red", 44, 44))  # mixed: drawn, with the other's colour
    assert [s.status for s in judge(lost, TWO)] == ["present", "missing"]
    assert "missing" not in [s.status for s in judge(swapped, TWO)]
    runs = {"none": GuideResult([lost], None, None), "ae": GuideResult([both], None, None), "iou": lost, "kl": swapped}
    assert lab.grade("intervene.fixed", {"ae", "kl"}, runs, TWO).correct
    assert lab.grade("intervene.fixed", ["kl", "ae"], runs, TWO).correct
    left_out = lab.grade("intervene.fixed", {"ae"}, runs, TWO)
    assert left_out.status == "wrong" and "left out" in left_out.message and "kl" not in left_out.message
    still = lab.grade("intervene.fixed", {"ae", "kl", "iou"}, runs, TWO)
    assert still.status == "wrong" and "still finds a subject missing" in still.message
    for wrong in ({"none"}, {"sdxl"}, set(), 3):
        assert lab.grade("intervene.fixed", wrong, runs, TWO).status == "wrong"
    assert lab.grade("intervene.fixed", set(), {"none": lost, "ae": lost}, TWO).correct
    nothing_lost = lab.grade("intervene.fixed", {"ae"}, {"none": both, "ae": both}, TWO)
    assert nothing_lost.status == "wrong" and "nothing to bring back" in nothing_lost.message


def test_objective():
    def overlap_loss(maps):
        s = maps.subjects
        return torch.stack([soft_iou(s[:, i], s[:, j]) for i, j in pair_indices(s.shape[1])], -1).mean(-1)

    assert lab.grade("intervene.objective", overlap_loss).correct

    def first_pair(maps):
        return soft_iou(maps.subjects[:, 0], maps.subjects[:, 1])

    def as_float(maps):
        return overlap_loss(maps).sum().item()

    def detached(maps):
        return overlap_loss(maps).detach()

    def per_pair(maps):
        s = maps.subjects
        return torch.stack([soft_iou(s[:, i], s[:, j]) for i, j in pair_indices(s.shape[1])], -1)

    def inverted(maps):
        return 1 - overlap_loss(maps)

    for wrong, says in ((first_pair, "three pairs"), (as_float, "torch tensor"), (detached, "no gradient"),
                        (per_pair, "average over the pairs"), (inverted, "off by")):
        result = lab.grade("intervene.objective", wrong)
        assert result.status == "wrong" and says in result.message, result.message


def _edit(inject, edited, source):
    settings = EditSettings("a red circle", "a blue circle", 0, inject, (), (), 4, 7.5, False)
    return EditResult(source, edited, settings)


def test_kept_layout():
    source = _scene(("circle", "red", 24, 24))
    edits = {"self": _edit("self", _scene(("circle", "blue", 24, 24)), source),  # same place, new colour
             "cross": _edit("cross", _scene(("circle", "blue", 31, 24)), source),  # new colour, moved 7 px
             "none": _edit("none", _scene(("circle", "red", 24, 24)), source)}  # kept, colour not changed
    assert lab.grade("intervene.kept_layout", "self", edits).correct
    moved = lab.grade("intervene.kept_layout", "cross", edits)
    assert moved.status == "wrong" and "kept only" in moved.message and "'self'" not in moved.message
    unchanged = lab.grade("intervene.kept_layout", "none", edits)
    assert unchanged.status == "wrong" and "does not show the target" in unchanged.message
    assert lab.grade("intervene.kept_layout", "prompt-to-prompt", edits).status == "wrong"
    no_target = {k: _edit(k, source, source) for k in edits}
    assert "no injection gave the target" in lab.grade("intervene.kept_layout", "self", no_target).message


# -- the notebooks in JupyterLab -----------------------------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("lab_session", Path(__file__).with_name("jupyterlab.py"))
session = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(session)

NOTEBOOKS = sorted(LAB.glob("*.ipynb"))
SHOWN = {"1_observe": "probe.explore(tree)", "2_measure": "lab.plot_statistics", "3_intervene": "runs.update"}
_TEXT = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const text = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (const out of cell.outputs.toJSON()) {
      if (out.output_type === 'stream') text.push([].concat(out.text).join(''));
    }
  }
  return text.join('');
}"""
_SCROLL = """async (needle) => {
  window.jupyterapp.shell.collapseLeft();  // the file browser: more room for the notebook
  const notebook = window.jupyterapp.shell.currentWidget.content;
  const cells = notebook.model.cells;
  for (let i = 0; i < cells.length; i++) {
    if (cells.get(i).sharedModel.getSource().includes(needle)) {
      notebook.activeCellIndex = i;
      await notebook.scrollToItem(i, 'start');
      return i;
    }
  }
  return -1;
}"""


def _look(page, stem: str, screenshot: Path) -> dict:
    """What the checkers printed; then the part's key output scrolled to the top and the page saved."""
    seen = {"text": page.evaluate(_TEXT)}
    seen["cell"] = page.evaluate(_SCROLL, SHOWN[stem])
    if stem == "1_observe":
        page.locator(".probe-explorer").wait_for(state="visible")
        seen["explorer"] = page.locator(".probe-explorer img.probe-cross").count()
    page.wait_for_timeout(1500)  # let the outputs paint
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot))
    return seen


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lab_notebook_in_jupyterlab(path, tmp_path):
    reason = session.skip_reason()
    if reason:
        pytest.skip(reason)
    screenshots = os.environ.get("PROBE_SCREENSHOTS") == "1"
    shot = (ROOT / "figures" if screenshots else tmp_path) / f"lab_{path.stem}.png"
    notebook = tmp_path / path.name
    shutil.copy(path, notebook)
    env = {"OMP_NUM_THREADS": "1"} if screenshots else {"OMP_NUM_THREADS": "1", "PROBE_STEPS": "4"}
    seen = session.run_in_jupyterlab(notebook, lambda page: _look(page, path.stem, shot), env=env,
                                     failure_screenshot=tmp_path / "failure.png")
    part = path.stem.split("_", 1)[1]
    unanswered = re.findall(r"… ([\w.]+): not answered yet", seen["text"])
    assert unanswered == [e.key for e in lab.exercises(part)]
    assert "✗" not in seen["text"] and "Traceback" not in seen["text"]
    assert seen["cell"] >= 0 and shot.stat().st_size > 20_000
    if part == "observe":
        assert seen["explorer"] == 1
