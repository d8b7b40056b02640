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
