"""The intervention study's design: its arms, its units (object sets of the built-in world, both word orders, seeds
of their own), the outcome categories, and the registered designs read from the committed registration files.

A registration file is committed before its experiments' images are made; :func:`check_registered` refuses a table
that is not one of them, whole.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from probe.shapes.settings import HELD_OUT_SEED
from probe.steer.intervene import SHAM

INTERVENTION_SEED = HELD_OUT_SEED + 60_000  # seeds of this study's images
DOSES = (0.05, 0.10, 0.20, 0.30)  # soft IoU, both sides of the natural overlap (pilot: 0.155, first 20 % of steps)
EARLY = 0.2  # E1 acts on the first 20 % of the steps (where A&E acts on this model)
WINDOWS = {"early": (0.0, 0.2), "middle": (0.4, 0.6), "late": (0.8, 1.0)}  # E2: shares of the schedule
GRIDS = (16, 8)  # the cross-attention grids the maps are moved at (the nearest the model has)
CATEGORIES = ("all_present", "missing", "mixed")


FACTORS = (2.0,)  # E2b: each window's own overlap doubled (a push apart widened late maps in the pilot)
COMMON_STEP = 1.0  # E3: A&E's step on this model (60 pilot prompts: data/models/shapes/guidance_step_sizes.csv)


@dataclass(frozen=True)
class Arm:
    """One way a unit's image is made: its name, its dose (None: none; a soft IoU, or with ``relative`` a factor of
    each call's own) and its share of the schedule; or, in the factorial experiment, the guidance ``objective``
    (None there: unguided through the same code)."""

    name: str
    dose: float | str | None
    window: tuple[float, float] = (0.0, EARLY)
    relative: bool = False
    objective: str | None = None

    def settings(self) -> dict:
        """What decides this arm's images (the fields a default leaves out, so that older tables keep their ids)."""
        return {k: v for k, v in vars(self).items() if k in ("name", "dose", "window") or v}

    def steps(self, steps: int) -> frozenset[int]:
        lo, hi = self.window
        return frozenset(range(int(round(lo * steps)), max(int(round(hi * steps)), int(round(lo * steps)) + 1)))


def e1_arms(doses: Sequence[float] = DOSES) -> list[Arm]:
    return [Arm("none", None), Arm("sham", SHAM), *(Arm(f"dose {d:g}", float(d)) for d in doses)]


def e2_arms(dose: float = min(DOSES)) -> list[Arm]:
    return [Arm("none", None), *(Arm(f"{name} {dose:g}", float(dose), window) for name, window in WINDOWS.items())]


def e2b_arms(factors: Sequence[float] = FACTORS) -> list[Arm]:
    """None, and in each window the maps' own overlap scaled by each factor (relative doses: natural overlap falls
    from 0.15 early to 0.013 late, so one soft IoU would push apart early and pull together late)."""
    return [Arm("none", None), *(Arm(f"{name} x{f:g}", float(f), window, relative=True)
                                 for name, window in WINDOWS.items() for f in factors)]


def e3_arms() -> list[Arm]:
    """The 2 × 2 of A&E's term and the soft-IoU overlap term, at one common step."""
    return [Arm("none", None), *(Arm(o, None, objective=o) for o in ("ae", "iou", "ae+iou"))]


def object_sets() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Every set of two objects with distinct colours and distinct shapes, in a fixed order: ((colour, shape), …)."""
    from probe.shapes.world import COLOURS, SHAPES

    sets = []
    for shapes in itertools.combinations(SHAPES, 2):
        for colours in itertools.permutations(COLOURS, 2):
            sets.append(tuple(zip(colours, shapes)))
    return sets


def draw_units(n_sets: int, seeds_per_order: int, *, skip: int = 0, seed: int = 0, seed_offset: int = 0
               ) -> pd.DataFrame:
    """Units: ``n_sets`` object sets drawn without replacement (after the first ``skip`` of the same shuffled order,
    which a pilot used), both word orders each, ``seeds_per_order`` seeds each (``seed_offset`` keeps another
    experiment's seeds apart); one row per unit."""
    order = np.random.default_rng(seed).permutation(len(object_sets()))
    if skip + n_sets > len(order):
        raise ValueError(f"the world has {len(order)} object sets; {skip} used by the pilot leave "
                         f"{len(order) - skip}, fewer than the {n_sets} asked for")
    rows = []
    for set_id in order[skip : skip + n_sets]:
        pair = object_sets()[set_id]
        for word_order, objects in (("ab", pair), ("ba", pair[::-1])):
            prompt = " and ".join(f"a {colour} {shape}" for colour, shape in objects)
            for k in range(seeds_per_order):
                rows.append({"set_id": int(set_id), "order": word_order, "prompt": prompt,
                             "subjects": [shape for _, shape in objects],
                             "seed": INTERVENTION_SEED + 1000 * int(set_id) + seed_offset + 10 * k
                             + (word_order == "ba")})
    return pd.DataFrame(rows)


def prompt_units(prompts: str, seeds_per_prompt: int, *, seed_offset: int = 0) -> pd.DataFrame:
    """Units from a prompt set or file (a registration's ``prompts``: the study on a user's own model and prompts):
    each prompt with exactly two subjects, ``seeds_per_prompt`` seeds each; a prompt and the same subjects in the
    other order share an object set (``set_id``), the cluster of the intervals."""
    from probe.prompts import prompt_set

    data = prompt_set(prompts)
    rows, sets = [], {}
    for k, (prompt, subjects) in enumerate(zip(data["prompt"], data["subjects"])):
        if len(subjects) != 2:
            continue
        set_id = sets.setdefault(tuple(sorted(subjects)), len(sets))
        rows += [{"set_id": set_id, "order": "given", "prompt": prompt, "subjects": list(subjects),
                  "seed": INTERVENTION_SEED + 1000 * k + seed_offset + 10 * j} for j in range(seeds_per_prompt)]
    if not rows:
        raise ValueError(f"no prompt of {prompts!r} names exactly two subjects: the intervention moves two maps")
    return pd.DataFrame(rows)


def category(row: dict) -> str:
    """The image's one outcome: any missing, else any mixed, else all present."""
    return "missing" if row["missing"] else "mixed" if row["mixed"] else "all_present"


def unit_angle(set_id: int, seed: int) -> float:
    """The direction a push apart takes in a unit: random per unit, the same for every dose."""
    return float(np.random.default_rng([set_id, seed]).uniform(0, 2 * math.pi))



PILOT_SETS = 12  # object sets of the pilot (both orders, one seed): the first of the shuffled order, never reused
EFFECT_POINTS = 6.0  # the smallest extreme-dose difference in all present the study must find (points)
POWER, ALPHA = 0.8, 0.05


def units_for_power(pilot: pd.DataFrame, effect: float = EFFECT_POINTS, power: float = POWER,
                    alpha: float = ALPHA, family: int = 2, arms: tuple[str, str] | None = None) -> dict:
    """Units the primary contrast needs: a paired difference of ``effect`` points between ``arms`` (default E1's
    lowest dose − highest dose) in all present, tested at ``alpha / family`` (Holm's first step), its per-unit
    spread and the object-set clustering (design effect 1 + (m − 1)·ICC, m units per set) measured on the pilot."""
    from scipy.stats import norm

    from probe.analysis.stats import intraclass_correlation

    lo, hi = arms or (f"dose {min(DOSES):g}", f"dose {max(DOSES):g}")
    wide = pilot.assign(ok=pilot.category == "all_present").pivot_table(index=["unit", "set_id"], columns="method",
                                                                          values="ok", aggfunc="mean")
    diff = (wide[lo].astype(float) - wide[hi].astype(float)) * 100
    sd = float(diff.std(ddof=1))
    icc = intraclass_correlation(diff.to_numpy(), diff.index.get_level_values("set_id"))
    per_set = len(diff) / diff.index.get_level_values("set_id").nunique()
    design = 1 + (per_set - 1) * max(0.0, 0.0 if math.isnan(icc) else icc)
    z = norm.ppf(1 - alpha / family / 2) + norm.ppf(power)
    n = math.ceil((z * max(sd, 1.0) / effect) ** 2 * design)
    return {"sd_points": sd, "icc": icc, "units_per_set": per_set, "design_effect": design, "units": n,
            "pilot_difference": float(diff.mean()), "pilot_units": len(diff)}


# -- the registered design -------------------------------------------------------------------------------------------

FIGURES = Path(__file__).resolve().parents[3] / "figures"
REGISTRATION = FIGURES / "intervention_registration.md"  # E1, E2 (2026-12-04)
REGISTRATIONS = (REGISTRATION, FIGURES / "intervention_registration_2.md")  # E2b, E3: after E2 failed its check


def registration(path: str | Path | None = None) -> dict:
    """The designs the registration files fix (each file's JSON block), one file's or all of them merged: per
    experiment the units, arms and settings, each with the ``pilot`` of its own file."""
    files = [Path(path)] if path is not None else [p for p in REGISTRATIONS if p.exists()]
    merged: dict = {"experiments": {}}
    for file in files:
        block = re.search(r"```json\n(.*?)\n```", file.read_text(), re.S)
        if block is None:
            raise ValueError(f"{file} holds no ```json design block")
        found = json.loads(block.group(1))
        for name, spec in found["experiments"].items():
            if name in merged["experiments"]:
                raise ValueError(f"experiment {name!r} is registered twice ({file}): a new size is a new name")
            merged["experiments"][name] = {**spec, "pilot": found.get("pilot", {}), "registration": file.name}
    return merged


def design(experiment: str, path: str | Path | None = None) -> tuple[pd.DataFrame, list[Arm], dict]:
    """The units, arms and settings of one registered experiment."""
    experiments = registration(path)["experiments"]
    spec = experiments.get(experiment)
    if spec is None:
        raise ValueError(f"no experiment {experiment!r} registered; registered: {sorted(experiments)}")
    units = (prompt_units(spec["prompts"], spec["seeds_per_order"], seed_offset=spec["seed_offset"])
             if spec.get("prompts") else
             draw_units(spec["sets"], spec["seeds_per_order"], skip=spec["skip_sets"], seed_offset=spec["seed_offset"]))
    arms = [Arm(a["name"], a.get("dose"), tuple(a.get("window", (0.0, EARLY))), bool(a.get("relative", False)),
                a.get("objective")) for a in spec["arms"]]
    return units, arms, spec


def check_registered(rows: pd.DataFrame, experiment: str, path: str | Path | None = None) -> None:
    """Refuse to analyse a table that is not the registered experiment, whole: its units, arms and settings."""
    units, arms, spec = design(experiment, path)
    expected = {(p, int(s), a.name) for p, s in zip(units.prompt, units.seed) for a in arms}
    found = set(zip(rows.prompt, rows.seed.astype(int), rows.method))
    if found != expected:
        raise ValueError(f"the {experiment} table has {len(found & expected)} of the {len(expected)} registered "
                         f"(unit, arm) images and {len(found - expected)} others: no answer is read before the "
                         f"registered size is complete (a new size is a new registration)")
    if set(rows["steps"].astype(int)) != {spec["steps"]}:
        raise ValueError(f"the {experiment} table was made at other settings than registered ({spec['steps']} steps)")



def detectable_points(spec: dict, power: float = POWER) -> float:
    """The difference (points) an experiment's registered size detects with ``power``, at Holm's first step over
    its family, from the pilot figures its registration records (``power`` block, else its file's ``pilot``)."""
    from scipy.stats import norm

    pilot = spec.get("power") or spec["pilot"]
    per_set = 2 * spec["seeds_per_order"]
    units = spec["sets"] * per_set
    design = 1 + (per_set - 1) * max(0.0, pilot["icc"])
    z = norm.ppf(1 - spec["alpha"] / len(spec["family"]) / 2) + norm.ppf(power)
    return float(z * pilot["sd_points"] * math.sqrt(design / units))


def intervened_layers(pipe) -> list:
    """The cross-attention layers the study moves and measures maps in: the grids nearest :data:`GRIDS` (the
    built-in model's 16² and 8²; a DiT's one grid)."""
    from probe.studies.common import nearest_grid
    from probe.tap import attention_layers

    grids = {nearest_grid(pipe, g) for g in GRIDS}
    return [la for la in attention_layers(pipe) if la.kind == "cross" and la.grid[0] in grids]
