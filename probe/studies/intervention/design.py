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


@dataclass(frozen=True)
class Arm:
    """One way a unit's image is made: its name, its dose (None: none) and its share of the schedule."""

    name: str
    dose: float | str | None
    window: tuple[float, float] = (0.0, EARLY)

    def steps(self, steps: int) -> frozenset[int]:
        lo, hi = self.window
        return frozenset(range(int(round(lo * steps)), max(int(round(hi * steps)), int(round(lo * steps)) + 1)))


def e1_arms(doses: Sequence[float] = DOSES) -> list[Arm]:
    return [Arm("none", None), Arm("sham", SHAM), *(Arm(f"dose {d:g}", float(d)) for d in doses)]


def e2_arms(dose: float = min(DOSES)) -> list[Arm]:
    return [Arm("none", None), *(Arm(f"{name} {dose:g}", float(dose), window) for name, window in WINDOWS.items())]


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
                    alpha: float = ALPHA, family: int = 2) -> dict:
    """Units the primary contrast needs: a paired difference of ``effect`` points (lowest dose − highest dose, all
    present), tested at ``alpha / family`` (Holm's first step), its per-unit spread and the object-set clustering
    (design effect 1 + (m − 1)·ICC, m units per set) measured on the pilot."""
    from scipy.stats import norm

    from probe.analysis.stats import intraclass_correlation

    lo, hi = f"dose {min(DOSES):g}", f"dose {max(DOSES):g}"
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

REGISTRATION = Path(__file__).resolve().parents[3] / "figures" / "intervention_registration.md"


def registration(path: str | Path = REGISTRATION) -> dict:
    """The design the registration file fixes (its JSON block): per experiment the units, arms and settings."""

    text = Path(path).read_text()
    block = re.search(r"```json\n(.*?)\n```", text, re.S)
    if block is None:
        raise ValueError(f"{path} holds no ```json design block")
    return json.loads(block.group(1))


def design(experiment: str, path: str | Path = REGISTRATION) -> tuple[pd.DataFrame, list[Arm], dict]:
    """The units, arms and settings of one registered experiment."""
    spec = registration(path)["experiments"].get(experiment)
    if spec is None:
        known = sorted(registration(path)["experiments"])
        raise ValueError(f"no experiment {experiment!r} in {path}; registered: {known}")
    units = draw_units(spec["sets"], spec["seeds_per_order"], skip=spec["skip_sets"], seed_offset=spec["seed_offset"])
    arms = [Arm(a["name"], a["dose"], tuple(a["window"])) for a in spec["arms"]]
    return units, arms, spec


def check_registered(rows: pd.DataFrame, experiment: str, path: str | Path = REGISTRATION) -> None:
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

