"""Load a pipeline by name, local folder or hub id; describe its attention layers.

``load("shapes")`` is the built-in model, ``load("tiny")``, ``"tiny-xl"``, ``"tiny-sd3"``, ``"tiny-flux"`` build
small random pipelines of each family offline and deterministically (for tests and benchmarks), anything else goes
to ``DiffusionPipeline.from_pretrained``. Every public function of the library takes either a model name or a pipeline
the user already holds.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from probe import checks
from probe._assets import DATA
from probe.checks import execution_device
from probe.families import FAMILIES
from probe.families.flux import tiny_flux
from probe.families.sd3 import tiny_sd3
from probe.families.tiny import project_tokenizer
from probe.families.unet import tiny_pipeline
from probe.tap.layers import Layer, attention_layers, denoiser, latent_size, select_layers

__all__ = ["BUILTIN", "MODEL_DEFAULTS_FILE", "SCHEDULERS", "TINY", "Generation", "Layer", "attention_layers",
           "denoiser", "generation", "latent_size", "load", "model_defaults", "model_folder", "project_tokenizer",
           "select_layers", "tiny_flux", "tiny_pipeline", "tiny_sd3"]

BUILTIN = {"shapes": DATA / "models" / "shapes"}


SCHEDULERS = {  # short names → diffusers classes (a class name such as "UniPCMultistepScheduler" works too)
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "dpm++-karras": "DPMSolverMultistepScheduler",
    "kdpm2": "KDPM2DiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


def load(name_or_path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         scheduler: str | None = None):
    """A diffusers pipeline from a name (``shapes``, ``tiny``, ``tiny-xl``), a folder or a hub id.

    A pipeline object passes through (moved to ``device``/``dtype`` when given). ``scheduler``: a name from
    :data:`SCHEDULERS` or a diffusers scheduler class name, built from the pipeline's scheduler config.
    """
    device = execution_device(device)
    if isinstance(name_or_path, DiffusionPipeline):
        pipe = name_or_path
    elif not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load takes a model name, a folder, a hub id or a diffusers pipeline, not "
                        f"{type(name_or_path).__name__}")
    elif isinstance(name_or_path, str) and not name_or_path.strip():
        raise ValueError(f"load got an empty model name; give a built-in name ({', '.join([*TINY, *BUILTIN])}), a "
                         "local diffusers folder or a hub id such as 'org/model'")
    elif name_or_path in TINY:
        pipe = TINY[name_or_path]()
    else:
        pipe = _from_pretrained(BUILTIN.get(name_or_path, name_or_path))
    if isinstance(name_or_path, (str, Path)):
        pipe.register_to_config(_name_or_path=str(name_or_path))
    if device is not None or dtype is not None:
        pipe = pipe.to(device=device, dtype=dtype)
    if scheduler is not None:
        pipe.scheduler = _scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(pipe, name: str):
    """The named scheduler, configured from the pipeline's own (its training noise schedule)."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise ValueError(f"unknown scheduler {name!r}; give one of {sorted(SCHEDULERS)} or a diffusers scheduler "
                         "class name (e.g. 'UniPCMultistepScheduler')")
    flow = "FlowMatch" in type(pipe.scheduler).__name__
    if flow != ("FlowMatch" in cls_name):
        kind = "flow-matching" if flow else "noise-prediction (DDPM-family)"
        raise ValueError(f"{cls_name} does not fit this model: it was trained for a {kind} scheduler like its own "
                         f"{type(pipe.scheduler).__name__}")
    extra = {"use_karras_sigmas": True} if name.lower().endswith("-karras") else {}
    return cls.from_config(pipe.scheduler.config, **extra)


def _from_pretrained(name_or_path) -> DiffusionPipeline:
    path = Path(name_or_path)
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.exists()
    if looks_local or str(name_or_path).count("/") != 1:
        if not path.expanduser().is_dir():
            known = ", ".join([*TINY, *BUILTIN])
            raise FileNotFoundError(
                f"model folder {str(name_or_path)!r} does not exist. Give a built-in name ({known}), "
                "a local diffusers folder (works offline) or a hub id such as 'org/model'."
            )
        _check_pipeline_class(path.expanduser())
        return DiffusionPipeline.from_pretrained(path.expanduser(), safety_checker=None)
    try:
        return DiffusionPipeline.from_pretrained(str(name_or_path), safety_checker=None)
    except OSError as err:
        raise OSError(
            f"could not load {name_or_path!r} from the hub ({err}). Without a network connection, "
            "download the model elsewhere and pass its local folder: a local folder works offline."
        ) from err


def _check_pipeline_class(folder: Path) -> None:
    """A diffusers folder whose ``model_index.json`` names a pipeline class the installed diffusers has (otherwise
    diffusers fails with an AttributeError about its own module)."""
    import json

    import diffusers

    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder; give the "
                                "folder save_pretrained wrote (it holds model_index.json, unet/ or transformer/ …)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{index} is not a readable pipeline description ({err}); save the pipeline again") from err
    if not isinstance(name, str) or not name.endswith("Pipeline") or not hasattr(diffusers, name):
        raise ValueError(f"{index} names the pipeline class {name!r}, which diffusers {diffusers.__version__} does not "
                         "have; upgrade diffusers if it is newer, or fix _class_name (e.g. 'StableDiffusionPipeline')")


# -- a model folder's own settings for probe --------------------------------------------------------------------------

MODEL_DEFAULTS_FILE = "probe.json"  # beside model_index.json; diffusers ignores it


def model_folder(pipe_or_name) -> Path | None:
    """The local folder a pipeline was loaded from, where its own files (such as ``probe.json``) lie.

    Read from ``pipe.config._name_or_path`` (what :func:`load` and ``from_pretrained`` record), a built-in name
    resolved to its folder; a name or path is resolved the same way. None for a hub id, a tiny pipeline or one built
    in memory: they have no folder of their own here.
    """
    if isinstance(pipe_or_name, (str, Path)):
        name = pipe_or_name
    else:
        name = getattr(getattr(pipe_or_name, "config", None), "_name_or_path", None)
        name = name or getattr(pipe_or_name, "name_or_path", None)
    if not isinstance(name, (str, Path)) or not str(name).strip() or str(name) in TINY:
        return None
    folder = Path(name).expanduser() if isinstance(name, Path) else BUILTIN.get(name, Path(name).expanduser())
    return folder if folder.is_dir() else None


def model_defaults(pipe_or_name) -> dict:
    """The model folder's settings for probe (``probe.json`` beside ``model_index.json``), ``{}`` where there is none.

    A published setting suits the model it was published for (Attend-and-Excite's step 20 trades missing subjects
    for mixed ones on the built-in model), so a folder may carry its own, with where each came from. The schema::

        {"guidance": {"ae": {"scale_factor": 1.0, "source": "how it was chosen"}, ...},
         "generation": {"steps": 4, "guidance_scale": 0.0, "source": "how they were chosen"}}

    ``guidance`` maps an objective name (or a "+"-joined sum such as ``"ae+iou"``) to the
    :class:`probe.steer.guide.Schedule` fields it overrides (JSON lists for tuples) and an optional ``source``;
    :func:`probe.steer.guide.generate` applies them when the caller gives no ``schedule``. ``generation`` (each key
    optional) gives the denoising steps and guidance scale that record, generate and edit run when the caller gives
    none (:func:`generation`). A pipeline without a folder (a hub id, ``tiny``) gives ``{}``; a file that is not
    valid JSON of that shape raises a ``ValueError`` naming it.
    """
    import json

    folder = model_folder(pipe_or_name)
    path = folder / MODEL_DEFAULTS_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it holds this model's default settings for probe: fix "
                         "it, or remove it to use the library's defaults") from err
    guidance = found.get("guidance", {}) if isinstance(found, dict) else None
    if not isinstance(guidance, dict) or not all(isinstance(entry, dict) for entry in guidance.values()):
        raise ValueError(f"{path} must hold a JSON object whose 'guidance' maps objective names to objects of "
                         "Schedule fields, e.g. {\"guidance\": {\"ae\": {\"scale_factor\": 1.0, \"source\": \"...\"}}}")
    _check_generation_entry(found.get("generation", {}), path)
    return found


def _check_generation_entry(entry, path: Path) -> None:
    """A ``probe.json`` ``generation`` entry: whole steps of at least 1, a finite guidance scale of at least 0."""
    example = '{"generation": {"steps": 4, "guidance_scale": 0.0, "source": "..."}}'
    if not isinstance(entry, dict) or set(entry) - {"steps", "guidance_scale", "source"}:
        raise ValueError(f"{path}: 'generation' must be an object with some of 'steps', 'guidance_scale' and "
                         f"'source', e.g. {example}; got {entry!r}")
    steps, scale = entry.get("steps"), entry.get("guidance_scale")
    whole = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0
    if steps is not None and not whole or scale is not None and not number:
        raise ValueError(f"{path}: 'generation' needs steps a whole number of at least 1 and guidance_scale a "
                         f"finite number of at least 0, e.g. {example}; got {entry!r}")


# -- the steps and guidance a generation runs where the caller gives none --------------------------------------------

GUIDANCE_KEYWORDS = ("guidance_scale", "true_cfg_scale", "cfg_scale")  # a pipeline's guidance scale, first found
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """The denoising steps and guidance scale a generation runs, and the pipeline keyword that takes the scale."""

    steps: int
    guidance_scale: float
    guidance_keyword: str = "guidance_scale"

    def pipeline_kwargs(self) -> dict:
        """The pipeline call's keywords for these."""
        return {"num_inference_steps": self.steps, self.guidance_keyword: self.guidance_scale}


def generation(pipe, steps=None, guidance_scale=None, *, caller: str) -> Generation:
    """The caller's ``steps`` and ``guidance_scale``, checked, with each one left None taken from the model, so that
    ``record(pipe, prompt, seeds=[s])`` makes the image ``pipe(prompt, generator=…)`` makes.

    From the model folder's ``probe.json`` ``generation`` entry where it has one (:func:`model_defaults`; a
    ``UserWarning`` names the file, as for its guidance entries), else from the defaults of the pipeline's own
    ``__call__`` (SD1.x 50 steps at 7.5, SDXL 50 at 5.0, SD3 28 at 7.0, FLUX.1 28 at 3.5), said in an info log line of
    ``probe.models``. The scale is the first of :data:`GUIDANCE_KEYWORDS` whose default is a number (Qwen-Image's
    guidance is ``true_cfg_scale``). FLUX.1-schnell was distilled for 4 steps without guidance, but its folder says so
    nowhere diffusers reads (``FluxPipeline`` runs 28 at 3.5 for it too): pass ``steps=4, guidance_scale=0.0``, or
    write ``{"generation": {"steps": 4, "guidance_scale": 0.0}}`` into its folder's ``probe.json``.
    """
    steps = None if steps is None else checks.step_count(steps)
    guidance_scale = None if guidance_scale is None else checks.cfg_scale(guidance_scale)
    own_steps, own_scale, keyword = _call_defaults(pipe)
    if steps is not None and guidance_scale is not None:
        return Generation(steps, guidance_scale, keyword)
    entry = model_defaults(pipe).get("generation", {})
    chosen = {"steps": steps, "guidance_scale": guidance_scale}
    from_folder = {name: entry[name] for name, value in chosen.items() if value is None and name in entry}
    from_call = {name: own for (name, value), own in zip(chosen.items(), (own_steps, own_scale))
                 if value is None and name not in from_folder}
    missing = [name for name, value in from_call.items() if value is None]
    if missing:
        raise ValueError(f"{caller}: {type(pipe).__name__}.__call__ has no default for {' or '.join(missing)}; pass "
                         f"{', '.join(f'{name}=' for name in missing)}")
    if from_folder:
        source = f" ({entry['source']})" if entry.get("source") else ""
        warnings.warn(f"{caller}: {_settings_text(from_folder)} from {model_folder(pipe) / MODEL_DEFAULTS_FILE}"
                      f"{source}; pass {', '.join(f'{name}=' for name in from_folder)} to override", UserWarning,
                      stacklevel=3)
    if from_call:
        _log.info("%s: %s from %s.__call__'s defaults; pass %s to choose", caller, _settings_text(from_call),
                  type(pipe).__name__, ", ".join(f"{name}=" for name in from_call))
    chosen = {**chosen, **from_folder, **from_call}
    return Generation(int(chosen["steps"]), float(chosen["guidance_scale"]), keyword)


def _call_defaults(pipe) -> tuple[int | None, float | None, str]:
    """The default step count and guidance scale of the pipeline's ``__call__``, and the keyword of the scale."""
    parameters = inspect.signature(pipe.__call__).parameters

    def default(name: str):
        value = parameters[name].default if name in parameters else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value if number else None

    keywords = [name for name in GUIDANCE_KEYWORDS if name in parameters] or ["guidance_scale"]
    keyword = next((name for name in keywords if default(name) is not None), keywords[0])
    return default("num_inference_steps"), default(keyword), keyword


def _settings_text(values: dict) -> str:
    return " and ".join(f"{value} steps" if name == "steps" else f"{name} {value:g}" for name, value in values.items())


TINY = {name: build for family in FAMILIES for name, build in family.tiny().items()}  # small random pipelines
