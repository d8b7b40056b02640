"""What scripts/make_notebooks.py and scripts/make_lab.py share: the first code cell and the writer."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

REPO = Path(__file__).resolve().parents[1]
STEPS_LINE = ('STEPS = int(os.environ.get("PROBE_STEPS", 50 if FULL else 20))'
              "  # denoising steps (the test suite sets fewer)")


def setup_cell(full: str, model: str, imports: str = "", after: str = "") -> str:
    """The first code cell: ``FULL = False`` (``full`` says what True buys), ``MODEL``, ``STEPS`` from
    ``PROBE_STEPS`` where the test suite sets it, then ``after`` and the model."""
    return "\n".join(["import os", "", "import probe", *([imports] if imports else []), "",
                      f"FULL = False      # True: {full}",
                      f'MODEL = "shapes"  # {model}', STEPS_LINE, *([after] if after else []),
                      "pipe = probe.load(MODEL)"])


def write_notebooks(folder: Path, notebooks: dict[str, list], id_prefix) -> None:
    """Write each notebook without outputs, its cells' ids stable (``id_prefix(name)-NN``) so that regenerating
    changes only what changed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, cells in notebooks.items():
        for number, cell in enumerate(cells):
            cell.id = f"{id_prefix(name)}-{number:02d}"
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}})
        nbformat.write(nb, folder / name)
        print(f"wrote {(folder / name).relative_to(REPO)}")
