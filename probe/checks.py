"""Input checks shared by record, guide, edit and sweeps: each says what was wrong and what to do instead.

The catalogue of bad inputs in the README lists what each check catches; every row has a test in
``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import errno
import inspect
import shutil
from pathlib import Path

import torch


def step_count(steps, name: str = "steps") -> int:
    """A positive whole number of denoising steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) and not (hasattr(steps, "__index__")):
        raise TypeError(f"{name} must be a whole number of denoising steps, got {steps!r}")
    if int(steps) < 1:
        raise ValueError(f"{name} must be at least 1 (the number of denoising steps), got {steps}")
    return int(steps)


def head_choice(heads) -> str | list[int]:
    """``"mean"``, ``"all"`` or a list of head indices."""
    if isinstance(heads, str):
        if heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean', 'all' or a list of head indices such as [0, 3], got {heads!r}")
        return heads
    items = list(heads) if isinstance(heads, (list, tuple, range)) else [heads]
    if not items or not all(isinstance(h, int) and not isinstance(h, bool) for h in items):
        raise ValueError(f"heads must be 'mean', 'all' or a list of head indices such as [0, 3], got {heads!r}")
    return items


def finite_noise(noise: torch.Tensor, what: str = "initial noise") -> torch.Tensor:
    """Noise with no NaN or infinity (one would make every image of the run NaN)."""
    if not torch.isfinite(noise).all():
        bad = int((~torch.isfinite(noise)).sum())
        raise ValueError(f"the {what} holds {bad} NaN or infinite values of {noise.numel()}; "
                         "pass finite noise (e.g. torch.randn) or leave it out to use the seed's noise")
    return noise


def text_to_image(pipe) -> None:
    """A text-to-image pipeline: image-to-image, inpainting and control pipelines need inputs probe does not give."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"expected a diffusers text-to-image pipeline (or a model name or folder), got "
                        f"{type(pipe).__name__}; load one with probe.load(name_or_folder)")
    needs = [name for name in ("image", "mask_image", "control_image")
             if name in inspect.signature(pipe.__call__).parameters]
    if needs:
        raise TypeError(f"{type(pipe).__name__} takes {', '.join(needs)}: probe records, guides and edits "
                        "text-to-image generation. Build the text-to-image pipeline from the same weights, e.g. "
                        "StableDiffusionPipeline(**pipe.components) (AutoPipelineForText2Image.from_pipe(pipe))")


def room_for(path: str | Path, nbytes: int) -> None:
    """Enough free disk beside ``path`` for ``nbytes`` (checked before any generation runs)."""
    folder = Path(path).resolve().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"writing {Path(path).name} needs an estimated {nbytes / 1e6:.1f} MB but "
                      f"{folder} has {free / 1e6:.1f} MB free; free space, write elsewhere (out=…) or record less "
                      "(kinds=('cross',), keep_steps=…, heads='mean')")


def disk_full(err: OSError, path: str | Path) -> OSError:
    """The error to raise when a write ran out of space part-way (the partial output was removed)."""
    return OSError(errno.ENOSPC, f"the disk filled while writing {path}; nothing was kept. Free space or write "
                   f"elsewhere (out=…), then run again ({err})")
