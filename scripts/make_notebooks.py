"""Write the notebooks under notebooks/ from the cell lists below (outputs stay empty)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """import os
import probe
from probe.cli import _model_default

MODEL = os.environ.get("PROBE_MODEL") or _model_default()  # the built-in shapes model when present
STEPS = int(os.environ.get("PROBE_STEPS", "50"))            # the tests run with fewer steps
QUICK = os.environ.get("PROBE_QUICK", "0") == "1"           # the tests run the studies at tiny sizes
pipe = probe.load(MODEL)"""

NOTEBOOKS = {
    "01_record_attention.ipynb": [
        new_markdown_cell(
            "# Recording attention\n\nEvery cross- and self-attention map of a generation, per step and layer, "
            "as an `xarray.DataTree`: select with `.sel`, average with `.mean`, save with `.to_zarr`."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            'prompt = "a red circle and a blue square"\n'
            "print(f\"estimated size: {probe.estimate(pipe, prompt, seeds=[0, 1], steps=STEPS) / 1e6:.1f} MB\")\n"
            "tree = probe.record(pipe, prompt, seeds=[0, 1], steps=STEPS)\n"
            "tree"
        ),
        new_markdown_cell("Groups are per attention kind and grid. The 16×16 cross-attention of the first sample:"),
        new_code_cell(
            'cross = tree["cross/res16"]\n'
            'cross["attn"].isel(sample=0).mean("layer").sel(token=[2, 3, 6, 7]).isel(step=-1)'
            ".plot(col=\"token\", cmap=\"inferno\")"
        ),
        new_markdown_cell("How each word's map settles over the denoising steps (layer mean):"),
        new_code_cell(
            "from probe.plots import token_maps_over_steps, token_overlay\n\n"
            'token_maps_over_steps(tree, ["red", "circle", "blue", "square"], "cross/res16", sample=0);'
        ),
        new_code_cell('token_overlay(tree, "square", step=-1, sample=1);'),
        new_markdown_cell("Self-attention of one query pixel (the image centre) at the last step:"),
        new_code_cell(
            'selfattn = tree["self/res16"]["attn"].isel(sample=0, step=-1).mean("layer")\n'
            "selfattn.isel(y=8, x=8).plot(cmap=\"inferno\")"
        ),
    ],
    "02_linear_probes.ipynb": [
        new_markdown_cell(
            "# Linear probes: what cross- and self-attention know\n\n"
            "Single-object images (every colour × shape, many seeds, so many positions). For each attention kind, "
            "grid, layer and step bin a cross-validated logistic regression reads colour, shape and position off "
            "the subject's maps: its cross-attention map, its Otsu-aggregated self-attention map, and the plain "
            "mean self-attention map. Free-Prompt-Editing's claim: cross-attention carries *what*, self-attention "
            "*where*. Colour and shape labels are what the prompt asked; `judge_*` and `position` are what the "
            "judge found. Accuracy is out-of-fold, with a Wilson 95% interval; chance is the majority class."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.experiments import probe_headline, probe_study\n\n"
            "study = probe_study(pipe, steps=STEPS, quick=QUICK)  # 500 images (24 when quick)\n"
            "probe_headline(study.accuracy)"
        ),
        new_markdown_cell("Layer means per grid and step bin (each row of `study.accuracy` is one probe):"),
        new_code_cell(
            'study.accuracy.query("layer == \'mean\'").pivot_table(\n'
            '    index=["target", "kind", "feature", "resolution"], columns="step_bin", values="accuracy")'
        ),
        new_markdown_cell("Accuracy by layer and step, cross vs self (dashed: chance):"),
        new_code_cell('study.figures["probe_accuracy"]'),
        new_markdown_cell("What the judge made of the images (labels of the `judge_*` and `position` targets):"),
        new_code_cell('study.labels.status.value_counts()'),
    ],
    "03_overlap_and_missing.ipynb": [
        new_markdown_cell(
            "# Attention overlap and entity missing\n\n"
            "Two-object prompts (\"a red circle and a blue square\"), several seeds each. At every step the two "
            "subjects' layer-mean cross-attention maps (grid closest to 16×16) are compared: soft IoU, "
            "centre-of-mass distance, symmetric KL, clustering compactness, self-cross overlap (with Otsu-aggregated "
            "self-attention), each subject's intensity and spread, the Attend-and-Excite response and the "
            "aggregation loss. The judge says whether a subject is missing; the ROC AUC says how well each "
            "statistic predicts that (0.5: not at all), with a bootstrap 95% interval, and a cross-validated "
            "logistic regression uses all statistics together."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.experiments import overlap_headline, overlap_study\n\n"
            "study = overlap_study(pipe, steps=STEPS, quick=QUICK)  # 400 images (16 when quick)\n"
            "overlap_headline(study.association)"
        ),
        new_markdown_cell("AUC for \"a subject is missing\" per statistic and step (band: bootstrap 95% interval):"),
        new_code_cell('study.figures["overlap_auc"]'),
        new_markdown_cell("Images with every subject present and with a subject missing, under their subjects' maps:"),
        new_code_cell('study.figures["overlap_examples"]'),
        new_markdown_cell("One row per image and step: every statistic, the judge's statuses and the outcome."),
        new_code_cell("study.metrics.head()"),
    ],
}


def main() -> None:
    ROOT.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, ROOT / name)
        print(f"wrote notebooks/{name}")


if __name__ == "__main__":
    main()
