"""A non-editable install (a wheel into a fresh virtual environment), used from outside the repository, finds the
built-in model and the prompt sets and runs the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installs_outside_the_repository_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(ROOT)], cwd=tmp_path)
    (wheel,) = wheels.glob("probe-*.whl")
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    # the test environment's dependencies, not its packages' .pth hooks (so this checkout's editable probe is unseen)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
         cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    check = ("import probe, pathlib; from probe.prompts import prompt_set; "
             f"assert pathlib.Path(probe.__file__).is_relative_to(pathlib.Path(r'{site}')), probe.__file__; "
             "pipe = probe.load('shapes'); print(type(pipe).__name__, len(prompt_set('SSD-2')))")
    out = _run([str(python), "-c", check], cwd=work, env=env)
    assert out.split() == ["StableDiffusionPipeline", str(len(_ssd2()))]
    out = _run([str(env_dir / "bin" / "probe"), "demo", "--steps", "3", "--out", str(work / "demo")], cwd=work, env=env)
    assert "wrote" in out and (work / "demo" / "demo_circle.png").exists()


def _ssd2() -> list[str]:
    from probe.prompts import prompt_set

    return list(prompt_set("SSD-2")["prompt"])
