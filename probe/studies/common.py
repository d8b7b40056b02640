"""What every study shares: constants, chunked recording, the judge's verdict, resumable per-image rows."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from probe.analysis.stats import clustered_bootstrap
from probe.models import BUILTIN
from probe.shapes.judge import confident, detect
from probe.shapes.judge import judge as exact_judge
from probe.tap import attention_layers
from probe.writes import save_figure, write_csv

CHUNK = 16  # samples recorded and reduced at a time
TARGET_GRID = 16  # the overlap study measures at the cross-attention grid closest to this
BOOTSTRAPS = 1000
CONFIDENCE = 0.95
QUICK_BOOTSTRAPS = 200
DPI = 130
TABLE_FLOAT_FORMAT = "%.6g"  # six significant digits: exact enough for every statistic, and the per-image-per-step
QUICK_STEPS = 20  # denoising steps of every quick study (fewer when the caller asks for fewer)


Subject = Literal["noun", "colour", "phrase"]
Judge = Callable[[np.ndarray, str], list]

# tables of a full-size study stay a few MB instead of twice that with 17-digit floats


# -- shared helpers ------------------------------------------------------------------------------------------------


def subject_word(colour: str, shape: str, subject: Subject = "noun") -> str:
    """The words whose map stands for a subject: its noun (default), its colour word, or both."""
    return {"noun": shape, "colour": colour, "phrase": f"{colour} {shape}"}[subject]


def sample_chunks(prompts: Sequence[str], seeds: Sequence[int], size: int = CHUNK):
    """(prompts, seeds) pieces whose product (what ``record`` generates) has at most ``size`` samples."""
    if len(seeds) >= size:
        for prompt in prompts:
            for start in range(0, len(seeds), size):
                yield [prompt], list(seeds[start : start + size])
    else:
        per = max(1, size // len(seeds))
        for start in range(0, len(prompts), per):
            yield list(prompts[start : start + per]), list(seeds)


def save_figures(figures: dict, out: str | Path | None) -> dict[str, Path]:
    if out is None:
        return {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out / f"{name}.png"
        save_figure(fig, paths[name], dpi=DPI)
    return paths


def rows_path(out: str | Path | None, table: str) -> Path | None:
    """Where a long study keeps its per-image rows as it goes (:class:`ImageRows`): its own table in ``out``."""
    return None if out is None else Path(out) / f"{table}.csv"


def recorded_samples(tree) -> tuple[list[str], list[int], np.ndarray]:
    images = tree["images"]
    return [str(p) for p in images["prompt"].values], [int(s) for s in images["seed"].values], images["image"].values


def nearest_grid(pipe, target: int = TARGET_GRID) -> int:
    """The cross-attention grid (height) closest to ``target``; the larger one on a tie."""
    grids = {layer.grid[0] for layer in attention_layers(pipe) if layer.kind == "cross"}
    return min(grids, key=lambda g: (abs(g - target), -g))


def judged(image: np.ndarray, prompt: str, judge: Judge = exact_judge) -> dict:
    """The judge's verdict on one image, and two quality proxies.

    ``quality``: mean judge confidence (template fit × shape margin × colour purity, 0–1) of the objects the judge
    tied to the prompt's subjects; NaN where it tied none. ``precision``: the share of the objects found in the
    image that stand for some subject (1 − the share of stray objects); only with the exact judge, else NaN; objects
    are the detections at or above the judge's minimum confidence (fainter ones are no objects to it).
    ``confidences``: per subject, in order, the confidence of the object behind its status ("0.812;" for a present
    subject and a missing one), so that a higher minimum confidence can be applied to a stored table later.
    """
    detections = confident(detect(image)) if judge is exact_judge else None
    statuses = judge(image, prompt) if detections is None else exact_judge(image, prompt, detections=detections)
    names = [s.status for s in statuses]
    behind = [getattr(s, "detection", None) if s.status != "missing" else None for s in statuses]
    found = [d for d in behind if d is not None]
    used = {id(d) for d in found}
    return {
        "statuses": ",".join(names), "n_subjects": len(names), "missing": "missing" in names,
        "n_missing": names.count("missing"), "mixed": "mixed" in names, "n_mixed": names.count("mixed"),
        "all_present": all(n == "present" for n in names),
        "quality": float(np.mean([d.confidence for d in found])) if found else math.nan,
        "precision": len(used) / len(detections) if detections else math.nan,
        "confidences": ";".join("" if d is None else f"{d.confidence:.3f}" for d in behind),
    }


def settings_id(**settings) -> str:
    """A short hash of the settings that decide an image's row (model weights, steps, schedule, judge, …)."""
    import hashlib

    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()[:12]


def step_key(step: float) -> str:
    """A step size as a key holds it: NaN (no guidance) equal to NaN, and a value read back from a table (six
    significant digits) equal to the one it was made at."""
    return f"{float(step):.6g}"


class ImageRows:
    """The per-image rows of a long study, kept in a CSV as they are made, so that a stopped run resumes.

    Rows whose ``settings_id`` matches are reused by key (prompt, seed, method, initno); new rows are written out
    every :data:`FLUSH_SECONDS` and at the end, the current run's rows first, in job order, then any other rows
    made with the same settings (from a larger run), which are kept. Rows of other settings are never lost: they move
    to a table of their own beside it, ``<name>.settings-<id>.csv`` (one per settings id), before anything is made,
    and a run with those settings again takes them back from there.
    ``path=None`` keeps nothing on disk. ``by_step``: a row's key also holds its ``step_size`` (a step-size pilot keeps
    one image per candidate step of the same prompt, seed and method)."""

    FLUSH_SECONDS = 30.0

    def __init__(self, path: str | Path | None, settings: str, order: Sequence[tuple] = (), by_step: bool = False):
        self.path, self.settings, self.by_step = (Path(path) if path is not None else None), settings, by_step
        self.rows: dict[tuple, dict] = {}
        if self.path is not None and self._aside(settings).is_file():  # rows of these settings set aside before
            for row in pd.read_csv(self._aside(settings), dtype={"settings_id": str}).to_dict("records"):
                self.rows[self.key(row)] = row
        if self.path is not None and self.path.is_file():
            table = pd.read_csv(self.path, dtype={"settings_id": str})
            ours = table["settings_id"] == settings if "settings_id" in table else pd.Series(False, table.index)
            for row in table[ours].to_dict("records"):
                self.rows[self.key(row)] = row
            if other := int((~ours).sum()):  # say why a resumed study makes its images again
                kept = self._set_aside(table)
                warnings.warn(f"{self.path}: {other} of {len(table)} stored rows were made with other settings "
                              "(model weights, steps, schedule, judge, …); they are kept in "
                              f"{', '.join(p.name for p in kept)} and this run makes its own", stacklevel=3)
        restored = self.path is not None and self._aside(settings).is_file()
        self.order, self.saved_at = list(order), time.monotonic()
        self.unsaved = restored or list(self.rows) != self._ordered()  # rows merged from shards: job order again

    def _aside(self, settings: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.settings-{settings}{self.path.suffix}")

    def _set_aside(self, table: pd.DataFrame) -> list[Path]:
        """Move the rows of other settings into their own tables (merged with rows set aside before), then drop
        them from this one: each write is whole or nothing, so a kill in between loses no row."""
        ids = table["settings_id"].fillna("unknown") if "settings_id" in table else pd.Series("unknown", table.index)
        kept = []
        for other, rows in table[ids != self.settings].groupby(ids[ids != self.settings]):
            path = self._aside(other)
            before = pd.read_csv(path, dtype={"settings_id": str}) if path.is_file() else rows.iloc[:0]
            write_csv(pd.concat([before, rows]).drop_duplicates(), path, float_format=TABLE_FLOAT_FORMAT)
            kept.append(path)
        write_csv(table[ids == self.settings], self.path, float_format=TABLE_FLOAT_FORMAT)
        return kept

    def key(self, row: dict) -> tuple:
        key = str(row["prompt"]), int(row["seed"]), str(row["method"]), bool(row["initno"])
        return (*key, step_key(row["step_size"])) if self.by_step else key

    def get(self, key: tuple) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = {**row, "settings_id": self.settings}
        self.unsaved = True
        if time.monotonic() - self.saved_at > self.FLUSH_SECONDS:
            self.save()

    def _ordered(self) -> list[tuple]:
        """The rows' keys as the table keeps them: this run's in job order, then the others as they came."""
        ordered = [k for k in self.order if k in self.rows]
        first = set(ordered)  # once, not per row: a full-size table has thousands of rows
        return ordered + [k for k in self.rows if k not in first]

    def save(self) -> None:
        if self.path is None or not self.unsaved:
            return
        write_csv(pd.DataFrame([self.rows[k] for k in self._ordered()]), self.path, float_format=TABLE_FLOAT_FORMAT)
        self.unsaved, self.saved_at = False, time.monotonic()

    def keep_this_run(self) -> None:
        """Leave this run's rows alone in the table, as its headline is computed from them (and ``probe figures
        --check`` recomputes it from the table); rows of the same settings from other runs (other seeds, other
        methods) move beside it to ``<name>.settings-<id>.csv``, from where a later run with these settings takes
        them back. Written beside first, so a kill in between loses no row."""
        self.save()
        ours = set(self.order)
        others = [self.rows[k] for k in self._ordered() if k not in ours]
        if self.path is None or not others:
            return
        write_csv(pd.DataFrame(others), self._aside(self.settings), float_format=TABLE_FLOAT_FORMAT)
        write_csv(pd.DataFrame([self.rows[k] for k in self.order if k in self.rows]), self.path,
                  float_format=TABLE_FLOAT_FORMAT)


def as_written(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` as a study writes it and reads it back (six significant digits): what a headline is computed from,
    so that ``probe figures --check`` recomputes the same numbers from the stored table (a bootstrap's percentile can
    move with the last digits of tied values)."""
    import io

    return pd.read_csv(io.StringIO(table.to_csv(index=False, float_format=TABLE_FLOAT_FORMAT)))


def cell_differences(label: str, kept: pd.DataFrame, fresh: pd.DataFrame, rtol: float = 1e-4, atol: float = 1e-6
                     ) -> list[str]:
    """Where a committed table disagrees with the same table recomputed (``probe figures --check``): ``fresh`` is
    written and read back as the study writes it (six significant digits, hence the tolerances); one line per
    differing cell."""
    fresh = as_written(fresh)
    if list(kept.columns) != list(fresh.columns) or len(kept) != len(fresh):
        return [f"{label}: columns or rows differ ({len(kept)} rows kept, {len(fresh)} recomputed)"]
    problems = []
    for column in kept.columns:
        a, b = kept[column], fresh[column]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            same = np.isclose(a.astype(float), b.astype(float), rtol=rtol, atol=atol, equal_nan=True)
        else:
            same = ((a.astype(str) == b.astype(str)) | (a.isna() & b.isna())).to_numpy()
        problems += [f"{label} row {i} {column}: kept {a[i]!r}, recomputed {b[i]!r}" for i in np.flatnonzero(~same)]
    return problems

def mean_interval(values, clusters=None, n_boot: int = BOOTSTRAPS, confidence: float = CONFIDENCE, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Mean of ``values`` (a rate for booleans, a paired difference for differences) and its percentile bootstrap
    interval, whole ``clusters`` (prompts) resampled (default: each value its own); NaN for no values. Rounded to
    12 decimals, so an exact zero difference does not print as -1.7e-18 or -0."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    clusters = np.arange(values.size) if clusters is None else np.asarray(clusters)
    found = clustered_bootstrap(values, clusters, n_boot, confidence, seed)
    return tuple(round(float(v), 12) + 0.0 for v in found)  # + 0.0: no "-0"


def model_label(pipe) -> str:
    """Which model a study ran on: its folder (relative to the project when inside it) and, for a model this
    project trained, its UNet step count, so that figures made at different times say what they stand on."""
    source = str(getattr(pipe, "name_or_path", "") or "")
    if not source:
        return "a pipeline built in memory"
    path = BUILTIN.get(source, Path(source))
    try:
        shown = str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        shown = source
    record = path / "training.json"
    if record.is_file():
        return f"{shown} ({json.loads(record.read_text())['unet_steps']:,} UNet steps)"
    return shown
