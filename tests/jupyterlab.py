"""Run a notebook in a real JupyterLab in headless Chromium, so widgets are tested as a reader sees them.

``run_in_jupyterlab(path, actions)`` starts JupyterLab on a free port with its own token, settings and workspace
(nothing of the user's, nothing written next to the notebook), opens the notebook in Debian's Chromium through
Playwright, runs every cell, fails on an error output, then hands the page to ``actions`` and returns what it
returns. ``skip_reason()`` says why it cannot run here (no Chromium, no Playwright), for ``pytest.skip``.

Its name would shadow the ``jupyterlab`` package, so a test loads it by path (see ``tests/test_jupyterlab.py``)::

    spec = importlib.util.spec_from_file_location("lab_session", Path(__file__).with_name("jupyterlab.py"))
    lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

CHROMIUM = Path("/usr/bin/chromium")
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600
ACTION_TIMEOUT_S = 60
VIEWPORT = {"width": 1400, "height": 1000}
SETTINGS = {  # plugin id → settings: no autosave (the notebook file stays as it is), no news or update checks
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def skip_reason() -> str | None:
    """Why a browser test cannot run on this machine, or None when it can."""
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y --no-install-recommends chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; its browsers are not needed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    for plugin, values in SETTINGS.items():
        package, name = plugin.split(":")
        path = folder / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


# JavaScript run in the page through the app JupyterLab exposes (expose_app_in_browser): the open notebook's cells.
_NOTEBOOK_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return !!(w && w.content && w.sessionContext && w.sessionContext.session
            && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle');
}"""
_ALL_RUN = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  if (!kernel || kernel.status !== 'idle') return false;
  const cells = w.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code' || !cell.sharedModel.getSource().trim()) continue;
    if (!cell.executionCount) return false;
  }
  return true;
}"""
_ERRORS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (const out of cell.outputs.toJSON()) {
      if (out.output_type === 'error') errors.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
    }
  }
  return errors;
}"""


def run_in_jupyterlab(
    notebook_path: str | Path,
    actions: Callable[[Any], Any],
    *,
    env: dict[str, str] | None = None,
    timeout_s: float = RUN_TIMEOUT_S,
    viewport: dict[str, int] | None = None,
    failure_screenshot: str | Path | None = None,
) -> Any:
    """Open ``notebook_path`` in headless JupyterLab, run all cells and return ``actions(page)``.

    The kernel starts in the notebook's folder with ``env`` added to its environment. ``page`` is a Playwright
    ``Page`` on the notebook once every code cell has run and the kernel is idle; an error output in any cell
    raises ``AssertionError`` with its message before ``actions`` is called. The notebook file is left unchanged
    (autosave off, checkpoints elsewhere). ``timeout_s`` bounds the run of the cells; each of ``actions``' waits
    times out after ``ACTION_TIMEOUT_S`` unless it says otherwise. Where anything fails after the page opened, the
    page is saved to ``failure_screenshot`` if given, to see what the reader would have seen.
    """
    from playwright.sync_api import sync_playwright

    notebook = Path(notebook_path).resolve()
    original = notebook.read_bytes()
    scratch = Path(tempfile.mkdtemp(prefix="jupyterlab-"))
    token, port = secrets.token_hex(16), _free_port()
    _write_settings(scratch / "settings")
    environment = {**os.environ, **(env or {}), "JUPYTER_CONFIG_DIR": str(scratch / "config"),
                   "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"), "IPYTHONDIR": str(scratch / "ipython")}
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebook.parent}",
        f"--FileCheckpoints.checkpoint_dir={scratch / 'checkpoints'}", f"--LabApp.user_settings_dir={scratch}/settings",
        f"--LabApp.workspaces_dir={scratch / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
        "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
    ]
    log = scratch / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=scratch)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", server, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport=viewport or VIEWPORT)
                page.set_default_timeout(ACTION_TIMEOUT_S * 1000)
                try:
                    page.goto(f"{base}/lab/tree/{quote(notebook.name)}?token={token}&reset")
                    page.wait_for_function(_NOTEBOOK_READY, timeout=START_TIMEOUT_S * 1000, polling=250)
                    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                    page.wait_for_timeout(500)
                    page.wait_for_function(_ALL_RUN, timeout=timeout_s * 1000, polling=250)
                    errors = page.evaluate(_ERRORS)
                    assert not errors, "the notebook failed in JupyterLab:\n" + "\n".join(errors)
                    return actions(page)
                except Exception:
                    if failure_screenshot is not None:
                        page.screenshot(path=str(failure_screenshot), full_page=True)
                    raise
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if notebook.read_bytes() != original:
            notebook.write_bytes(original)
        shutil.rmtree(scratch, ignore_errors=True)
