"""Architecture of the built-in shapes model: standard diffusers / transformers classes only.

The model is a plain ``StableDiffusionPipeline``: a small KL autoencoder (64 px ↔ 16×16×4), a
UNet2DConditionModel with cross-attention at 16×16, 8×8 and 4×4, and a CLIP text model. The
defaults are the first built-in model's (no text layers, right padding, 8 heads); the testbed recipe
(``probe.shapes.train.TESTBED``) gives the text encoder one causal layer, so a noun sees its colour,
pads on the left with the attention mask, so no padding token reads (and carries) the caption, and
uses 2 wider heads (see the model cards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from probe._assets import tokenizer_files

MAX_TOKENS = 32


@dataclass
class ShapesConfig:
    """Every architectural choice of the shapes model (saved with its training state)."""

    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 0
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    image_size: int = 64
    prediction: str = "epsilon"  # what the UNet predicts: "epsilon" (noise) or "v_prediction" (velocity)
    text_padding: str = "right"  # "left": padding before the start token, so no pad follows (and reads) the caption
    text_mask: bool = False  # the text encoder masks padding (the pipeline passes the mask: use_attention_mask)

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer(max_length: int = MAX_TOKENS, padding_side: str = "right") -> CLIPTokenizer:
    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=max_length,
                         padding_side=padding_side)


def text_encoder(cfg: ShapesConfig, vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            use_attention_mask=cfg.text_mask,
        )
    )


def vae(cfg: ShapesConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )


def unet(cfg: ShapesConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=32,
    )


PREDICTIONS = ("epsilon", "v_prediction")


def scheduler(prediction: str = "epsilon") -> DDIMScheduler:
    """Cosine betas. ε-prediction samples with leading spacing: trailing spacing would start at ᾱ ≈ 2e-9, where an
    ε-prediction model cannot recover x₀. A v-prediction model can, and its loss weighs the high-noise steps that
    decide the layout far more (x₀ error × (SNR + 1) instead of × SNR), so it starts there (trailing spacing)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading" if prediction == "epsilon" else "trailing",
    )
