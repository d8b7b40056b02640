"""Input checks shared by record, guide, edit and sweeps: each says what was wrong and what to do instead.

The catalogue of bad inputs in the README lists what each check catches; every row has a test in
``tests/test_bad_inputs.py`` or ``tests/test_bad_inputs_generation.py``.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import math
import operator
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from probe.tap.layers import KINDS

MAX_SEED = 2**63 - 1  # recordings store seeds as int64; torch maps negative seeds onto unsigned ones


def _whole(value) -> int | None:
    """``value`` as an int if it is one (Python, numpy or 0-d integer tensor), else None: floats are never rounded,
    since ``int(0.7) == 0`` would quietly change the request."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def whole_number(value, name: str, what: str, minimum: int = 1) -> int:
    """A whole number of at least ``minimum`` (batch sizes, sequence lengths …): ``what`` says what it counts."""
    n = _whole(value)
    if n is None:
        raise TypeError(f"{name}={value!r}: {name} is {what}, a whole number (int) of at least {minimum}")
    if n < minimum:
        raise ValueError(f"{name}={value!r}: {name} is {what} and must be at least {minimum}")
    return n


def step_count(steps, name: str = "steps") -> int:
    """A positive whole number of denoising steps."""
    n = _whole(steps)
    if n is None:
        raise TypeError(f"{name} must be a whole number of denoising steps, got {steps!r}")
    if n < 1:
        raise ValueError(f"{name} must be at least 1 (the number of denoising steps), got {steps}")
    return n


def step_indices(indices, steps: int, name: str, allow_empty: bool = False) -> list[int]:
    """Sorted distinct step indices in 0 … steps − 1 (``keep_steps``, ``inject_steps``): a float such as 0.7 is not
    an index (it would be truncated to step 0)."""
    items = indices.tolist() if isinstance(indices, (np.ndarray, torch.Tensor)) else indices
    items = list(items) if isinstance(items, (list, tuple, range, set, frozenset)) else [items]
    whole = [_whole(i) for i in items]
    bad = [i for i, w in zip(items, whole) if w is None]
    if bad:
        raise TypeError(f"{name} takes whole step indices (ints) in 0 … {steps - 1}, got {bad[0]!r}: give e.g. "
                        f"[0, {steps - 1}]")
    kept = sorted(set(whole))
    outside = [i for i in kept if not 0 <= i < steps]
    if (not kept and not allow_empty) or outside:
        raise ValueError(f"{name} must lie in 0 … {steps - 1} (step indices), got {indices!r}"
                         + (f": {outside} lie outside 0 … {steps - 1}" if outside else ""))
    return kept


def finite_number(value, name: str, what: str) -> float:
    """A real, finite number (NaN compares false with everything, so a NaN setting silently switches code off)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex):
            raise TypeError(f"{name}={value!r}: {name} is {what}, a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={number}: {name} is {what} and must be a finite number")
    return number


def cfg_scale(value, name: str = "guidance_scale") -> float:
    """Classifier-free guidance's scale: finite and at least 0. NaN and negative scales compare false with diffusers'
    ``> 1`` test and turn guidance off unnoticed; infinity makes every image black. 0 … 1 do turn it off, as in
    diffusers, and are allowed."""
    scale = finite_number(value, name, "the classifier-free guidance scale (7.5 is usual; 0 … 1 turn guidance off)")
    if scale < 0:
        raise ValueError(f"{name}={scale:g} is negative: give a scale of at least 0 (7.5 is usual; values of 0 … 1 "
                         "turn classifier-free guidance off)")
    return scale


def seed_value(value, name: str = "seed") -> int:
    """A seed: a whole number in 0 … 2**63 − 1 (numpy ints too). A float such as 1.5 would be truncated and NaN or
    None would fail deep inside torch."""
    n = _whole(value)
    if n is None:
        raise TypeError(f"{name}={value!r}: a seed is a whole number (int) in 0 … 2**63-1, e.g. {name}=0")
    if not 0 <= n <= MAX_SEED:
        raise ValueError(f"{name}={n}: a seed is a whole number in 0 … 2**63-1 (recordings store seeds as int64); "
                         "pick one in that range")
    return n


def seed_list(seeds) -> list[int]:
    """One or more distinct seeds: each (prompt, seed) sample is generated once."""
    values = [seed_value(s, "seeds") for s in as_list(seeds)]
    distinct(values, "seeds")
    return values


def distinct(values: Sequence, name: str) -> None:
    """No repeats: a repeated prompt or seed would generate (and store) the same sample twice under two indices."""
    seen: set = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{name} lists {value!r} more than once: each (prompt, seed) sample is generated once; "
                             "drop the repeat")
        seen.add(value)


def as_list(x) -> list:
    """One item or a sequence of them as a list (a string is one item)."""
    if isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim > 0:
        return x.tolist()
    return list(x) if isinstance(x, (list, tuple, range)) else [x]


def prompt_text(prompt, name: str = "prompt") -> str:
    """A prompt is text: a number or None would be tokenised as something else or fail inside the tokenizer."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a string (the text to generate), got {type(prompt).__name__} {prompt!r}; "
                        f"e.g. {name}='a cat and a dog'")
    return prompt


def prompt_fits(pipe, prompt: str) -> str:
    """A prompt the text encoder takes whole: a longer one would be cut silently and its last words not drawn. The
    family's own text keys are laid out too, so a prompt that fits alone but not inside the pipeline's template (a
    chat LLM's system message) is refused as well."""
    from probe.prompts import text_layout

    tok = pipe.tokenizer
    ids = tok(prompt, truncation=False).input_ids
    if len(ids) > tok.model_max_length:
        raise ValueError(
            f"prompt {prompt!r} has {len(ids)} tokens; the text encoder takes at most {tok.model_max_length} "
            "(start and end tokens included). Shorten the prompt."
        )
    text_layout(pipe, prompt)  # the family's view of its keys refuses a prompt its template would cut
    return prompt


def subject_words(subjects) -> list[str]:
    """Subject words (strings); one string is one subject (not its letters)."""
    words = [subjects] if isinstance(subjects, str) else as_list(subjects)
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(f"subjects are words of the prompt (strings) such as ['cat', 'dog'], got {bad[0]!r} in "
                        f"{subjects!r}")
    return words


def image_side(value, name: str) -> int | None:
    """A height or width in pixels: None (the model's own) or a whole number (32.0 is a float: give 32)."""
    if value is None:
        return None
    n = _whole(value)
    if n is None:
        hint = f"; use {name}={int(value)}" if isinstance(value, float) and value.is_integer() else ""
        raise TypeError(f"{name}={value!r}: give a whole number of pixels (an int){hint}")
    if n < 1:
        raise ValueError(f"{name}={n} px: give a positive number of pixels, or leave it out for the model's own size")
    return n


def sequence_length(value) -> int | None:
    """SD3 / FLUX ``max_sequence_length``: None (the pipeline's default) or at least 1 (0 would quietly mean the
    default, since ``0 or default`` is the default)."""
    if value is None:
        return None
    return whole_number(value, "max_sequence_length", "the number of T5 tokens the prompt is padded or cut to "
                        "(SD3: 256 by default, at most 512)")


def attention_kinds(kinds) -> tuple[str, ...]:
    """Attention kinds as a tuple; one string is one kind (``"cross"``, not its letters)."""
    items = (kinds,) if isinstance(kinds, str) else tuple(as_list(kinds))
    bad = [k for k in items if k not in KINDS]
    if bad or not items:
        raise ValueError(f"unknown attention kinds {bad or items!r}; give one or more of {KINDS}, e.g. "
                         "kinds=('cross', 'self') or kinds='cross'")
    return items


def layer_patterns(layers):
    """Layer patterns whose regular expressions (``re:…``) compile; the error names the pattern."""
    if layers is None:
        return None
    for pattern in as_list(layers):
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"layer pattern {pattern!r} is not a valid regular expression ({err}); fix it, or "
                                 "give a glob (up_blocks.*) or a full module name without 're:'") from err
    return layers


def byte_limit(max_bytes) -> float | None:
    """``max_bytes``: None (no limit) or a number of bytes ≥ 0 (infinity is no limit); NaN compares false with every
    size, so it would limit nothing."""
    if max_bytes is None:
        return None
    if isinstance(max_bytes, (bool, np.bool_)) or not isinstance(max_bytes, (int, float, np.integer, np.floating)):
        raise TypeError(f"max_bytes={max_bytes!r}: give the largest estimated size to record, in bytes (a number such "
                        "as 2e9), or None for no limit")
    limit = float(max_bytes)
    if math.isnan(limit) or limit < 0:
        raise ValueError(f"max_bytes={max_bytes!r}: give the largest estimated size to record as a number of bytes "
                         "≥ 0 (e.g. max_bytes=2e9), or None for no limit")
    return limit


def execution_device(device) -> torch.device | None:
    """A device that can run the model: a known device string and not ``meta`` (shapes without data)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device torch knows ({err}); use 'cpu', 'cuda', 'cuda:1' or "
                         "'mps'") from err
    if parsed.type == "meta":
        raise ValueError("device='meta' holds tensor shapes without data, so nothing can be generated on it; use "
                         "'cpu', 'cuda' or 'mps'")
    return parsed


def keyword_names(function: Callable) -> list[str]:
    """The keyword-only parameters of ``function``: the names a caller's typo is matched against."""
    return [n for n, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY]


def pipeline_keywords(pipe, kwargs: Mapping, caller: str, sets: Mapping[str, str] | None = None,
                      own: Callable | Iterable[str] = ()) -> None:
    """Keywords for the pipeline call are ones its ``__call__`` takes by name: diffusers pipelines accept ``**kwargs``
    and drop unknown ones, so a typo would change nothing unnoticed. ``sets``: keyword → why the caller sets it
    itself; ``own``: the caller (or its parameter names), whose names are offered as close matches too."""
    if "num_inference_steps" in kwargs:
        raise TypeError(f"{caller} takes the number of denoising steps as steps=, not num_inference_steps=: use "
                        f"steps={kwargs['num_inference_steps']!r}")
    sets = dict(sets or {})
    for key in kwargs:
        if key in sets:
            raise ValueError(f"{caller} sets {key}= itself ({sets[key]}); leave it out")
    own = keyword_names(own) if callable(own) else list(own)
    params = inspect.signature(pipe.__call__).parameters
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [k for k in kwargs if k not in named]
    if unknown:
        key = unknown[0]
        taken = [n for n in named if n not in sets and n not in own and n != "num_inference_steps"]
        close = difflib.get_close_matches(key, list(dict.fromkeys([*own, *taken])), n=3)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else f"see help({caller}) for its own, and the pipeline takes {', '.join(taken)}")
        raise TypeError(f"{caller} got an unknown keyword {key!r} (neither its own nor one "
                        f"{type(pipe).__name__} takes): {hint}")


def rgb_pixels(image) -> np.ndarray:
    """H×W×3 float32 in 0–1 from a PIL image, a path to an image file, or an H×W×3 array or tensor (uint8, or float
    in 0–1). Floats in 0–255 would be read as 0–1 (a white image) and NaN would spread through the latent, so both
    are refused; a channels-first (3, H, W) array is refused rather than guessed."""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {str(image)!r}; give the path of an image file, a PIL image or "
                                    "an H×W×3 array")
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.convert("RGB")
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (3, 4):
        raise ValueError(f"the image has shape {array.shape}, channels first: give H×W×3 (channels last), e.g. "
                         "tensor.permute(1, 2, 0) or array.transpose(1, 2, 0)")
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an H×W×3 image (PIL, numpy or a path), got shape {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"the image holds {int((~np.isfinite(array)).sum())} NaN or infinite values; give a finite "
                         "image (uint8, or floats in [0, 1])")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ValueError(f"the image's float values lie in [{low:g}, {high:g}] but float images must lie in [0, 1]: "
                         "divide by 255 (or pass uint8)")
    return array


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
    optional = _reference_inputs(pipe)
    needs = [name for name in ("image", "mask_image", "control_image")
             if name in inspect.signature(pipe.__call__).parameters and name not in optional]
    if needs:
        raise TypeError(f"{type(pipe).__name__} takes {', '.join(needs)}: probe records, guides and edits "
                        "text-to-image generation. Build the text-to-image pipeline from the same weights, e.g. "
                        "StableDiffusionPipeline(**pipe.components) (AutoPipelineForText2Image.from_pipe(pipe))")


def _reference_inputs(pipe) -> tuple[str, ...]:
    """Image inputs the pipeline's family calls optional references of a text-to-image pipeline (FLUX.2's ``image``)."""
    from probe.families import family

    try:
        return family(pipe).reference_inputs
    except TypeError:  # a denoiser no family knows: the tap refuses it with its own message
        return ()


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
