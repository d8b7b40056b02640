"""Every notebook executes headless on the built-in model as a user opens it (quick sizes by default; the suite
sets fewer steps), and uses only public API."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").rglob("*.ipynb"))
PRIVATE = re.compile(r"(from probe[\w.]* import[^\n]*\b_\w+)|(probe(\.\w+)*\._\w+)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PROBE_STEPS", "4")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit notebooks clean"
    assert not [c for c in code if PRIVATE.search(c)], "notebooks use only public API"
    if "FULL =" in "".join(code):
        assert "FULL = False" in "".join(code), "notebooks start at their quick size"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors and os.environ.get("PROBE_STEPS") == "4"
