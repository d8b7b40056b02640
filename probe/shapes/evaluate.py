"""Measure the built-in model with its exact judge: what the model card reports.

Every number comes from fixed held-out seeds and the model's default sampler and guidance:
single-object correctness, two-object outcomes (present / missing / wrong colour / wrong shape /
mixed), cross-attention localisation (Otsu-mask IoU with the judge's mask), and speed.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from probe.shapes.judge import detect, judge
from probe.shapes.settings import GUIDANCE, HELD_OUT_SEED, STEPS
from probe.shapes.world import COLOURS, SHAPES, sample_attributes
from probe.writes import save_figure, write_csv

LATE_STEPS = 10  # localisation uses the mean map of the last this many steps


@dataclass
class Generated:
    prompt: str
    seed: int
    image: np.ndarray  # uint8 H×W×3


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, batch_size: int = 16,
             guidance_scale: float = GUIDANCE, desc: str = "generating") -> list[Generated]:
    """Images for (prompt, seed) pairs; seed s draws the latent exactly as ``probe.record`` does."""
    out = []
    device = pipe._execution_device
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        ps, ss = prompts[start : start + batch_size], seeds[start : start + batch_size]
        images = pipe(ps, generator=[torch.Generator(device).manual_seed(s) for s in ss], num_inference_steps=steps,
                      guidance_scale=guidance_scale, output_type="np").images
        out += [Generated(p, s, (im * 255).round().astype(np.uint8)) for p, s, im in zip(ps, ss, images)]
    return out


def single_object(pipe, seeds_per_prompt: int = 8, steps: int = STEPS) -> dict:
    """Every colour × shape, ``seeds_per_prompt`` seeds each: share with the right colour and shape."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    prompts = [f"a {c} {s}" for c, s in pairs for _ in range(seeds_per_prompt)]
    seeds = [HELD_OUT_SEED + i for i in range(len(prompts))]
    results = generate(pipe, prompts, seeds, steps, desc="single objects")
    found = [detect(g.image) for g in results]
    status = [judge(g.image, g.prompt, d)[0].status for g, d in zip(results, found)]
    return {
        "images": len(results),
        "correct": float(np.mean([s == "present" for s in status])),
        "exactly_one_object": float(np.mean([len(d) == 1 for d in found])),
        "more_than_three_objects": float(np.mean([len(d) > 3 for d in found])),  # textured or framed backgrounds
        **{f"rate_{name}": float(np.mean([s == name for s in status])) for name in sorted(set(status))},
    }


def two_object_prompts(n: int, seed: int = HELD_OUT_SEED, objects: int = 2, distinct_shapes: bool = False) -> list[str]:
    """``n`` captions of ``objects`` objects drawn as the training data draws them (distinct colours; distinct
    nouns with ``distinct_shapes``)."""
    rng = np.random.default_rng([seed, objects])
    return [caption_of(sample_attributes(rng, objects, distinct_shapes=distinct_shapes)) for _ in range(n)]


def pilot(pipe, n: int = 60, images: int = 48, steps: int = 25) -> dict:
    """What a short training run is read by: teacher-forced localisation (no sampling) and the unguided
    missing / mixed rates of two- and three-object prompts with distinct nouns (held-out seeds)."""
    from probe.shapes.grounding import teacher_forced

    return {"teacher_forced": teacher_forced(pipe, n),
            **{f"objects{k}": missing_rates(pipe, k, images, steps) for k in (2, 3)}}


def two_objects(pipe, n: int = 300, steps: int = STEPS) -> dict:
    """Both subjects present and correct, and the rate of each failure, per subject and per image."""
    prompts = two_object_prompts(n)
    results = generate(pipe, prompts, [HELD_OUT_SEED + i for i in range(n)], steps, desc="two objects")
    statuses = [judge(g.image, g.prompt) for g in results]
    flat = [s.status for st in statuses for s in st]
    return {
        "images": n,
        "both_correct": float(np.mean([all(s.status == "present" for s in st) for st in statuses])),
        "any_missing": float(np.mean([any(s.status == "missing" for s in st) for st in statuses])),
        **{f"subject_{name}": float(np.mean([s == name for s in flat]))
           for name in ("present", "missing", "wrong_colour", "wrong_shape", "mixed")},
    }


def _grid_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A pixel mask at an attention grid: a cell is inside when most of it is."""
    h, w = mask.shape
    return mask.reshape(grid[0], h // grid[0], grid[1], w // grid[1]).mean((1, 3)) >= 0.5


def localisation(pipe, n: int = 200, steps: int = STEPS, batch_size: int = 16) -> dict:
    """IoU of each colour word's and noun's Otsu-masked cross-attention with its object's judge mask.

    Maps are layer- and head-means over the last ``LATE_STEPS`` steps, at every grid; only images
    where the judge finds both subjects present count. Also the share of the word's attention mass
    that falls on its own object versus the other object (meaningful when Otsu masks are not).
    """
    import probe
    from probe.analysis.maps import otsu_mask, word_map

    prompts = two_object_prompts(n, seed=HELD_OUT_SEED + 1)
    seeds = [HELD_OUT_SEED + 50_000 + i for i in range(n)]
    keep = list(range(max(0, steps - LATE_STEPS), steps))
    rows: list[dict] = []
    for start in tqdm(range(0, n, batch_size), desc="localisation", leave=False):
        sl = slice(start, start + batch_size)
        trees = [probe.record(pipe, p, seeds=[s], steps=steps, kinds=("cross",), keep_steps=keep, progress=False)
                 for p, s in zip(prompts[sl], seeds[sl])]
        for tree in trees:
            image = tree["images"]["image"].values[0]
            prompt = str(tree["images"]["prompt"].values[0])
            status = judge(image, prompt, detections=detect(image))
            if not all(s.status == "present" for s in status):
                continue
            for group in tree["cross"].children:
                ds = tree["cross"][group]
                grid = (ds.sizes["y"], ds.sizes["x"])
                masks = [_grid_mask(s.detection.mask, grid) for s in status]
                for k, s in enumerate(status):
                    for role, word in (("colour", s.colour), ("noun", s.shape)):
                        m = word_map(ds, 0, word).mean(("step", "layer"))
                        values = torch.from_numpy(np.asarray(m.values, np.float32))
                        pred = otsu_mask(values).numpy()
                        own, other = masks[k], masks[1 - k]
                        union = (pred | own).sum()
                        mass = values.numpy() / max(float(values.sum()), 1e-12)
                        rows.append({"grid": group, "role": role, "iou": float((pred & own).sum() / max(union, 1)),
                                     "own_mass": float(mass[own].sum()), "other_mass": float(mass[other].sum())})
    if not rows:
        return {"images_used": 0}
    import pandas as pd

    table = pd.DataFrame(rows)
    table["own_gt_other"] = table.own_mass > table.other_mass
    by = table.groupby(["grid", "role"])[["iou", "own_mass", "other_mass", "own_gt_other"]].mean()
    best = table.groupby("grid").iou.mean().idxmax()
    return {
        "images_used": int(len(table) / (2 * 2 * table.grid.nunique())),
        "best_grid": best,
        "iou_best_grid": float(table[table.grid == best].iou.mean()),
        "iou_best_grid_colour": float(table[(table.grid == best) & (table.role == "colour")].iou.mean()),
        "iou_best_grid_noun": float(table[(table.grid == best) & (table.role == "noun")].iou.mean()),
        "per_grid": {f"{g}/{r}": {k: float(v) for k, v in row.items()} for (g, r), row in by.iterrows()},
    }


def seconds_per_image(pipe, steps: int = STEPS, repeats: int = 3) -> float:
    """Median wall time of one image at ``steps`` steps (batch 1, with guidance)."""
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        pipe("a red circle and a blue square", num_inference_steps=steps, guidance_scale=GUIDANCE,
             generator=torch.Generator().manual_seed(i), output_type="np")
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def sample_grid(pipe, path, steps: int = STEPS, columns: int = 6) -> None:
    """A figure of generations for single, two- and three-object prompts (for the model card)."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(HELD_OUT_SEED + 7)
    prompts = [caption_of(sample_attributes(rng, k)) for k in (1, 2, 3) for _ in range(columns)]
    results = generate(pipe, prompts, [HELD_OUT_SEED + 900 + i for i in range(len(prompts))], steps, desc="grid")
    rows = len(results) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows))
    for ax, g in zip(axes.flat, results):
        ax.imshow(g.image)
        ax.set_title(g.prompt.replace(" and ", "\n"), fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def caption_of(attributes: list[tuple[str, str]]) -> str:
    return " and ".join(f"a {c} {s}" for c, s in attributes)



def judge_accuracy(n: int = 2000, seed: int = HELD_OUT_SEED) -> float:
    """Per-object accuracy of the judge on ``n`` rendered scenes of 1–3 objects with known truth."""
    from probe.shapes.judge import evaluate_scene
    from probe.shapes.world import render, scene_for

    correct = []
    for i in range(n):
        scene = scene_for(seed, i, 1 + i % 3)
        image, labels = render(scene)
        correct += evaluate_scene(image, scene, labels=labels)
    return float(np.mean(correct))


def missing_rates(pipe, objects: int, images: int = 100, steps: int = 25) -> dict:
    """Unguided outcomes on held-out prompts of ``objects`` objects with distinct nouns (the studies' sets)."""
    prompts = two_object_prompts(images, HELD_OUT_SEED + 3, objects=objects, distinct_shapes=True)
    results = generate(pipe, prompts, [HELD_OUT_SEED + 70_000 + i for i in range(images)], steps,
                       desc=f"{objects} objects")
    statuses = [[s.status for s in judge(g.image, g.prompt)] for g in results]
    return {"images": images, "steps": steps,
            "any_missing": float(np.mean([("missing" in st) for st in statuses])),
            "any_mixed": float(np.mean([("mixed" in st) for st in statuses])),
            "all_present": float(np.mean([all(x == "present" for x in st) for st in statuses]))}


def weights_mb(pipe) -> float:
    """Parameters of the UNet, text encoder and VAE in MB at their stored precision."""
    return sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder, pipe.vae)
               for p in m.parameters()) / 1e6


def evaluate_model(pipe, quick: bool = False, reference=None) -> dict:
    """Every model-card number; ``quick`` uses small sizes (for tests and smoke runs). ``reference``: a model
    timed side by side (alternated) with this one."""
    steps = 10 if quick else STEPS
    repeats = 1 if quick else 3
    speed = {}
    if reference is not None:
        for _ in range(repeats):  # alternated, so both see the same machine
            speed.setdefault("own", []).append(seconds_per_image(pipe, repeats=1))
            speed.setdefault("reference", []).append(seconds_per_image(reference, repeats=1))
        speed = {"seconds_per_image_50_steps": float(np.median(speed["own"])),
                 "reference_seconds_per_image": float(np.median(speed["reference"]))}
    else:
        speed = {"seconds_per_image_50_steps": seconds_per_image(pipe, repeats=repeats)}
    return {  # speed first, before anything else has warmed or loaded the machine
        **speed,
        "weights_mb": weights_mb(pipe),
        **{f"study_objects{k}": missing_rates(pipe, k, images=8 if quick else 100, steps=10 if quick else 25)
           for k in (2, 3)},
        "judge_accuracy": judge_accuracy(100 if quick else 2000),
        "single_object": single_object(pipe, seeds_per_prompt=1 if quick else 8, steps=steps),
        "two_objects": two_objects(pipe, n=8 if quick else 300, steps=steps),
        "localisation": localisation(pipe, n=4 if quick else 200, steps=steps),
        "steps": steps,
        "guidance_scale": GUIDANCE,
        "scheduler": type(pipe.scheduler).__name__,
    }


SAMPLER_TEXT = {  # the card's words for each prediction type (see probe.shapes.model.scheduler)
    "epsilon": "cosine betas, ε-prediction, leading spacing: trailing spacing would start at ᾱ ≈ 2·10⁻⁹,\n  where an "
               "ε-prediction model cannot recover x₀",
    "v_prediction": "cosine betas, v-prediction, trailing spacing: a v-prediction model recovers x₀ even from\n  "
                    "pure noise",
}


MASK_TEXT = " with the attention mask passed (use_attention_mask)"


def _absent(weight: float) -> str:
    return (f"the words of a named-but-absent object kept off every object (weight {weight}); " if weight else "")


def _shares(noise) -> str:
    """A caption-noise setting in words: one share, or one per scene size."""
    if isinstance(noise, (list, tuple)):
        return " / ".join(f"{v:.0%}" for v in noise) + " (scenes of 1 / 2 / … objects)"
    return f"{noise:.0%}"


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}"


def _targets(metrics: dict) -> str:
    """The card's targets table rows (what each target asks, what was measured, whether it is met)."""
    from probe.steer.guide import Schedule  # a control read before its step was recorded ran at the schedule's own

    s, loc = metrics["single_object"], metrics["localisation"]
    speed = metrics["seconds_per_image_50_steps"]
    rows = [("judge accuracy per object ≥ 99%", metrics["judge_accuracy"], 0.99),
            ("single object correct ≥ 95%", s["correct"], 0.95)]
    for role in ("noun", "colour"):
        key = f"res16/{role}"
        if key in loc.get("per_grid", {}):
            rows.append((f"{role}s: Otsu IoU at 16² ≥ 0.6", loc["per_grid"][key]["iou"], -0.6))  # −: not a rate
            rows.append((f"{role}s: own > other mass at 16² ≥ 90%", loc["per_grid"][key]["own_gt_other"], 0.9))
    for k in (2, 3):
        if f"study_objects{k}" in metrics:
            m = metrics[f"study_objects{k}"]
            rows.append((f"{k} objects, unguided: any subject missing ≥ 15%", m["any_missing"], 0.15))
            rows.append((f"{k} objects, unguided: any subject mixed ≥ 15%", m["any_mixed"], 0.15))
    status = "\n".join(f"| {name} | {f'{value:.2f}' if bar < 0 else f'{value:.1%}'} | "
                       f"{'yes' if value >= abs(bar) else 'no'} |" for name, value, bar in rows)
    if "positive_control" in metrics:
        c = metrics["positive_control"]
        low, high = c["missing_difference_ci"]
        met = c["missing_difference"] <= -0.05 and high < 0 and c["pairs"] >= 300
        status += (f"\n| positive control: A&E lowers missing ≥ 5 points, 95% CI below 0, ≥ 300 pairs | "
                   f"{c['missing_difference'] * 100:+.1f} points [{low * 100:+.1f}, {high * 100:+.1f}] "
                   f"({c['missing_none']:.1%} → {c['missing_ae']:.1%}, {c['pairs']} pairs of {c['prompts']} "
                   f"prompts, {_p(c['p_value'])}; A&E step {c.get('ae_step_size', Schedule.scale_factor):g}) | "
                   f"{'yes' if met else 'no'} |"
                   f"\n| A&E's loss falls during guidance (median first → last guided step) | "
                   f"{c['ae_loss_start_median']:.3f} → {c['ae_loss_end_median']:.3f} | "
                   f"{'yes' if c['ae_loss_end_median'] < c['ae_loss_start_median'] else 'no'} |")
    if "reference_seconds_per_image" in metrics:
        reference = metrics["reference_seconds_per_image"]
        ratio = speed / reference
        status += (f"\n| one image at 50 steps ≤ 1.25× the reference model (HISTORY), side by side | {ratio:.2f}× "
                   f"({speed:.2f} s vs {reference:.2f} s) | {'yes' if ratio <= 1.25 else 'no'} |")
    if "weights_mb" in metrics:
        mb = metrics["weights_mb"]
        status += f"\n| weights ≤ 30 MB | {mb:.1f} MB | {'yes' if mb <= 30 else 'no'} |"
    return status


def _recipe(data: dict) -> str:
    """The training data's recipe in words (the scenes, the caption noise, the grounding)."""
    if not data:
        return "scenes of 1–3 objects, 10% empty captions"
    return (f"scenes of 1–{len(data.get('object_weights', (0, 0, 0)))} objects in shares "
            f"{', '.join(f'{w:.0%}' for w in data.get('object_weights', ()))}"
            f"{', no noun repeated within a caption' if data.get('distinct_shapes') else ''}; "
            f"{_shares(data.get('caption_noise', 0))} of multi-object captions name one object the image lacks; "
            f"{data.get('attribute_noise', 0):.0%} swap two objects' colour words; grounding of "
            f"nouns, and colour words in {float(data.get('ground_colours', 1.0)):.0%} of captions; "
            f"{_absent(data.get('absent_weight', 0))}"
            f"{data.get('caption_dropout', 0.1):.0%} empty captions; cross-attention grounding weight "
            f"{data.get('grounding_weight', 0)}")


def _reading_notes() -> str:
    """What a study must know to read this model's images and maps: the judge's confidence floor, and why a map at
    the last step reads the outcome out rather than causing it."""
    from probe.shapes.judge import MIN_CONFIDENCE

    return f"""The judge counts a detection as an object only at confidence ≥ {MIN_CONFIDENCE:g}
(`probe.shapes.judge.MIN_CONFIDENCE`), so a faint rim of one colour around an object of another is no object: the
threshold maximises the balanced accuracy of "present" per subject over rendered scenes with known truth and hard
cases (rims, faint, small, blurred, noisy, tinted, 32/128 px); `python -m probe.shapes.judge_calibration` recomputes
`figures/judge_min_confidence.csv`, the table it was chosen from.

**Reading maps at the last step.** Training keeps the words of a named-but-absent object off every object, so when
the model leaves a subject out, that subject's map is flat at the end by construction. A statistic of the maps at the
last step therefore reads the outcome out rather than predicting it: the studies read cause at early steps (the
overlap study at step 10 of 50, the intervention study in the first 20 % of the steps) and report the last step
beside it as an outcome read-out, not cause.
"""


def write_card(folder, metrics: dict, training: dict) -> str:
    """The model card (markdown): how the model is built and trained, what it measures against its targets, and the
    folder's ``HISTORY.md`` (what was tried, measured when it was tried) when there is one."""
    s, t, loc = metrics["single_object"], metrics["two_objects"], metrics["localisation"]
    per_grid = "\n".join(
        f"| {key} | {v['iou']:.2f} | {v['own_mass']:.2f} | {v['other_mass']:.2f} | {v['own_gt_other']:.0%} |"
        for key, v in loc.get("per_grid", {}).items()
    )
    arch = training["arch"]
    speed = metrics["seconds_per_image_50_steps"]
    status = _targets(metrics)
    heads = arch["attention_head_dim"]
    control = metrics.get("positive_control")
    reproduce = "" if control is None else f" --control {control['pairs']} --control-seeds {control.get('seeds', 5)}"
    history = Path(folder) / "HISTORY.md"
    history = history.read_text() if history.exists() else ""
    recipe = _recipe(training.get("data", {}))
    return f"""# The built-in shapes model

A small text-to-image diffusion model trained by this project on the synthetic shapes world
(`probe.shapes.world`: non-overlapping circles, squares, triangles and ellipses in six colours on a light
background, 64×64 px). It is a standard diffusers `StableDiffusionPipeline` folder, loaded offline with
`probe.load(FOLDER)` or `StableDiffusionPipeline.from_pretrained(FOLDER)`.

## Architecture
- VAE `AutoencoderKL` {arch['vae_channels']}: 64 px ↔ 16×16×{arch['latent_channels']} latents, scaling factor
  {training['scaling_factor']:.3f}.
- UNet `UNet2DConditionModel` {arch['unet_channels']}, cross-attention at 16×16, 8×8 and 4×4 (mid block),
  {heads} attention heads per layer.
- Text encoder `CLIPTextModel` width {arch['text_width']}, {arch['text_layers']} causal transformer layer(s),
  {arch.get('text_padding', 'right')} padding{MASK_TEXT if arch.get('text_mask') else ''};
  the project's CLIP BPE tokenizer, 32 tokens.
- `DDIMScheduler` ({SAMPLER_TEXT[arch.get('prediction', 'epsilon')]}), {metrics['steps']} steps, guidance
  {metrics['guidance_scale']} by default.

## Training
`probe train-shapes` (`probe.shapes.train`): {training['unet_steps']} UNet steps at batch {training['batch_size']}
on cached latents of 40,000 scenes ({recipe}), AdamW, EMA; {training.get('minutes', '?')} minutes on
{training.get('device', 'cpu')}. Resumable (`--resume`).

## Targets

| target | measured | met |
|---|---|---|
{status}

{_reading_notes()}
## Measured (held-out seeds from {HELD_OUT_SEED}, default sampler and guidance)
| what | value |
|---|---|
| single object, every colour × shape, {s['images']} images: correct colour and shape | {s['correct']:.1%} |
| two objects, {t['images']} images: both present and correct | {t['both_correct']:.1%} |
| two objects: any subject missing | {t['any_missing']:.1%} |
| two objects, per subject: present / missing / wrong colour / wrong shape / mixed | \
{t['subject_present']:.1%} / {t['subject_missing']:.1%} / {t['subject_wrong_colour']:.1%} / \
{t['subject_wrong_shape']:.1%} / {t['subject_mixed']:.1%} |
| seconds per image, 50 steps, batch 1 (this CPU) | {speed:.2f} |

Localisation per grid and word role (layer- and head-mean map of the last {LATE_STEPS} steps, images whose
subjects are both present; mass = share of the map's attention on the word's own object and on the other object):

| grid/role | Otsu IoU | own mass | other mass | own > other |
|---|---|---|---|---|
{per_grid}

![samples](samples.png)

{history}
Reproduce: `probe evaluate-shapes --model {folder} --card{reproduce}`.
"""


def positive_control(pipe, n_images: int = 300, out=None, progress: bool = True, steps: int = STEPS,
                     seeds_per_prompt: int = 1, step_size: float | None = None) -> dict:
    """Attend-and-Excite against no guidance: the guidance study (:mod:`probe.studies.guidance`) with those two
    methods only, on its two- and three-object sets with distinct nouns, paired by (prompt, seed), 50 steps, A&E's
    schedule and its softmax over the prompt's words, at the step size that lowers missing most on pilot prompts the
    control does not use (:func:`probe.studies.guided.calibrate_steps`; ``step_size`` skips the calibration).
    One seed per prompt by default: the same number of pairs spread over more prompts gives a narrower interval, as
    one prompt's seeds fail together. The paired difference in missing rate (A&E − none) has an interval resampling
    object sets and McNemar's exact p-value on the (prompt, seed) pairs; A&E's loss before guidance and at its last
    step shows that the guidance acted. ``out`` keeps the per-image rows (and
    resumes a stopped run)."""
    from probe.studies.guidance import guidance_study

    study = guidance_study(pipe, n_images=n_images, steps=steps, methods=("none", "ae"), initno=(False,), out=out,
                           progress=progress, seeds_per_prompt=seeds_per_prompt,
                           step_sizes=None if step_size is None else {"ae": step_size})
    if out is not None and not study.step_sizes.empty:
        write_csv(study.step_sizes, Path(out) / "control_step_sizes.csv")
    rates = study.summary.set_index("method")
    versus = study.versus_ae.set_index("method").loc["none"]  # none − ae, so A&E's effect is its negative
    return {
        "pairs": int(versus.n_paired), "prompts": int(versus.n_prompts), "seeds": seeds_per_prompt, "steps": steps,
        "missing_none": float(rates.loc["none", "missing_rate"]), "missing_ae": float(rates.loc["ae", "missing_rate"]),
        "missing_difference": -float(versus.difference),
        "missing_difference_ci": [-float(versus.ci_high), -float(versus.ci_low)], "p_value": float(versus.p_value),
        "mixed_none": float(rates.loc["none", "mixed_rate"]), "mixed_ae": float(rates.loc["ae", "mixed_rate"]),
        "ae_loss_start_median": float(rates.loc["ae", "loss_start_median"]),
        "ae_loss_end_median": float(rates.loc["ae", "loss_end_median"]),
        "ae_step_size": float(rates.loc["ae", "step_size"]),
        "calibration": json.loads(study.step_sizes.to_json(orient="records")),
    }
