"""The explorer in a real JupyterLab: it renders, its step slider and a click change what it shows.

Set ``PROBE_SCREENSHOTS=1`` to write the screenshot to ``figures/explorer.png``; otherwise it goes to a temporary
folder.
"""

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

# tests/jupyterlab.py would shadow the jupyterlab package under its own name: load it by path
_spec = importlib.util.spec_from_file_location("lab_session", Path(__file__).with_name("jupyterlab.py"))
lab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab)

ROOT = Path(__file__).resolve().parents[1]
CELLS = [
    "import probe\n\n"
    "pipe = probe.load('shapes')\n"
    "tree = probe.record(pipe, ['a red circle and a blue square', 'a green triangle and a yellow ellipse'],\n"
    "                    seeds=[0, 1], steps=10, progress=False)",
    "explorer = probe.explore(tree)\nexplorer",
]


def _notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text()


def _drive(page, screenshot: Path) -> dict:
    """Wait for the widget, move the step slider one step back, click the image, screenshot the widget."""
    root = page.locator(".probe-explorer")
    root.wait_for(state="visible")
    handle = page.locator(".probe-step .noUi-handle")
    image = page.locator("img.probe-cross")
    image.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('img.probe-cross').naturalWidth > 0")
    seen = {"sliders": page.locator(".probe-explorer .widget-slider").count(),
            "image_width": image.evaluate("img => img.naturalWidth"),
            "step_before": _text(page, ".probe-step .widget-readout"),
            "stats_before": _text(page, ".probe-stats"),
            "query_before": _text(page, ".probe-self-title")}
    handle.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("before => document.querySelector('.probe-stats').innerText !== before",
                           arg=seen["stats_before"], timeout=60_000)
    seen["step_after"] = _text(page, ".probe-step .widget-readout")
    seen["stats_after"] = _text(page, ".probe-stats")
    box = image.bounding_box()
    image.click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.7})
    page.wait_for_function("before => document.querySelector('.probe-self-title').innerText !== before",
                           arg=seen["query_before"], timeout=60_000)
    seen["query_after"] = _text(page, ".probe-self-title")
    page.wait_for_timeout(300)  # let the new panels paint
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    root.screenshot(path=str(screenshot))
    return seen


def test_explorer_in_jupyterlab(tmp_path):
    reason = lab.skip_reason()
    if reason:
        pytest.skip(reason)
    shots = ROOT / "figures" if os.environ.get("PROBE_SCREENSHOTS") == "1" else tmp_path
    screenshot = shots / "explorer.png"
    seen = lab.run_in_jupyterlab(_notebook(tmp_path / "explore.ipynb"), lambda page: _drive(page, screenshot),
                             env={"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
                             failure_screenshot=tmp_path / "failure.png")
    assert seen["sliders"] >= 3 and seen["image_width"] > 0
    assert (seen["step_before"], seen["step_after"]) == ("9", "8")
    assert "step 9" in seen["stats_before"] and "step 8" in seen["stats_after"]
    assert "query pixel y=8, x=8 " in seen["query_before"] and "query pixel y=11, x=4 " in seen["query_after"]
    assert screenshot.stat().st_size > 10_000
