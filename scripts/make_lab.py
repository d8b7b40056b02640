"""Write the classroom lab's notebooks under notebooks/lab/ from the cell lists below (outputs stay empty).

The exercises' questions come from ``probe.ui.lab.EXERCISES``, so a notebook and its checker never disagree about what
is asked. The first code cell is scripts/notebook_cells.py's, as the other notebooks'.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_cells import setup_cell, write_notebooks

from probe.ui.lab import EXERCISES

ROOT = Path(__file__).resolve().parents[1] / "notebooks" / "lab"


def setup(full_size: str, seeds: str) -> str:
    """The first code cell: the sizes a teacher may change, then the model."""
    return setup_cell(f"{full_size}; False: the classroom size (minutes on a laptop CPU)",
                      "the built-in model (the exercises read its 16×16 cross-attention)",
                      imports="from probe.ui import lab", after=f"SEEDS = {seeds}")


HOW = ("**Exercises.** Write your answer (a value or a small function) where it says `# your code` and run the "
       "cell: `lab.check` recomputes the right answer from *your* recording and prints ✓, or a hint. Until you "
       "answer it prints *not answered yet*.")


def question(key: str, number: int) -> nbformat.NotebookNode:
    return new_markdown_cell(f"### Exercise {number} · `{key}`\n\n{EXERCISES[key].question}")


def discuss(*points: str) -> nbformat.NotebookNode:
    return new_markdown_cell("### To discuss\n\n" + "\n".join(f"- {p}" for p in points))


NOTEBOOKS = {
    "1_observe.ipynb": [
        new_markdown_cell(
            "# Lab 1 · Observe: where does each word look?\n\n"
            "A text-to-image model draws each word of the prompt where its cross-attention puts it. Record every "
            "cross- and self-attention map of a two-object prompt, per denoising step and layer, and look at them: "
            "which layers localise the words, and how early in the denoising does the layout settle?\n\n" + HOW
        ),
        new_code_cell(setup("two more seeds and 50 steps", "[0, 1, 2, 3] if FULL else [0, 1]")),
        new_markdown_cell("Record the prompt for each seed: the tree holds one group per attention kind and grid "
                          "(`cross/res16`, `cross/res8`, `cross/res4`, `self/…`) and the images."),
        new_code_cell(
            'prompt = "a red circle and a blue square"\n'
            "tree = probe.record(pipe, prompt, seeds=SEEDS, steps=STEPS, progress=False)\n"
            'tree["cross/res16"]'
        ),
        new_markdown_cell(
            "The explorer: choose the sample, step, layers and token; the left panel is the token's "
            "cross-attention over the image, the right one the self-attention of the query pixel (click a pixel "
            "or move the sliders). Below, the subjects' overlap statistics, the subject of part 2."
        ),
        new_code_cell("probe.explore(tree)"),
        new_markdown_cell("Each word's map over the denoising steps (res16, layer mean) and, at the last step, each "
                          "8×8 layer on its own:"),
        new_code_cell(
            "from probe.plots import token_maps_over_steps\n\n"
            'token_maps_over_steps(tree, ["red", "circle", "blue", "square"], "cross/res16", sample=0);'
        ),
        new_code_cell(
            "from probe.analysis import maps\n\n"
            'circle = maps.word_map(tree["cross/res8"], sample=0, word="circle")  # (step, layer, y, x)\n'
            'circle.isel(step=-1).plot(col="layer", cmap="inferno");'
        ),
        question("observe.word_map", 1),
        new_code_cell(
            "def word_map(tree, word, step):\n"
            "    return None  # your code\n\n\n"
            'lab.check("observe.word_map", word_map, tree)'
        ),
        question("observe.peak_layer", 2),
        new_code_cell(
            "peak_layer = None  # your code: a layer name\n"
            'lab.check("observe.peak_layer", peak_layer, tree)'
        ),
        question("observe.settle_step", 3),
        new_code_cell(
            "settle_step = None  # your code: a step number\n"
            'lab.check("observe.settle_step", settle_step, tree)'
        ),
        discuss(
            "Colour words and nouns: which of them localise on their object, and at which grid?",
            "The layout (where each object goes) settles early, the details late: what does that mean for a method "
            "that wants to change the layout?",
            "Self-attention of a pixel inside an object: does it cover that object only? What could it be used for?",
        ),
    ],
    "2_measure.ipynb": [
        new_markdown_cell(
            "# Lab 2 · Measure: do overlapping maps predict a lost subject?\n\n"
            "When two subjects' cross-attention maps cover the same pixels, the model may draw one of them only "
            "(*missing*) or one object that mixes both (*mixed*). Record a two- and a three-object prompt over a "
            "handful of seeds, judge every image exactly (the shapes world is known pixel by pixel) and measure how "
            "the subjects' maps overlap: soft IoU, centre-of-mass distance, symmetric KL, compactness "
            "(`probe.analysis.overlap`).\n\n" + HOW
        ),
        new_code_cell(setup("40 seeds per prompt and 50 steps", "list(range(40 if FULL else 10))")),
        new_code_cell(
            'prompts = ["a red circle and a blue square", "a red ellipse and a green triangle and a yellow square"]\n'
            'tree = probe.record(pipe, prompts, seeds=SEEDS, steps=STEPS, kinds=("cross",), progress=False)\n'
            "judged = lab.verdicts(tree)  # the exact judge: one status per subject\n"
            "lab.image_grid(tree, judged);"
        ),
        new_code_cell("judged.groupby(\"prompt\")[[\"any_missing\", \"all_present\", \"n_mixed\"]].mean()"),
        new_markdown_cell(
            "The statistics of the subjects' maps (res16, layer mean; mean over the pairs of a three-object "
            "prompt), one row per image and step, and each over the steps (red: some subject not present):"
        ),
        new_code_cell(
            "stats = lab.overlap_table(tree)\n"
            "lab.plot_statistics(stats, judged)\n"
            "stats.head()"
        ),
        question("measure.soft_iou", 1),
        new_code_cell(
            "def soft_iou(a, b):\n"
            "    return None  # your code (numpy: a.min(), np.minimum, …)\n\n\n"
            'lab.check("measure.soft_iou", soft_iou, tree)'
        ),
        question("measure.missing_rate", 2),
        new_code_cell(
            "missing_rate = None  # your code: a share between 0 and 1\n"
            'lab.check("measure.missing_rate", missing_rate, tree)'
        ),
        question("measure.best_statistic", 3),
        new_code_cell(
            "best_statistic = None  # your code: a column name of stats (sklearn.metrics.roc_auc_score helps)\n"
            'lab.check("measure.best_statistic", best_statistic, tree)'
        ),
        discuss(
            "Missing or mixed: which failure does this model make, and which does the two-object prompt make?",
            "With a handful of images, how sure are you of the best statistic? What would a bootstrap of the AUC "
            "say, and how many images would you want?",
            "Three-object prompts fail more often and their maps are more crowded: does a statistic predict "
            "failure, or only the number of objects? How would you tell?",
        ),
    ],
    "3_intervene.ipynb": [
        new_markdown_cell(
            "# Lab 3 · Intervene: bring a lost subject back, edit without moving things\n\n"
            "Find a seed where a subject goes missing, then change the attention while the image is generated: "
            "Attend-and-Excite (`objective=\"ae\"`) raises the most neglected subject's attention peak, an overlap "
            "loss (`\"iou\"`) pushes the subjects' maps apart. Then edit an image by injecting the source's "
            "attention into the target's generation.\n\n" + HOW
        ),
        new_code_cell(setup("48 seeds and 50 steps", "list(range(48 if FULL else 12))")),
        new_markdown_cell("Unguided images (the guidance code path with no guidance) and the judge's verdicts; the "
                          "lab goes on with the first seed where a subject went missing:"),
        new_code_cell(
            "from probe.plots import image_row\n"
            "from probe.prompts import subjects_of\n"
            "from probe.steer.guide import generate\n"
            "from probe.studies.guided import NO_GUIDANCE_SCHEDULE, scaled_schedule\n\n"
            'prompt = "a red circle and a blue square"\n'
            "subjects = subjects_of(prompt)\n"
            "unguided = {s: generate(pipe, prompt, subjects=subjects, seed=s, steps=STEPS,\n"
            "                        schedule=NO_GUIDANCE_SCHEDULE, progress=False) for s in SEEDS}\n"
            "judged = lab.verdicts(unguided, prompt)\n"
            "missing = judged.index[judged.any_missing].tolist()\n"
            "seed = missing[0] if missing else SEEDS[0]\n"
            'print(f"a subject is missing at seeds {missing}: on with seed {seed}" if missing else\n'
            '      f"no seed lost a subject: raise SEEDS (or FULL = True); on with seed {seed}")\n'
            'judged.drop(columns="prompt")'
        ),
        new_markdown_cell("Guided from the same noise: A&E's schedule with its refinement steps scaled to `STEPS`."),
        new_code_cell(
            "schedule = scaled_schedule(STEPS)\n"
            'runs = {"none": unguided[seed]}\n'
            'runs.update({objective: generate(pipe, prompt, subjects=subjects, objective=objective, seed=seed,\n'
            "                                 steps=STEPS, schedule=schedule, progress=False)\n"
            '             for objective in ("ae", "iou")})\n'
            'image_row({name: run.images[0] for name, run in runs.items()}, f"{prompt} · seed {seed}");'
        ),
        question("intervene.fixed", 1),
        new_code_cell(
            "from probe.judges import ExactJudge\n\n"
            "judge = ExactJudge()\n"
            'print([s.status for s in judge(runs["none"].images[0], prompt)])  # one status per subject\n\n'
            "fixed = None  # your code: a set of objective names\n"
            'lab.check("intervene.fixed", fixed, runs, prompt)'
        ),
        question("intervene.objective", 2),
        new_code_cell(
            "def overlap_loss(maps):\n"
            "    return None  # your code (probe.analysis.overlap: soft_iou, pair_indices)\n\n\n"
            'lab.check("intervene.objective", overlap_loss)'
        ),
        new_code_cell(
            'if lab.grade("intervene.objective", overlap_loss).correct:  # once it is right: guide with your own\n'
            "    mine = generate(pipe, prompt, subjects=subjects, objective=overlap_loss, seed=seed, steps=STEPS,\n"
            "                    schedule=schedule, progress=False)\n"
            '    image_row({"iou": runs["iou"].images[0], "yours": mine.images[0]})'
        ),
        new_markdown_cell(
            "Editing: source and target run as one batch from the same noise. With `inject=\"self\"` "
            "(Free-Prompt-Editing) the target's self-attention is the source's during the first 80% of the steps, "
            "with `\"cross\"` its cross-attention (prompt-to-prompt), with `\"none\"` only the noise is shared."
        ),
        new_code_cell(
            "from probe.steer.edit import edit\n\n"
            'source, target = "a red circle", "a blue circle"\n'
            "edits = {inject: edit(pipe, source, target, seed=0, inject=inject, steps=STEPS)\n"
            '         for inject in ("self", "cross", "none")}\n'
            'image_row({"source": edits["self"].source, **{f"{i} → blue": e.edited for i, e in edits.items()}});'
        ),
        question("intervene.kept_layout", 3),
        new_code_cell(
            'kept_layout = None  # your code: "self", "cross" or "none"\n'
            'lab.check("intervene.kept_layout", kept_layout, edits)'
        ),
        discuss(
            "A&E makes every subject's peak high; an overlap loss pulls the maps apart. Which failure does each "
            "address, and what did the subject that came back look like (present or mixed)?",
            "One seed is an anecdote: how would you show that a method lowers the missing rate (see "
            "notebooks/05_guided_generation.ipynb)?",
            "Free-Prompt-Editing says self-attention carries the layout. Does it on this model? What does sharing "
            "the noise alone keep?",
        ),
    ],
}


def main() -> None:
    write_notebooks(ROOT, NOTEBOOKS, lambda name: f"lab{name[0]}")


if __name__ == "__main__":
    main()
