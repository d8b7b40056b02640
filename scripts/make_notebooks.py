"""Write the notebooks under notebooks/ from the cell lists below (outputs stay empty)."""

from pathlib import Path

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_cells import setup_cell, write_notebooks

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = setup_cell(
    "the studies at their full size (hours on a CPU, minutes on a GPU); False: minutes here",
    "the built-in model; or the folder (or hub id) of your own Stable Diffusion / SDXL / SD3 / FLUX",
    after="QUICK = not FULL")

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
            "from probe.studies import probe_headline, probe_study\n\n"
            "study = probe_study(pipe, steps=STEPS, quick=QUICK)  # 500 images with FULL (24 otherwise)\n"
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
            "aggregation loss. The judge says whether a subject is missing and whether the two are mixed (one drawn "
            "with the other's colour or shape); the ROC AUC says how well each statistic predicts each failure "
            "(0.5: not at all), with a bootstrap 95% interval, and a cross-validated logistic regression uses all "
            "statistics together."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.studies import overlap_headline, overlap_study\n\n"
            "study = overlap_study(pipe, steps=STEPS, quick=QUICK)  # 400 images with FULL (16 otherwise)\n"
            "overlap_headline(study.association)"
        ),
        new_markdown_cell("AUC for \"a subject is missing\" and \"subjects mixed\" per statistic and step "
                          "(band: bootstrap 95% interval):"),
        new_code_cell('study.figures["overlap_auc"]'),
        new_markdown_cell("Images with every subject present, with a subject missing and with subjects mixed, under "
                          "their subjects' maps:"),
        new_code_cell('study.figures["overlap_examples"]'),
        new_markdown_cell("One row per image and step: every statistic, the judge's statuses and the outcome."),
        new_code_cell("study.metrics.head()"),
    ],
    "04_editing.ipynb": [
        new_markdown_cell(
            "# Editing by attention injection\n\n"
            "Free-Prompt-Editing's claim: self-attention carries *where/shape*, cross-attention *what*. Source and "
            "target run as one batch from the same noise; the target's self-attention (FPE), or its "
            "cross-attention (prompt-to-prompt's word swap), is replaced by the source's during the first 80% of "
            "the steps. With self-injection the object should keep its place and shape and take the new colour."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.plots import image_row\n"
            "from probe.steer.edit import compare, edit\n\n"
            'source, target = "a red circle", "a blue circle"\n'
            "edits = {inject: edit(pipe, source, target, seed=0, inject=inject, steps=STEPS)\n"
            '         for inject in ("self", "cross", "none")}\n'
            'image_row({f"source: {source}": edits["none"].source,\n'
            '           **{f"{inject} → {target}": e.edited for inject, e in edits.items()}});'
        ),
        new_markdown_cell("The judge's verdict on each edit (success: the target is present; IoU: structure kept):"),
        new_code_cell(
            "import pandas as pd\n\n"
            "pd.DataFrame({inject: compare(e.source, e.edited, source, target) for inject, e in edits.items()}).T"
        ),
        new_markdown_cell(
            "The study: colour and shape edits of generated and of rendered (DDIM-inverted) sources, per injection, "
            "injected fraction of the steps and layer set; the headline is FPE's setting (0.8, layers coarser than "
            "the latent)."
        ),
        new_code_cell(
            "from probe.studies import edit_headline, edit_study\n\n"
            "study = edit_study(pipe, steps=STEPS, quick=QUICK)  # 20 seeds with FULL (1 otherwise)\n"
            "edit_headline(study.summary)"
        ),
        new_code_cell('study.figures["edit_success"]'),
    ],
    "05_guided_generation.ipynb": [
        new_markdown_cell(
            "# Guided generation: does lowering overlap lower entity missing?\n\n"
            "Attend-and-Excite (`ae`) excites each subject's attention peak; the overlap objectives (`iou`, `com`, "
            "`kl`, `cc`, `self_cross`, `ai_t2i`) push the subjects' maps apart. All run through the pipeline's own "
            "`callback_on_step_end`; `none` is the same code path with no guidance."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.plots import image_row\n"
            "from probe.steer.guide import generate\n"
            "from probe.studies.guided import NO_GUIDANCE_SCHEDULE\n\n"
            'prompt, subjects = "a red circle and a blue square", ["circle", "square"]\n'
            "runs = {method: generate(pipe, prompt, subjects=subjects, objective=method, seed=0, steps=STEPS,\n"
            '                         progress=False) for method in ("ae", "iou")}\n'
            'runs = {"none": generate(pipe, prompt, subjects=subjects, seed=0, steps=STEPS, progress=False,\n'
            "                         schedule=NO_GUIDANCE_SCHEDULE), **runs}\n"
            "image_row({method: run.images[0] for method, run in runs.items()}, prompt);"
        ),
        new_markdown_cell("Each guided step's loss (after refinement, before its gradient step):"),
        new_code_cell(
            "import matplotlib.pyplot as plt\n\n"
            "fig, axes = plt.subplots(1, 2, figsize=(7, 2.6))\n"
            'for ax, method in zip(axes, ("ae", "iou")):\n'
            "    history = runs[method].history\n"
            '    ax.plot(history.step, history.loss, marker="o")\n'
            '    ax.set(title=method, xlabel="step", ylabel="loss")\n'
            "fig.tight_layout()\n"
            'runs["ae"].history'
        ),
        new_markdown_cell(
            "The study: two- and three-object prompts × seeds, every method without and with INITNO. Missing rate "
            "with a bootstrap 95% interval, and each method's missing rate minus A&E's on the same prompts and "
            "seeds (paired interval); the pooled row asks whether the overlap objectives, as a family, beat A&E."
        ),
        new_code_cell(
            "from probe.studies import guidance_headline, guidance_study\n\n"
            "# with FULL: as many images as its power calculation asks (printed); 4 otherwise\n"
            "study = guidance_study(pipe, steps=STEPS, quick=QUICK)\n"
            "guidance_headline(study.summary)"
        ),
        new_code_cell('study.figures["guidance_missing"]'),
        new_code_cell('study.figures["guidance_overlap_vs_missing"]'),
    ],
    "06_self_cross.ipynb": [
        new_markdown_cell(
            "# Subject mixing on similar subjects\n\n"
            "Similar subjects (red/orange, blue/purple, circle/ellipse) tend to merge into one object that mixes "
            "both. Self-Cross guidance penalises each subject's self-attention region covering the other's "
            "cross-attention. The judge calls a subject *mixed* when an object blends or swaps two subjects' "
            "attributes."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from probe.plots import image_row\n"
            "from probe.steer.guide import generate\n"
            "from probe.studies.guided import NO_GUIDANCE_SCHEDULE\n\n"
            'prompt, subjects = "a blue circle and a purple ellipse", ["circle", "ellipse"]\n'
            'methods = {"none": ("ae", NO_GUIDANCE_SCHEDULE), "ae": ("ae", None), "self_cross": ("self_cross", None)}\n'
            "images = {method: generate(pipe, prompt, subjects=subjects, objective=objective, schedule=schedule,\n"
            "                           seed=0, steps=STEPS, progress=False).images[0]\n"
            "          for method, (objective, schedule) in methods.items()}\n"
            "image_row(images, prompt);"
        ),
        new_code_cell(
            "from probe.studies import self_cross_headline, self_cross_study\n\n"
            "study = self_cross_study(pipe, steps=STEPS, quick=QUICK)  # 320 images per method with FULL, else 4\n"
            "self_cross_headline(study.summary)"
        ),
        new_code_cell('study.figures["self_cross_mixing"]'),
    ],
}


def main() -> None:
    write_notebooks(ROOT, NOTEBOOKS, lambda name: Path(name).stem[:2])


if __name__ == "__main__":
    main()
