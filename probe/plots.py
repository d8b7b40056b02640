"""Figures. Functions here draw; they compute nothing that ``probe.maps`` / ``probe.overlap`` do not."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from probe.maps import resize, word_map  # noqa: E402

CMAP = "inferno"
OVERLAY_ALPHA = 0.6


def _upsampled(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize(torch.from_numpy(np.asarray(values, np.float32)), size).numpy()


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    ax.imshow(image)
    ax.imshow(_upsampled(heat, image.shape[:2]), cmap=CMAP, alpha=OVERLAY_ALPHA)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def cross_groups(tree) -> list[str]:
    """Cross-attention group paths of a recording, finest grid first."""
    if "cross" not in tree.children:
        raise ValueError("this recording has no cross-attention (it was recorded with kinds without 'cross')")
    names = sorted(tree["cross"].children, key=lambda n: -int(n.removeprefix("res").split("x")[0]))
    return [f"cross/{n}" for n in names]


def _at_step(maps, step: int):
    """``step`` is a step index; a negative one counts back from the last recorded step."""
    return maps.isel(step=step) if step < 0 else maps.sel(step=step)


def token_overlay(tree, word: str, step: int = -1, sample: int = 0):
    """One panel per resolution: the generated image under ``word``'s map (layer mean) at ``step``."""
    groups = cross_groups(tree)
    image = np.asarray(tree["images"]["image"].isel(sample=sample).values)
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(2.6 * (len(groups) + 1), 2.9), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(str(tree["images"]["prompt"].values[sample]), fontsize=9)
    axes[0, 0].axis("off")
    for ax, group in zip(axes[0, 1:], groups):
        maps = _at_step(word_map(tree[group], sample, word), step).mean("layer")
        if "head" in maps.dims:
            maps = maps.mean("head")
        _overlay(ax, image, maps.values, f"{word!r} · {group.split('/')[1]} · step {int(maps.step)}")
    fig.tight_layout()
    return fig


def token_maps_over_steps(tree, words: list[str], group: str, sample: int = 0, max_steps: int = 8):
    """Grid words × steps of layer-mean maps: how each word's attention settles during denoising."""
    steps = np.asarray(tree[group]["step"].values)
    steps = steps[np.linspace(0, len(steps) - 1, min(max_steps, len(steps))).round().astype(int)]
    fig, axes = plt.subplots(len(words), len(steps), figsize=(1.6 * len(steps), 1.7 * len(words)), squeeze=False)
    for row, word in enumerate(words):
        maps = word_map(tree[group], sample, word).mean("layer")
        if "head" in maps.dims:
            maps = maps.mean("head")
        for col, step in enumerate(steps):
            ax = axes[row, col]
            ax.imshow(maps.sel(step=step).values, cmap=CMAP)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"step {step}", fontsize=8)
            if col == 0:
                ax.set_ylabel(word, fontsize=9)
    fig.suptitle(f"{group} · {tree[group]['prompt'].values[sample]}", fontsize=10)
    fig.tight_layout()
    return fig
