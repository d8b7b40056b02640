"""Paths of the files shipped inside the package."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"


def tokenizer_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the project's CLIP BPE (see scripts/make_tokenizer.py)."""
    folder = ASSETS / "tokenizer"
    return folder / "vocab.json", folder / "merges.txt"
