"""Every study at once: figures, tables and the index that says what each ran on and how to rerun it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from probe.models import BUILTIN, load
from probe.studies.answers import section_texts
from probe.studies.common import (
    BOOTSTRAPS,
    QUICK_BOOTSTRAPS,
    QUICK_STEPS,
    TABLE_FLOAT_FORMAT,
    cell_differences,
    model_label,
)
from probe.studies.registration import registration_path, registration_problem
from probe.studies.registry import Study, UnknownStudy, get_study, registered_studies, study_names
from probe.writes import write_csv, write_text

_VIEWS = {  # the names these views had as dicts of their own, now read from the registry when asked
    "STUDIES": lambda: study_names(in_run_all=True),
    "STUDY_TITLES": lambda: {s.name: s.title for s in registered_studies()},
    "STUDY_FIGURES": lambda: {s.name: s.figures for s in registered_studies()},
    "HEADLINE_SOURCES": lambda: {s.name: (s.source, s.recompute) for s in registered_studies() if s.source},
    "STUDY_FUNCTIONS": lambda: {s.name: s.run for s in registered_studies(in_run_all=True)},
    "ANSWERS": lambda: {s.name: s.answer for s in registered_studies() if s.answer},
}


def __getattr__(name: str):
    """``STUDIES``, ``STUDY_TITLES``, ``STUDY_FIGURES``, ``HEADLINE_SOURCES``, ``STUDY_FUNCTIONS``, ``ANSWERS``:
    read-only views of :mod:`probe.studies.registry`, made when asked (so a study registered later is in them)."""
    if name in _VIEWS:
        return _VIEWS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recompute_headlines(out: str | Path = "figures") -> dict[str, pd.DataFrame]:
    """Each study's headline recomputed from the per-image (per-probe for the probes) table in ``out``, with the
    bootstrap size its run used (``timing.csv`` says whether it was quick): what a reader can check without making
    a single image."""
    out = Path(out)
    timing = pd.read_csv(out / "timing.csv")
    headlines = {}
    for row in timing.itertuples(index=False):
        study = get_study(row.study)
        if study.source is None:
            continue  # a study whose headline is not recomputed from rows (its own differences check it)
        path = study.table_path(out, study.source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the {row.study} study's rows, which its headline is computed from")
        table = pd.read_csv(path, dtype={"settings_id": str})
        headlines[row.study] = study.recompute(table, QUICK_BOOTSTRAPS if row.quick else BOOTSTRAPS)
    return headlines


def reanalyse(out: str | Path = "figures", studies: Sequence[str] | None = None) -> list[str]:
    """Each study's headline written again from its per-image table in ``out`` with today's analysis, and the index
    after them: a change of analysis (outcome categories, comparison groups, clustering) reaches the committed
    figures without making an image. The images keep the verdicts they were judged with. Returns the studies
    rewritten."""
    out = Path(out)
    fresh = recompute_headlines(out)
    chosen = [name for name in fresh if studies is None or name in studies]
    unknown = sorted(set(studies or ()) - set(fresh))
    if unknown:
        raise UnknownStudy(f"no per-image table to reanalyse for {unknown}; these have one: {sorted(fresh)}")
    for name in chosen:
        write_csv(fresh[name], out / f"headline_{name}.csv", float_format=TABLE_FLOAT_FORMAT)
    write_index(out)
    return chosen


def headline_differences(out: str | Path = "figures", rtol: float = 1e-4, atol: float = 1e-6) -> list[str]:
    """Where a committed ``headline_<study>.csv`` in ``out`` disagrees with :func:`recompute_headlines` (the
    tables are written to six significant digits, hence the tolerances): one line per differing cell, none when every
    number reproduces. Studies with a check of their own (a pre-registered experiment's analysed tables) give it as
    their ``differences``; it runs first."""
    out = Path(out)
    problems = [line for study in registered_studies() if study.differences is not None
                for line in study.differences(out, rtol, atol)]
    for study, fresh in recompute_headlines(out).items():
        problems += cell_differences(study, pd.read_csv(out / f"headline_{study}.csv"), fresh, rtol, atol)
    return problems


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table; floats to three significant digits."""
    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def study_command(study: str, out: str | Path, quick: bool, settings: dict, model: str | None = None) -> str:
    """The ``probe study`` command line that reruns one study with the same settings (and ``model``, where it is
    not the built-in one)."""
    parts = ["probe study", study, "--out", str(out)] + (["--quick"] if quick else [])
    if model and model not in ("shapes", str(BUILTIN["shapes"])):
        parts += ["--model", model]
    for key, value in settings.items():
        if key == "model":
            parts += ["--model", str(value)]
        elif key == "judge":  # a judge given as --judge SPEC (probe.judges.judge_from_spec); kept as judge(SPEC)
            parts += ["--judge", re.sub(r"^judge\((.*)\)$", r"\1", str(value))]
        elif key == "sets":
            parts += ["--prompts", *(value if isinstance(value, (list, tuple)) else [value])]
        else:
            quoted = isinstance(value, (tuple, list, str, dict))
            parts += ["--set", f'"{key}={value!r}"' if quoted else f"{key}={value}"]
    return " ".join(parts)


def _text(row, name: str) -> str | None:
    value = getattr(row, name, None)
    return value if isinstance(value, str) and value else None


def write_index(out: str | Path) -> Path:
    """``out/README.md``: each study present in ``timing.csv``, what it ran on, its rerun command, figures, its
    answer in one sentence (:mod:`probe.studies.answers`), the paragraphs the study registered for its section
    (:func:`~probe.studies.answers.section_texts`: its Holm families, how its size was fixed) and headline table,
    all read back from the files the studies wrote (so it never disagrees with them)."""
    out = Path(out)
    timing = pd.read_csv(out / "timing.csv")
    parts = ["# Figures and tables of the studies", "",
             "Written by `probe figures` / `probe study` from the tables beside this file. `probe figures` reruns "
             "every study at full size (hours on a CPU), `probe figures --quick` at reduced sizes; each section "
             "gives the command that reruns that study as it was run here."]
    for row in timing.itertuples(index=False):
        settings = json.loads(row.settings) if isinstance(row.settings, str) and row.settings else {}
        model = getattr(row, "model", None)
        model = model if isinstance(model, str) else "not recorded"
        study = get_study(row.study)
        problem = registration_problem(row.study, study.run, settings, out, bool(row.quick))
        command = (f"probe study {row.study} --out {out} --registered" if problem is None else
                   study_command(row.study, out, bool(row.quick), settings, _text(row, 'model_path')))
        parts += ["", f"## {study.title}", "",
                  f"Model: {model}. Sizes: the {'quick' if row.quick else 'full'} defaults"
                  + (", with " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) if settings else "")
                  + f". {row.seconds / 60:.1f} min of computation on this machine (summed over its processes).", "",
                  f"```\n{command}\n```", ""]
        parts += [f"![{name}]({name}.png)" for name in study.figures if (out / f"{name}.png").exists()]
        registered = registration_path(row.study, out)
        if registered.is_file():
            parts += ["", f"Registration (written before its run): [{registered.name}]({registered.name})."]
        headline = out / f"headline_{row.study}.csv"
        table = pd.read_csv(headline) if headline.exists() else None
        if table is not None and len(table) and study.answer is not None:
            answer = study.answer(table)
            if problem is None or answer.startswith("Not answered"):
                parts += ["", f"**Answer.** {answer}"]
            else:
                parts += ["", f"**Not answered:** {problem}. What the table shows, read as exploration: {answer}"]
        parts += [line for text in section_texts(study.name, table) for line in ("", text)]
        if table is not None:
            parts += ["", _markdown(table)]
    for study in registered_studies():  # studies run by their own commands write their own sections
        text = study.section(out) if study.section is not None else None
        parts += ["", text] if text else []
    path = out / "README.md"
    return write_text(path, "\n".join(parts) + "\n")


def _write_tables(tables: dict[str, pd.DataFrame], out: Path, study: Study | None = None) -> None:
    for name, table in tables.items():
        path = study.table_path(out, name) if study is not None else out / f"{name}.csv"
        write_csv(table, path, float_format=TABLE_FLOAT_FORMAT)


RUN_ALL_KEYWORDS = ("quick", "out", "progress")  # what run_all (and the command line's own options) set itself
_ANNOTATION_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
                     "Path": (str, Path)}
_GENERIC_TYPES = {"Sequence": (list, tuple), "tuple": (tuple, list), "list": (list, tuple), "Mapping": (dict,),
                  "dict": (dict,)}


def _accepted_types(annotation) -> tuple[type, ...] | None:
    """The Python types a study keyword's annotation (a string: the studies use postponed annotations) admits, or
    None where it names a type of its own (Judge, Schedule …) that is not checked here."""
    if not isinstance(annotation, str):
        return None
    accepted: list[type] = []
    for part in (p.strip() for p in annotation.split("|")):
        base = part.split("[", 1)[0]
        found = _ANNOTATION_TYPES.get(part) or _GENERIC_TYPES.get(base)
        if found is None:
            return None
        accepted += found
    return tuple(accepted)


def _run_all_study(name: str) -> Study:
    """The registered study ``name`` that :func:`run_all` runs (the others have commands of their own)."""
    study = get_study(name)
    if not study.in_run_all:
        raise UnknownStudy(f"the {study.name} study is not run by run_all and takes no settings here; it has commands "
                           f"of its own: probe study {study.name} --help")
    return study


def check_settings(study: str, settings: dict) -> dict:
    """Keywords for a study function (``sizes`` of :func:`run_all`, ``--set`` of ``probe study``), checked before
    any model loads: a misspelt keyword would otherwise fail only as Python's "unexpected keyword", and a word
    given where a number is expected only deep inside the study. Unknown keywords are refused with the function's
    keywords and the closest matches; a value of the wrong kind (``n_images='abc'``) with the kind expected."""
    import difflib
    import inspect

    function = _run_all_study(study).run
    params = {k: p for k, p in inspect.signature(function).parameters.items() if k != "pipe"}
    for key, value in settings.items():
        if key in RUN_ALL_KEYWORDS:
            raise ValueError(f"{key!r} is not a setting to override: it is set by run_all's own {key}= (on the "
                             f"command line: --{key})")
        if key not in params:
            keywords = [k for k in params if k not in RUN_ALL_KEYWORDS]
            close = difflib.get_close_matches(key, keywords, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"{function.__name__} has no keyword {key!r}; {hint}its keywords are "
                             f"{', '.join(keywords)}")
        accepted = _accepted_types(params[key].annotation)
        if accepted is not None and (not isinstance(value, accepted)
                                     or (isinstance(value, bool) and bool not in accepted)):
            raise ValueError(f"{key}={value!r}: {function.__name__}'s {key} takes {params[key].annotation} (default "
                             f"{params[key].default!r}), not {type(value).__name__}")
    return dict(settings)


def study_keywords(quick: bool, out: str | Path, progress: bool, settings: dict) -> dict:
    """The keywords a study function is called with by :func:`run_all` (a shard of it, too: the same images)."""
    return {"quick": quick, "out": Path(out), "progress": progress, **({"steps": QUICK_STEPS} if quick else {}),
            **settings}


def run_all(pipe, quick: bool = False, out: str | Path = "figures", sizes: dict[str, dict] | None = None,
            progress: bool = True, only: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Every study from its fixed seeds; every figure (PNG) and table (CSV) into ``out``; the headline tables.

    Studies: those registered to run here (:func:`~probe.studies.registry.registered_studies`: linear probes,
    overlap vs missing, editing, guidance, self-cross mixing), in their order; ``README.md`` indexes them
    (:func:`write_index`). ``quick`` runs each at its quick size with :data:`QUICK_STEPS` steps. ``sizes``: per
    study (a name of :data:`STUDIES`), keyword arguments that override its defaults, e.g.
    ``{"guidance": {"n_images": 2, "steps": 3}}``. ``only``: run just these studies (earlier rows of ``timing.csv``
    for the other studies are kept). Returns the headline table of each study and ``timing`` (seconds per study,
    counting the images an earlier run made where a study resumed; its ``quick`` flag and ``sizes`` overrides),
    which are written as ``headline_<study>.csv`` and ``timing.csv``.
    """
    sizes = dict(sizes or {})
    unknown = [name for name in {**sizes, **dict.fromkeys(only or ())} if name not in study_names(in_run_all=True)]
    if unknown:
        raise ValueError(f"unknown studies {sorted(unknown)}; known: {list(study_names(in_run_all=True))}"
                         + "".join(f"; {name} is run by its own commands: probe study {name} --help"
                                   for name in unknown if name in study_names(in_run_all=False)))
    for name, settings in sizes.items():
        check_settings(name, settings)
    pipe = load(pipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def kwargs(name: str) -> dict:
        return study_keywords(quick, out, progress, sizes.get(name, {}))

    headlines, timing = {}, []
    for study in registered_studies(in_run_all=True):
        name = study.name
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        result = study.run(pipe, **kwargs(name))
        headlines[name] = study.headline(result)
        _write_tables({**study.tables(result), f"headline_{name}": headlines[name]}, out, study)
        plt.close("all")
        reused = getattr(result, "images", pd.DataFrame()).attrs.get("reused_seconds", 0.0)  # earlier runs' images
        timing.append({"study": name, "seconds": time.perf_counter() - start + reused, "quick": quick,
                       "settings": json.dumps(sizes.get(name, {}), default=str), "model": model_label(pipe),
                       "model_path": str(getattr(pipe, "name_or_path", "") or "")})
    headlines["timing"] = pd.DataFrame(timing)
    earlier = out / "timing.csv"
    if only is not None and earlier.exists():  # keep the other studies' rows of an earlier run
        kept = pd.read_csv(earlier)
        kept = kept[~kept.study.isin(headlines["timing"].study)]
        order = {name: i for i, name in enumerate(study_names())}
        merged = pd.concat([kept, headlines["timing"]], ignore_index=True)
        headlines["timing"] = merged.sort_values("study", key=lambda c: c.map(order)).reset_index(drop=True)
    _write_tables({"timing": headlines["timing"]}, out)
    write_index(out)
    return headlines
