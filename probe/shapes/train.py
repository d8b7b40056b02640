"""Train the built-in shapes model: autoencoder first, then UNet + text encoder on its latents.

Resumable: ``train(out, minutes, resume=True)`` picks up ``out/checkpoint.pt`` where the last
run stopped (stage, step, optimiser, EMA, random state). ``export`` writes the EMA weights as a
standard ``StableDiffusionPipeline`` folder. CPU by default, CUDA when present.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probe.shapes import model as M
from probe.shapes.world import caption, render, scene_for


@dataclass
class TrainConfig:
    """Optimisation settings; architecture lives in :class:`ShapesConfig`."""

    arch: M.ShapesConfig = field(default_factory=M.ShapesConfig)
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    object_weights: tuple[float, float, float] = (0.35, 0.45, 0.20)  # 1, 2, 3 objects
    pool_size: int = 40_000  # pre-rendered scenes whose latents are cached
    vae_steps: int = 700
    vae_batch_size: int = 16
    vae_kl_weight: float = 1e-6
    checkpoint_minutes: float = 5.0
    cooldown_minutes: float = 0.0  # the run's last minutes decay the learning rate linearly to 10%
    threads: int | None = None  # torch CPU threads; 1 is fastest on a machine busy with other work


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _images(seed: int, start: int, n: int, weights) -> tuple[torch.Tensor, list[str]]:
    """Render scenes ``start … start+n`` of a seeded stream → (images in [-1, 1], captions)."""
    rng = np.random.default_rng([seed, 10**6 + start])
    counts = rng.choice((1, 2, 3), size=n, p=weights)
    imgs, caps = [], []
    for i, k in enumerate(counts):
        scene = scene_for(seed, start + i, int(k))
        imgs.append(render(scene)[0])
        caps.append(caption(scene))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps


class Trainer:
    def __init__(self, out: Path, cfg: TrainConfig):
        self.out, self.cfg, self.dev = Path(out), cfg, _device()
        torch.manual_seed(cfg.seed)
        self.tok = M.tokenizer()
        self.vae = M.vae(cfg.arch).to(self.dev)
        self.unet = M.unet(cfg.arch).to(self.dev)
        self.text = M.text_encoder(cfg.arch, len(self.tok)).to(self.dev)
        self.sched = M.scheduler(cfg.arch.prediction)
        self.stage, self.step, self.vae_step = "vae", 0, 0
        self.scaling = 1.0
        self.minutes = 0.0  # wall time spent training, over all runs
        self.losses: list[tuple[int, float]] = []
        params = list(self.unet.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3)
        self.ema_unet, self.ema_text = copy.deepcopy(self.unet), copy.deepcopy(self.text)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- persistence -------------------------------------------------------------------------
    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            k: getattr(self, k).state_dict()
            for k in ("vae", "unet", "text", "opt", "vae_opt", "ema_unet", "ema_text")
        }
        state.update(
            stage=self.stage, step=self.step, vae_step=self.vae_step, scaling=self.scaling, minutes=self.minutes,
            losses=self.losses, gen=self.gen.get_state(), arch=self.cfg.arch.to_dict(),
        )
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt)

    def load(self) -> None:
        state = torch.load(self.ckpt, map_location=self.dev, weights_only=False)
        for k in ("vae", "unet", "text", "opt", "vae_opt", "ema_unet", "ema_text"):
            getattr(self, k).load_state_dict(state[k])
        self.stage, self.step, self.vae_step = state["stage"], state["step"], state["vae_step"]
        self.scaling, self.losses = state["scaling"], state["losses"]
        self.minutes = state.get("minutes", 0.0)
        self.gen.set_state(state["gen"])

    # -- stage 1: autoencoder ------------------------------------------------------------------
    def vae_step_once(self) -> float:
        c = self.cfg
        x, _ = _images(c.seed + 1, self.vae_step * c.vae_batch_size, c.vae_batch_size, c.object_weights)
        x = x.to(self.dev)
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=None)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + c.vae_kl_weight * post.kl().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        self.vae_step += 1
        return loss.item()

    # -- stage 2: latents pool ------------------------------------------------------------------
    @torch.no_grad()
    def build_pool(self) -> None:
        """Encode the scene pool once; cached beside the checkpoint so a resumed run skips it."""
        c = self.cfg
        cache = self.out / "pool.pt"
        if self.stage == "unet" and cache.exists():
            self.pool = torch.load(cache, weights_only=True)
            return
        lat, ids = [], []
        for start in tqdm(range(0, c.pool_size, 256), desc="encoding pool", leave=False):
            x, caps = _images(c.seed + 2, start, min(256, c.pool_size - start), c.object_weights)
            lat.append(self.vae.encode(x.to(self.dev)).latent_dist.mode().cpu())
            ids.append(self.tok(caps, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids)
        latents = torch.cat(lat)
        if self.stage == "vae":
            self.scaling = float(1.0 / latents.std())
            self.vae_psnr = self.reconstruction_psnr()
            tqdm.write(f"autoencoder PSNR {self.vae_psnr:.1f} dB, latent scaling {self.scaling:.3f}")
        self.pool = (latents * self.scaling, torch.cat(ids))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.pool, cache)

    @torch.no_grad()
    def reconstruction_psnr(self, n: int = 64) -> float:
        """PSNR (dB, images in [0, 1]) of the autoencoder on held-out scenes."""
        x, _ = _images(self.cfg.seed + 3, 0, n, self.cfg.object_weights)
        rec = self.vae.decode(self.vae.encode(x.to(self.dev)).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec.cpu() + 1) / 2, (x + 1) / 2)
        return float(10 * torch.log10(1 / mse))

    # -- stage 3: denoiser ----------------------------------------------------------------------
    def lr_at(self, step: int, minutes_left: float = float("inf")) -> float:
        """Linear warm-up, constant, then a linear cool-down over the run's last minutes."""
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps)
        cool = 1.0 if self.cfg.cooldown_minutes <= 0 else min(1.0, max(0.1, minutes_left / self.cfg.cooldown_minutes))
        return self.cfg.lr * warm * cool

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to output: the noise, or the velocity √ᾱ·ε − √(1−ᾱ)·x₀."""
        return noise if self.cfg.arch.prediction == "epsilon" else self.sched.get_velocity(x0, noise, t)

    def unet_step_once(self, minutes_left: float = float("inf")) -> float:
        c = self.cfg
        latents, ids = self.pool
        idx = torch.randint(len(latents), (c.batch_size,), generator=self.gen)
        x0, tok = latents[idx].to(self.dev), ids[idx].clone()
        drop = torch.rand(c.batch_size, generator=self.gen) < c.caption_dropout
        if drop.any():
            tok[drop] = self.tok([""], padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=self.gen).to(self.dev)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (c.batch_size,), generator=self.gen).to(self.dev)
        xt = self.sched.add_noise(x0, noise, t)
        emb = self.text(tok.to(self.dev)).last_hidden_state
        loss = F.mse_loss(self.unet(xt, t, emb).sample, self.target(x0, noise, t))
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step, minutes_left)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        with torch.no_grad():
            for ema, live in ((self.ema_unet, self.unet), (self.ema_text, self.text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - c.ema_decay)
        self.step += 1
        return loss.item()

    def run(self, minutes: float) -> None:
        started = last_save = time.time()
        deadline = started + minutes * 60
        bar = tqdm(desc=self.stage, unit="step")
        while time.time() < deadline:
            if self.stage == "vae":
                loss = self.vae_step_once()
                if self.vae_step >= self.cfg.vae_steps:
                    self.build_pool()
                    self.stage = "unet"
                    bar.set_description("unet")
            else:
                if self.pool is None:
                    self.build_pool()
                loss = self.unet_step_once((deadline - time.time()) / 60)
                if self.step % 50 == 0:
                    self.losses.append((self.step, loss))
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", step=self.step or self.vae_step)
            if time.time() - last_save > self.cfg.checkpoint_minutes * 60:
                self.minutes += (time.time() - last_save) / 60
                self.save()
                last_save = time.time()
        bar.close()
        self.minutes += (time.time() - last_save) / 60
        self.save()

    def pipeline(self, ema: bool = True):
        """The current model as a ``StableDiffusionPipeline`` (EMA weights by default)."""
        from diffusers import StableDiffusionPipeline

        vae = copy.deepcopy(self.vae).eval()
        vae.register_to_config(scaling_factor=self.scaling)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=copy.deepcopy(self.ema_text if ema else self.text).eval(),
            tokenizer=self.tok,
            unet=copy.deepcopy(self.ema_unet if ema else self.unet).eval(),
            scheduler=self.sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def warm_start(trainer: Trainer, folder: str | Path) -> None:
    """Start from an exported model (``data/models/shapes``): its weights, scaling and step count.

    The optimiser state is not exported, so AdamW restarts (with its warm-up); everything else
    continues where the exported model stopped.
    """
    import json

    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    record = json.loads((folder / "training.json").read_text())
    for live, ema, source in ((trainer.unet, trainer.ema_unet, pipe.unet), (trainer.text, trainer.ema_text,
                                                                           pipe.text_encoder)):
        live.load_state_dict(source.state_dict())
        ema.load_state_dict(source.state_dict())
    trainer.vae.load_state_dict(pipe.vae.state_dict())
    trainer.scaling = float(pipe.vae.config.scaling_factor)
    trainer.stage, trainer.step, trainer.vae_step = "unet", record["unet_steps"], record["vae_steps"]
    trainer.minutes, trainer.losses = record.get("minutes", 0.0), [tuple(x) for x in record["loss_curve"]]


def train(out: str | Path, minutes: float, resume: bool = False, cfg: TrainConfig | None = None,
          init_from: str | Path | None = None) -> Trainer:
    """Train for ``minutes`` of wall time, checkpointing to ``out``; ``resume`` continues a checkpoint,
    ``init_from`` starts from an exported model folder instead of from scratch."""
    cfg = cfg or TrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume and (Path(out) / "checkpoint.pt").exists():  # the checkpoint's architecture, not the defaults
        cfg = replace(cfg, arch=checkpoint_arch(out))
    trainer = Trainer(Path(out), cfg)
    if resume and trainer.ckpt.exists():
        trainer.load()
    elif trainer.ckpt.exists():
        raise FileExistsError(f"{trainer.ckpt} exists: pass resume=True (--resume) to continue it")
    elif init_from is not None:
        warm_start(trainer, init_from)
    trainer.run(minutes)
    return trainer


def export(trainer: Trainer, folder: str | Path) -> Path:
    """Write the EMA model as a diffusers folder plus its training record."""
    folder = Path(folder)
    pipe = trainer.pipeline()
    pipe.save_pretrained(folder)
    record = {
        "unet_steps": trainer.step,
        "vae_steps": trainer.vae_step,
        "minutes": round(trainer.minutes, 1),
        "device": str(trainer.dev),
        "batch_size": trainer.cfg.batch_size,
        "arch": trainer.cfg.arch.to_dict(),
        "loss_curve": trainer.losses,
        "scaling_factor": trainer.scaling,
    }
    (folder / "training.json").write_text(json.dumps(record, indent=1))
    return folder



def checkpoint_arch(run: str | Path) -> M.ShapesConfig:
    """The architecture a training folder's checkpoint was made with."""
    state = torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=False)
    return M.ShapesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["arch"].items()})


def export_checkpoint(run: str | Path, folder: str | Path) -> Path:
    """Export the EMA weights of a training folder's last checkpoint (training may go on meanwhile)."""
    trainer = Trainer(Path(run), TrainConfig(arch=checkpoint_arch(run)))
    trainer.load()
    return export(trainer, folder)
