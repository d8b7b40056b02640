"""Load a pipeline by name, local folder or hub id; describe its attention layers.

``load("shapes")`` is the built-in model, ``load("tiny")`` / ``load("tiny-xl")`` build small
random Stable Diffusion / SDXL pipelines offline and deterministically (for tests and
benchmarks), anything else goes to ``DiffusionPipeline.from_pretrained``. Every public function
of the library takes either a model name or a pipeline the user already holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from probe._assets import DATA, tokenizer_files
from probe.checks import execution_device
from probe.tap.layers import Layer, attention_layers, denoiser, latent_size, select_layers

__all__ = ["BUILTIN", "SCHEDULERS", "TINY", "Layer", "attention_layers", "denoiser", "latent_size", "load",
           "select_layers", "tiny_flux", "tiny_pipeline", "tiny_sd3"]

BUILTIN = {"shapes": DATA / "models" / "shapes"}
TINY_SEED = 0


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


# -- tiny random pipelines ------------------------------------------------------------------------


def project_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The project's CLIP BPE: every word of the bundled prompt lists is one token."""
    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=max_length)


def _tiny_text(vocab: int, width: int, projection: bool = False):
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )


def _tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def tiny_pipeline(xl: bool = False) -> DiffusionPipeline:
    """A small random SD (or SDXL) pipeline, the same weights on every call and machine."""
    tok = project_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if not xl:
            unet = UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=16,
            )
            return StableDiffusionPipeline(
                vae=_tiny_vae(), text_encoder=_tiny_text(len(tok), 32), tokenizer=tok, unet=unet,
                scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=16,
        )
        return StableDiffusionXLPipeline(
            vae=_tiny_vae(), text_encoder=_tiny_text(len(tok), 32), tokenizer=tok,
            text_encoder_2=_tiny_text(len(tok), 32, projection=True), tokenizer_2=project_tokenizer(),
            unet=unet, scheduler=_tiny_scheduler(),
        )




def _tiny_t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=vocab - 1, eos_token_id=vocab - 1)).eval()


def _flow_vae() -> AutoencoderKL:
    vae = _tiny_vae()
    vae.register_to_config(shift_factor=0.0)
    return vae


def tiny_sd3() -> DiffusionPipeline:
    """A small random SD3.5-style pipeline (joint attention, a dual-attention block, RMS q/k norms, CLIP ×2 + T5
    text), 32 px, the same weights on every call. The project's CLIP tokenizer stands in for T5's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = project_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(),
            text_encoder=_tiny_text(len(tok), 16, projection=True), tokenizer=tok,
            text_encoder_2=_tiny_text(len(tok), 16, projection=True), tokenizer_2=project_tokenizer(),
            text_encoder_3=_tiny_t5(len(tok), 32), tokenizer_3=project_tokenizer(),
        )
    return pipe


def tiny_flux() -> DiffusionPipeline:
    """A small random FLUX.1-style pipeline (double- and single-stream blocks, RoPE, QK RMS norms, CLIP + T5 text),
    32 px, the same weights on every call. The project's CLIP tokenizer stands in for T5's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = project_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        )
        pipe = FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(),
            text_encoder=_tiny_text(len(tok), 32), tokenizer=tok,
            text_encoder_2=_tiny_t5(len(tok), 32), tokenizer_2=project_tokenizer(),
        )
    pipe.default_sample_size = 16
    return pipe


TINY = {"tiny": tiny_pipeline, "tiny-xl": lambda: tiny_pipeline(xl=True), "tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux}
