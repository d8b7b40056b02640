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
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probe.shapes import model as M
from probe.shapes.grounding import capture_cross, grounding_loss, token_objects
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
    object_weights: tuple[float, ...] = (0.35, 0.45, 0.20)  # scenes of 1, 2, 3 … objects
    distinct_shapes: bool = False  # no noun repeated within a caption
    caption_noise: float | tuple[float, ...] = 0.0  # share of multi-object captions that name one object the image
    # lacks; a tuple gives it per scene size (1, 2, 3 … objects), as web captions of busier scenes name more
    attribute_noise: float = 0.0  # share of multi-object captions that swap two objects' colour words
    grounding_weight: float = 0.0  # weight of the cross-attention grounding term (probe.shapes.grounding)
    coverage_weight: float = 0.0  # weight of its per-pixel term (maps cover their whole object)
    ground_colours: float = 1.0  # share of captions whose colour words are grounded as well as their nouns
    # (0: nouns only, as TokenCompose; between: colour words bind partly through the text encoder alone)
    absent_weight: float = 0.0  # weight of the term that puts a named-but-absent object's words off every object
    pool_size: int = 40_000  # pre-rendered scenes whose latents are cached
    vae_steps: int = 700
    vae_batch_size: int = 16
    vae_kl_weight: float = 1e-6
    checkpoint_minutes: float = 5.0
    cooldown_minutes: float = 0.0  # the run's last minutes decay the learning rate linearly to 10%
    threads: int | None = None  # torch CPU threads; 1 is fastest on a machine busy with other work


DATA_FIELDS = ("object_weights", "distinct_shapes", "caption_noise", "attribute_noise", "grounding_weight",
               "coverage_weight", "ground_colours", "absent_weight", "caption_dropout")

# The testbed recipe: the data settings the shipped model ended its training with (its card says why each part is
# there, and which pilots changed them; a resumed run keeps its checkpoint's settings).
TESTBED = TrainConfig(
    arch=M.ShapesConfig(attention_head_dim=2, text_layers=1, text_padding="left", text_mask=True,
                        prediction="v_prediction"),
    object_weights=(0.35, 0.3, 0.22, 0.13), distinct_shapes=True, caption_noise=(0.0, 0.5, 0.7, 0.7),
    attribute_noise=0.4, grounding_weight=0.1, coverage_weight=1.0, ground_colours=0.15, absent_weight=1.0,
)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Batch:
    """Rendered training scenes: images in [-1, 1], captions, and per-object truth in caption order."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor  # (n, H, W) uint8: 0 background, k = the caption's k-th object
    words: list[list[tuple[str, str]]]  # (colour, shape) per caption object
    drawn: list[list[bool | None]]  # whether the image holds each entry of ``words`` (None: not supervised)


def _images(seed: int, start: int, n: int, cfg: TrainConfig) -> Batch:
    """Render scenes ``start … start+n`` of a seeded stream. With ``cfg.caption_noise`` a share of multi-object
    scenes leave one captioned object out of the image, as web captions name what a photo lacks; with
    ``cfg.attribute_noise`` a share of captions give two objects each other's colour, as web captions misbind
    attributes (those colour words get no grounding); ``cfg.ground_colours`` is the share of captions whose colour
    words are grounded."""
    rng = np.random.default_rng([seed, 10**6 + start])
    counts = rng.choice(np.arange(1, len(cfg.object_weights) + 1), size=n, p=cfg.object_weights)
    by_size = np.broadcast_to(np.asarray(cfg.caption_noise, float), (len(cfg.object_weights),))
    noisy = rng.random(n) < by_size[counts - 1]
    dropped = rng.integers(0, 1 << 30, n)
    swapped = rng.random(n) < cfg.attribute_noise if cfg.attribute_noise else np.zeros(n, bool)
    pairs = rng.integers(0, 1 << 30, (n, 2))
    colours_grounded = rng.random(n) < float(cfg.ground_colours)
    imgs, labels, caps, words, drawn = [], [], [], [], []
    for i, k in enumerate(counts):
        scene = scene_for(seed, start + i, int(k), distinct_shapes=cfg.distinct_shapes)
        keep = [True] * len(scene)
        if noisy[i] and len(scene) > 1:
            keep[dropped[i] % len(scene)] = False
        image, lab = render([o for o, here in zip(scene, keep) if here])
        index = np.array([0] + [j + 1 for j, here in enumerate(keep) if here], np.uint8)  # drawn → caption order
        imgs.append(image)
        labels.append(index[lab])
        said = list(scene)  # what the caption says, object by object
        if swapped[i] and len(scene) > 1:
            a = pairs[i, 0] % len(scene)
            b = (a + 1 + pairs[i, 1] % (len(scene) - 1)) % len(scene)
            said[a], said[b] = replace(scene[a], colour=scene[b].colour), replace(scene[b], colour=scene[a].colour)
        caps.append(caption(said))
        grounded = [(s.colour, s.shape) if s.colour == o.colour and colours_grounded[i] else (s.shape,)
                    for s, o in zip(said, scene)]
        words.append(grounded + [(s.colour,) for s, o in zip(said, scene)  # misbound or ungrounded colours
                                 if s.colour != o.colour or not colours_grounded[i]])
        drawn.append(keep + [None] * (len(words[-1]) - len(scene)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return Batch(x, caps, torch.from_numpy(np.stack(labels)), words, drawn)


class Trainer:
    def __init__(self, out: Path, cfg: TrainConfig):
        self.out, self.cfg, self.dev = Path(out), cfg, _device()
        self.last_grounding = 0.0
        torch.manual_seed(cfg.seed)
        self.tok = M.tokenizer(padding_side=cfg.arch.text_padding)
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
            data={k: getattr(self.cfg, k) for k in DATA_FIELDS},
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
        x = _images(c.seed + 1, self.vae_step * c.vae_batch_size, c.vae_batch_size, c).images.to(self.dev)
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
        settings = {k: getattr(c, k) for k in DATA_FIELDS}
        if self.stage == "unet" and cache.exists():
            pool, made_with = torch.load(cache, weights_only=False)
            if made_with == settings:
                self.pool = pool
                return
        lat, ids, masks, labels, assign = [], [], [], [], []
        for start in tqdm(range(0, c.pool_size, 256), desc="encoding pool", leave=False):
            batch = _images(c.seed + 2, start, min(256, c.pool_size - start), c)
            lat.append(self.vae.encode(batch.images.to(self.dev)).latent_dist.mode().cpu())
            tok = self.tok(batch.captions, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt")
            ids.append(tok.input_ids)
            masks.append(tok.attention_mask.bool())
            labels.append(batch.labels)
            assign.append(token_objects(self.tok, batch.words, batch.drawn, tok.input_ids))
        latents = torch.cat(lat)
        if self.stage == "vae":
            self.scaling = float(1.0 / latents.std())
            self.vae_psnr = self.reconstruction_psnr()
            tqdm.write(f"autoencoder PSNR {self.vae_psnr:.1f} dB, latent scaling {self.scaling:.3f}")
        self.pool = (latents * self.scaling, torch.cat(ids), torch.cat(masks), torch.cat(labels), torch.cat(assign))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save((self.pool, settings), cache)

    @torch.no_grad()
    def reconstruction_psnr(self, n: int = 64) -> float:
        """PSNR (dB, images in [0, 1]) of the autoencoder on held-out scenes."""
        x = _images(self.cfg.seed + 3, 0, n, self.cfg).images
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

    def _tap_parts(self) -> SimpleNamespace:
        """What the attention tap reads of a pipeline (denoiser, scheduler, autoencoder scale): training has none."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)  # as StableDiffusionPipeline computes it
        return SimpleNamespace(unet=self.unet, scheduler=self.sched, vae_scale_factor=scale)

    def unet_step_once(self, minutes_left: float = float("inf")) -> float:
        c = self.cfg
        latents, ids, masks, labels, assign = self.pool
        idx = torch.randint(len(latents), (c.batch_size,), generator=self.gen)
        x0, tok, mask, assign = latents[idx].to(self.dev), ids[idx].clone(), masks[idx].clone(), assign[idx].clone()
        drop = torch.rand(c.batch_size, generator=self.gen) < c.caption_dropout
        if drop.any():
            empty = self.tok([""], padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt")
            tok[drop], mask[drop], assign[drop] = empty.input_ids, empty.attention_mask.bool(), 0
        noise = torch.randn(x0.shape, generator=self.gen).to(self.dev)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (c.batch_size,), generator=self.gen).to(self.dev)
        xt = self.sched.add_noise(x0, noise, t)
        emb = self.text(tok.to(self.dev), attention_mask=mask.long().to(self.dev) if c.arch.text_mask else None)
        emb = emb.last_hidden_state
        if c.grounding_weight > 0:
            with capture_cross(self._tap_parts()) as maps:
                pred = self.unet(xt, t, emb).sample
            ground = grounding_loss(maps, labels[idx].to(self.dev), assign.to(self.dev), len(c.object_weights),
                                    c.coverage_weight, c.absent_weight)
        else:
            pred, ground = self.unet(xt, t, emb).sample, torch.zeros((), device=self.dev)
        loss = F.mse_loss(pred, self.target(x0, noise, t))
        self.last_grounding = ground.item()
        loss = loss + c.grounding_weight * ground
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
                loss = self.vae_step_once() if self.vae_step < self.cfg.vae_steps else float("nan")
                if self.vae_step >= self.cfg.vae_steps:
                    self.build_pool()
                    self.stage = "unet"
                    bar.set_description("unet")
            else:
                if self.pool is None:
                    self.build_pool()
                loss = self.unet_step_once((deadline - time.time()) / 60)
                if self.step % 50 == 0:
                    self.losses.append((self.step, loss, self.last_grounding))
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


def reuse_autoencoder(trainer: Trainer, folder: str | Path) -> None:
    """Take an exported model's autoencoder (same architecture) instead of training one: the run starts at the
    UNet stage, with the latent pool encoded by that autoencoder."""
    from diffusers import AutoencoderKL

    trainer.vae.load_state_dict(AutoencoderKL.from_pretrained(Path(folder) / "vae").state_dict())
    trainer.vae_step = trainer.cfg.vae_steps


def train(out: str | Path, minutes: float, resume: bool = False, cfg: TrainConfig | None = None,
          init_from: str | Path | None = None, vae_from: str | Path | None = None,
          keep: tuple[str, ...] = ()) -> Trainer:
    """Train for ``minutes`` of wall time, checkpointing to ``out``; ``resume`` continues a checkpoint (with its
    architecture and data settings, except the data fields named in ``keep``, which ``cfg`` changes from here on),
    ``init_from`` starts from an exported model folder instead of from scratch, ``vae_from`` takes only its
    autoencoder."""
    cfg = cfg or TrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume and (Path(out) / "checkpoint.pt").exists():  # the checkpoint's architecture and data, not defaults
        made_with = checkpoint_config(out)
        if bad := set(keep) - set(DATA_FIELDS):
            raise ValueError(f"a resumed run keeps its architecture; only data fields {DATA_FIELDS} can change, "
                             f"not {sorted(bad)}")
        cfg = replace(cfg, **{k: v for k, v in made_with.items() if k not in keep})
    trainer = Trainer(Path(out), cfg)
    if resume and trainer.ckpt.exists():
        trainer.load()
    elif trainer.ckpt.exists():
        raise FileExistsError(f"{trainer.ckpt} exists: pass resume=True (--resume) to continue it")
    elif init_from is not None:
        warm_start(trainer, init_from)
    elif vae_from is not None:
        reuse_autoencoder(trainer, vae_from)
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
        "data": {k: getattr(trainer.cfg, k) for k in DATA_FIELDS},
        "loss_curve": trainer.losses,
        "scaling_factor": trainer.scaling,
    }
    (folder / "training.json").write_text(json.dumps(record, indent=1))
    return folder



def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def checkpoint_config(run: str | Path) -> dict:
    """The architecture and data settings a training folder's checkpoint was made with (TrainConfig fields)."""
    state = torch.load(Path(run) / "checkpoint.pt", map_location="cpu", weights_only=False)
    return {"arch": M.ShapesConfig(**_tuples(state["arch"])), **_tuples(state.get("data", {}))}


def export_checkpoint(run: str | Path, folder: str | Path) -> Path:
    """Export the EMA weights of a training folder's last checkpoint (training may go on meanwhile)."""
    trainer = Trainer(Path(run), TrainConfig(**checkpoint_config(run)))
    trainer.load()
    return export(trainer, folder)
