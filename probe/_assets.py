"""Paths of the files shipped inside the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
# The repository's data/ folder, installed as the package probe.data (pyproject's package-dir): the built-in model
# and the prompt sets, found the same way from a checkout, an editable install or a wheel.
DATA = Path(str(files("probe.data")))


def tokenizer_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the project's CLIP BPE (see scripts/make_tokenizer.py)."""
    folder = ASSETS / "tokenizer"
    return folder / "vocab.json", folder / "merges.txt"
