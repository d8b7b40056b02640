"""Where words attend versus where their objects are, on rendered scenes with exact masks.

Two uses of one measurement. Training adds a grounding term (as TokenCompose does for Stable
Diffusion with segmentation masks): each colour word and noun of an object that the image holds
should put its cross-attention on that object. Evaluation reads the same quantity teacher-forced:
render held-out scenes, noise them, run the UNet once, and ask whether each word's attention mass
falls on its own object rather than the other one. No sampler is involved, so pilots can be read
after a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from probe.tap import Call, Consumer, Tap

GRIDS = (16, 8)  # attention grids (side) at which grounding is trained and read
UNSUPERVISED, ABSENT = -1, -2  # token_objects' codes beside k+1 (object k) and 0 (no object word)


class CrossMaps(Consumer):
    """Tap consumer that keeps each cross-attention call's head-mean probabilities (batch, queries, tokens).

    They are the probabilities the UNet's own processor computes, in the autograd graph where the pass has one, so
    the grounding loss trains through them exactly as the denoising loss trains through the outputs.
    """

    mean_heads = True  # only the head mean is read: a pass without gradients may hand (batch, 1, queries, tokens)

    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def wants(self, call: Call) -> bool:
        return call.layer.kind == "cross"

    def on_probs(self, call: Call, probs: torch.Tensor) -> None:
        self.maps.append(probs.mean(1))


@contextmanager
def capture_cross(pipe) -> Iterator[list[torch.Tensor]]:
    """``with capture_cross(pipe) as maps: pipe.unet(...)`` → ``maps`` holds every cross-attention call's map.

    ``pipe``: a pipeline, or whatever holds the parts the tap reads of one (``unet``, ``scheduler``,
    ``vae_scale_factor``: the trainer has no pipeline). The UNet calls inside are a pass the caller runs (``user``).
    """
    consumer = CrossMaps()
    with Tap(pipe, [consumer]) as tap, tap.pass_("user", -1):
        yield consumer.maps


def grid_masks(labels: torch.Tensor, objects: int, side: int) -> torch.Tensor:
    """(batch, side², objects) masks from label maps (batch, H, W; 0 = background, k = object k−1):
    a cell belongs to an object when at least half of it does."""
    onehot = F.one_hot(labels.long(), objects + 1)[..., 1:].permute(0, 3, 1, 2).float()
    share = F.adaptive_avg_pool2d(onehot, side)
    return (share >= 0.5).float().flatten(2).transpose(1, 2)


def token_objects(tokenizer, words: list[list[tuple[str, ...]]], drawn: list[list[bool | None]],
                  ids: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) int8: k+1 where a token is one of ``words[b][k]`` (object k's colour word, noun…) and
    the image holds object k (``drawn`` True), :data:`ABSENT` where the caption names an object the image lacks
    (False), :data:`UNSUPERVISED` for words whose grounding is unknown (None), else 0. Later entries win.

    Positions come from the tokenizer's own ids (left padding moves them with the caption's length).
    """
    vocab = tokenizer.get_vocab()
    out = torch.zeros(ids.shape, dtype=torch.int8)
    for b, (objects, present) in enumerate(zip(words, drawn)):
        row = ids[b].tolist()
        for k, (object_words, here) in enumerate(zip(objects, present)):
            for word in object_words:
                token = vocab.get(f"{word}</w>")
                if token is None:
                    raise ValueError(f"{word!r} is not one token of the shapes tokenizer")
                for j, t in enumerate(row):
                    if t == token:
                        out[b, j] = k + 1 if here else ABSENT if here is False else UNSUPERVISED
    return out


def own_mass(maps: torch.Tensor, masks: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Share of each token's attention (over pixels) that lies on its object: (batch, tokens).

    ``maps`` (batch, queries, tokens); ``masks`` (batch, queries, objects); ``assign`` (batch, tokens)
    with k+1 for object k (other values give 0)."""
    objects = masks.shape[-1]
    onehot = F.one_hot(assign.long().clamp(0, objects), objects + 1)[..., 1:].float()
    spread = maps / maps.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("bqt,bqk,btk->bt", spread, masks, onehot)


def grounding_loss(maps: list[torch.Tensor], labels: torch.Tensor, assign: torch.Tensor, objects: int,
                   coverage: float = 0.0, absent: float = 0.0) -> torch.Tensor:
    """Mean over the grids in :data:`GRIDS` and supervised tokens of (1 − own mass)², plus ``coverage`` × the
    per-pixel binary cross-entropy between each map (scaled to peak 1) and its object's mask, TokenCompose's two
    terms: the first puts a word's mass on its object, the second spreads it over all of the object. ``absent`` ×
    (mass on any object)² for the words of objects the caption names and the image lacks: a weak word map then
    means a missing object, the premise of Attend-and-Excite."""
    supervised, missing = assign > 0, assign == ABSENT
    any_supervised, any_missing = bool(supervised.any()), bool(absent) and bool(missing.any())  # once, not per map
    if not (any_supervised or any_missing):
        return maps[0].new_zeros(())
    losses = []
    for m in maps:
        side = round(m.shape[1] ** 0.5)
        if side not in GRIDS:
            continue
        masks = grid_masks(labels, objects, side)
        loss = m.new_zeros(())
        if any_supervised:
            loss = loss + ((1 - own_mass(m, masks, assign)) ** 2)[supervised].mean()
        if any_missing:
            spread = m / m.sum(1, keepdim=True).clamp_min(1e-12)
            on_objects = torch.einsum("bqt,bq->bt", spread, masks.amax(-1))
            loss = loss + absent * (on_objects ** 2)[missing].mean()
        if coverage and any_supervised:
            onehot = F.one_hot(assign.long().clamp(0, objects), objects + 1)[..., 1:].float()
            target = torch.einsum("bqk,btk->bqt", masks, onehot)
            peak = (m / m.amax(1, keepdim=True).clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)
            pixel = F.binary_cross_entropy(peak, target, reduction="none").mean(1)
            loss = loss + coverage * pixel[supervised].mean()
        losses.append(loss)
    return torch.stack(losses).mean() if losses else maps[0].new_zeros(())


@torch.no_grad()
def teacher_forced(pipe, n: int = 60, timesteps: tuple[int, ...] = (300, 500, 700), seed: int = 10_000,
                   n_objects: int = 2) -> dict:
    """Localisation read without sampling: per grid and word role, the share of (scene, t) cases whose word
    puts more attention on its own object than on the other objects, and the mean own / other mass.

    Scenes are held out (``seed``), with distinct colours and nouns; maps are head- and layer-means.
    """
    from probe.shapes.world import render, scene_for

    scenes = [scene_for(seed, i, n_objects, distinct_shapes=True) for i in range(n)]
    images, labels = zip(*(render(s) for s in scenes))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    labels = torch.from_numpy(np.stack(labels))
    captions = [" and ".join(f"a {o.colour} {o.shape}" for o in s) for s in scenes]
    tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt")
    use_mask = getattr(pipe.text_encoder.config, "use_attention_mask", False)
    emb = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask if use_mask else None)[0]
    drawn = [[True] * n_objects] * n
    roles = {role: token_objects(pipe.tokenizer, [[(getattr(o, attr),) for o in s] for s in scenes], drawn,
                                 tok.input_ids)
             for role, attr in (("colour", "colour"), ("noun", "shape"))}
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen)
        tt = torch.full((n,), t, dtype=torch.long)
        with capture_cross(pipe) as maps:
            pipe.unet(pipe.scheduler.add_noise(latents, noise, tt), tt, emb)
        for side in GRIDS:
            layer_maps = [m for m in maps if m.shape[1] == side * side]
            mean = torch.stack(layer_maps).mean(0)
            masks = grid_masks(labels, n_objects, side)
            for role, assign in roles.items():
                own = own_mass(mean, masks, assign)
                other = own_mass(mean, masks, _next_object(assign, n_objects))
                keep = assign > 0
                rows.setdefault((side, role), []).append((own[keep], other[keep]))
    out = {}
    for (side, role), parts in rows.items():
        own = torch.cat([p[0] for p in parts])
        other = torch.cat([p[1] for p in parts])
        out[f"res{side}/{role}"] = {"own_gt_other": float((own > other).float().mean()),
                                    "own_mass": float(own.mean()), "other_mass": float(other.mean())}
    return out


def _next_object(assign: torch.Tensor, objects: int) -> torch.Tensor:
    """The assignment shifted to the next object (k → k+1 mod objects): "the other object" of two."""
    shifted = assign.clone()
    keep = assign > 0
    shifted[keep] = (assign[keep] % objects + 1).to(assign.dtype)
    return shifted
