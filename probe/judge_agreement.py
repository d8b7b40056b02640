"""How far a judge agrees with known truth, per prompt subject: accuracy, Cohen's kappa and confusion counts.

Truth and verdicts are compared in the statuses every judge but the exact one speaks
(:data:`probe.judges.JUDGE_STATUSES`: present, mixed, missing); the exact judge's five are mapped onto them by
:func:`common_status`.

- :func:`agreement_table` — the table from per-subject rows (truth, said, category).
- :func:`judge_folder` — a judge run on a folder of images against a truth CSV (``probe judge-agreement``).
- :func:`shapes_scenes`, :func:`write_shapes_truth`, :func:`shapes_agreement` — scenes of the built-in world drawn
  with known truth, and a judge's agreement on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from probe.judges import JUDGE_STATUSES

TRUTH_COLUMNS = ("image", "prompt", "subject", "status")  # a truth CSV's columns; ``category`` is optional
ALL = "all"  # the table's row over every subject
# The exact judge's statuses in the object-level terms every other judge speaks (probe.judges' docstring): a subject
# drawn with another colour is mixed whether the prompt gives that colour to another subject or not; a subject whose
# shape is not drawn is missing.
COMMON_STATUS = {"present": "present", "mixed": "mixed", "wrong_colour": "mixed", "wrong_shape": "missing",
                 "missing": "missing"}


def common_status(status: str) -> str:
    """A verdict's or the truth's status as one of :data:`probe.judges.JUDGE_STATUSES` (:data:`COMMON_STATUS`)."""
    try:
        return COMMON_STATUS[str(status)]
    except KeyError:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(COMMON_STATUS)}") from None


def cohen_kappa(truth: Sequence[str], said: Sequence[str], labels: Sequence[str] = JUDGE_STATUSES) -> float:
    """Cohen's kappa, (p_o − p_e) / (1 − p_e): observed agreement p_o against the agreement p_e expected from the
    two marginal shares alone. NaN where p_e = 1 (truth and judge each give every subject one and the same status:
    chance explains everything, and kappa is undefined)."""
    truth, said = np.asarray(truth), np.asarray(said)
    if truth.size == 0:
        return math.nan
    observed = float(np.mean(truth == said))
    expected = float(sum(np.mean(truth == k) * np.mean(said == k) for k in labels))
    return (observed - expected) / (1 - expected) if expected < 1 else math.nan


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row for all subjects, then one per ``category`` (in order of appearance, where the rows have one):
    ``n`` subjects, ``accuracy`` (share with the truth's status), ``kappa`` (:func:`cohen_kappa`) and the confusion
    counts ``{truth}_as_{said}`` over :data:`probe.judges.JUDGE_STATUSES`."""
    groups = [(ALL, rows)]
    if "category" in rows:
        groups += [(str(name), part) for name, part in rows.groupby("category", sort=False)]
    table = []
    for name, part in groups:
        truth, said = part["truth"].to_numpy(), part["said"].to_numpy()
        row = {"category": name, "n": len(part), "accuracy": float(np.mean(truth == said)) if len(part) else math.nan,
               "kappa": cohen_kappa(truth, said)}
        row.update({f"{t}_as_{s}": int(np.sum((truth == t) & (said == s))) for t in JUDGE_STATUSES
                    for s in JUDGE_STATUSES})
        table.append(row)
    return pd.DataFrame(table)


def _subject_name(verdict) -> str:
    """The noun a verdict is about (a :class:`probe.judges.Verdict`'s subject, the exact judge's shape); a class of
    several words ("dining table") stands for its last ("table")."""
    return str(getattr(verdict, "subject", None) or getattr(verdict, "shape", "")).lower()


@dataclass(frozen=True, eq=False)
class Case:
    """One image to judge: its ``name``, pixels, prompt, the truth per subject in the prompt's order and a
    ``category`` ("" for none)."""

    name: str
    image: object
    prompt: str
    subjects: tuple[str, ...]
    truth: tuple[str, ...]
    category: str = ""


def judge_rows(judge: Callable, cases: Iterable[Case]) -> pd.DataFrame:
    """Per subject: image, prompt, subject, category, ``truth`` and the judge's status ``said`` (both as
    :func:`common_status`). The judge's verdicts must come in the prompt's subject order, one per subject."""
    rows = []
    for case in cases:
        verdicts = list(judge(case.image, case.prompt))
        if len(verdicts) != len(case.subjects):
            raise ValueError(f"{case.name}: the judge gave {len(verdicts)} verdicts for {case.prompt!r}, whose truth "
                             f"lists {len(case.subjects)} subjects ({', '.join(case.subjects)})")
        for verdict, subject, truth in zip(verdicts, case.subjects, case.truth):
            if _subject_name(verdict) and subject.lower() not in (_subject_name(verdict),
                                                                  _subject_name(verdict).split()[-1]):
                raise ValueError(f"{case.name}: the judge's verdict is about {_subject_name(verdict)!r} where the "
                                 f"truth lists {subject!r}; list the truth's subjects in the prompt's order")
            rows.append({"image": case.name, "prompt": case.prompt, "subject": subject, "category": case.category,
                         "truth": common_status(truth), "said": common_status(verdict.status)})
    return pd.DataFrame(rows, columns=["image", "prompt", "subject", "category", "truth", "said"])


def read_truth(path: str | Path) -> pd.DataFrame:
    """A truth CSV: one row per (image, subject) with columns image, prompt, subject, status (present, mixed or
    missing; the exact judge's five statuses are mapped by :func:`common_status`) and optionally category; an
    image's subjects in its prompt's order."""
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    absent = [c for c in TRUTH_COLUMNS if c not in truth]
    if absent:
        raise ValueError(f"truth file {str(path)!r} lacks the column(s) {', '.join(absent)}; it needs "
                         f"{', '.join(TRUTH_COLUMNS)} (and optionally category), one row per image and subject")
    for status in truth["status"]:
        common_status(status)
    return truth


def truth_cases(truth: pd.DataFrame, images: str | Path) -> list[Case]:
    """The cases of a truth table whose images are files in the folder ``images``."""
    from PIL import Image

    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    cases = []
    for (name, prompt), part in truth.groupby(["image", "prompt"], sort=False):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"the truth lists {name!r}, which is not in {str(folder)!r}")
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
        category = part["category"].iloc[0] if "category" in part else ""
        cases.append(Case(str(name), image, str(prompt), tuple(part["subject"]), tuple(part["status"]), category))
    return cases


def judge_folder(judge: Callable, images: str | Path, truth: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A judge's agreement with a truth CSV (:func:`read_truth`) on the images in a folder: (per-subject rows,
    :func:`agreement_table`)."""
    rows = judge_rows(judge, truth_cases(read_truth(truth), images))
    return rows, agreement_table(rows)


# -- the built-in world: scenes drawn with known truth ----------------------------------------------------------------


def shapes_scenes(n_scenes: int = 60, seed: int = 0, n_subjects: Sequence[int] = (2, 3)) -> list[Case]:
    """Scenes of the shapes world whose truth is known by construction: each prompt names ``n`` subjects of distinct
    colours and shapes ("a red circle and a blue square", in turn 2 and 3 of them), and each subject is at random
    present (drawn in its colour), mixed (its shape drawn in another colour: another subject's where that subject is
    present, else one the prompt does not name) or missing (not drawn).

    On these scenes the exact judge, mapped by :func:`common_status`, agrees with the truth on every subject: they
    avoid the one case where its statuses and the object-level truth part (a subject's colour on another subject's
    shape, with that other subject absent)."""
    from probe.shapes.world import COLOURS, render, sample_attributes, sample_scene

    cases = []
    for index in range(n_scenes):
        rng = np.random.default_rng([seed, index, 7])
        n = n_subjects[index % len(n_subjects)]
        subjects = sample_attributes(rng, n, distinct_shapes=True)
        fates = [JUDGE_STATUSES[k] for k in rng.integers(len(JUDGE_STATUSES), size=n)]
        named = [c for c, _ in subjects]
        unnamed = [c for c in COLOURS if c not in named]
        drawn = []
        for (colour, shape), fate in zip(subjects, fates):
            if fate == "present":
                drawn.append((colour, shape))
            elif fate == "mixed":
                swaps = [c for (c, _), f in zip(subjects, fates) if f == "present" and c != colour]
                choices = swaps + unnamed
                drawn.append((str(choices[int(rng.integers(len(choices)))]), shape))
        image = render(sample_scene(rng, drawn))[0]
        prompt = " and ".join(f"a {colour} {shape}" for colour, shape in subjects)
        cases.append(Case(f"scene_{index:04d}.png", image, prompt, tuple(s for _, s in subjects), tuple(fates),
                          f"{n} subjects"))
    return cases


def write_shapes_truth(folder: str | Path, n_scenes: int = 60, seed: int = 0) -> Path:
    """Write :func:`shapes_scenes` as PNG images and their ``truth.csv`` into ``folder`` (for ``probe
    judge-agreement --images FOLDER --truth FOLDER/truth.csv``); returns the CSV's path."""
    from PIL import Image

    from probe.writes import write_csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in shapes_scenes(n_scenes, seed):
        Image.fromarray(case.image).save(folder / case.name)
        rows += [{"image": case.name, "prompt": case.prompt, "subject": s, "status": t, "category": case.category}
                 for s, t in zip(case.subjects, case.truth)]
    path = folder / "truth.csv"
    write_csv(pd.DataFrame(rows), path)
    return path


def shapes_agreement(judge: Callable, n_scenes: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A judge's agreement with the truth on :func:`shapes_scenes`: (per-subject rows, :func:`agreement_table`)."""
    rows = judge_rows(judge, shapes_scenes(n_scenes, seed))
    return rows, agreement_table(rows)
