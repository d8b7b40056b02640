"""The registry of studies: each study module declares its :class:`Study` at its bottom and registers it, so that a
new study is one module. :mod:`probe.studies.report` (``run_all``, the index, ``probe figures --check``) and the
command line (``probe study NAME``) read the studies from here and name none of them.

Importing :mod:`probe.studies` imports every study module, which fills the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

LAST = 1_000  # the order of a study that gives none: after the built-in ones


@dataclass(frozen=True)
class Study:
    """What the report and the command line need to know of one study.

    ``run(pipe, quick=, out=, progress=, steps=, **settings)`` is the study function (its keywords are what
    ``--set`` and ``run_all(sizes=…)`` may override); ``tables(result)`` the tables
    :func:`~probe.studies.report.run_all` writes from its result besides ``headline(result)``. ``source`` names the
    per-row table (``<out>/<source>.csv``) that ``recompute(rows, n_boot)`` turns back into the headline, so
    ``probe figures --check`` can check every headline number without making an image. ``answer(headline)`` is the
    study's answer in one sentence; ``figures`` the PNGs it draws (without suffix). ``order`` places it in
    ``run_all`` and the index (the line of argument). ``in_run_all``: ``probe figures`` runs it; a study run by
    its own commands instead (a pre-registered experiment) gives ``main(argv)``, reached as
    ``probe study NAME ARGS…``, and ``differences(out, rtol, atol)``, the lines where its committed tables disagree
    with their recomputation, and ``section(out)``, its part of ``figures/README.md`` read from its files in
    ``out`` (None before it has any). ``aliases``: other spellings the command line accepts; ``compressed``: its
    tables written gzip-compressed (:meth:`table_path`).
    """

    name: str
    title: str
    run: Callable[..., Any] | None = None
    tables: Callable[[Any], Mapping[str, pd.DataFrame]] | None = None
    headline: Callable[[Any], pd.DataFrame] | None = None
    source: str | None = None
    recompute: Callable[[pd.DataFrame, int], pd.DataFrame] | None = None
    answer: Callable[[pd.DataFrame], str] | None = None
    figures: tuple[str, ...] = ()
    order: int = LAST
    in_run_all: bool = True
    differences: Callable[[Path, float, float], list[str]] | None = None
    main: Callable[[Sequence[str] | None], int] | None = None
    section: Callable[[Path], str | None] | None = None
    aliases: tuple[str, ...] = ()
    compressed: tuple[str, ...] = ()  # tables written as <name>.csv.gz: per-step rows, over 5 MB as plain text

    def table_path(self, out: str | Path, name: str) -> Path:
        """Where this study's table ``name`` lives in ``out``."""
        return Path(out) / f"{name}.csv{'.gz' if name in self.compressed else ''}"

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a study's name is a Python identifier (it names its tables and --set keywords), "
                             f"not {self.name!r}")
        if self.in_run_all and None in (self.run, self.tables, self.headline):
            raise ValueError(f"study {self.name!r}: run_all runs it, so give run, tables and headline (or "
                             "in_run_all=False and main for a study with commands of its own)")
        if (self.source is None) != (self.recompute is None):
            raise ValueError(f"study {self.name!r}: give both source (the per-row table) and recompute (its headline "
                             "from those rows), or neither")
        if not self.in_run_all and self.main is None:
            raise ValueError(f"study {self.name!r}: a study outside run_all is run by its own main(argv); give main")


class UnknownStudy(ValueError):
    """A study name that is not registered; the message lists the registered ones."""


_REGISTRY: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add ``study`` to the registry (a module reloaded registers its study again, which replaces the old one); a
    name or alias taken by another module's study is refused."""
    for other in _REGISTRY.values():
        clash = {other.name, *other.aliases} & {study.name, *study.aliases}
        if clash and (other.name != study.name or _module(other) != _module(study)):
            raise ValueError(f"study name {sorted(clash)[0]!r} is taken by the study {other.name!r} of "
                             f"{_module(other)}; choose another")
    _REGISTRY[study.name] = study
    return study


def unregister(name: str) -> Study:
    """Remove a registered study (a test's toy study) and return it."""
    return _REGISTRY.pop(get_study(name).name)


def get_study(name: str) -> Study:
    """The study registered as ``name`` or with ``name`` as an alias (``edit``, ``self-cross``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for study in _REGISTRY.values():
        if name in study.aliases:
            return study
    raise UnknownStudy(f"unknown study {name!r}; known: {', '.join(study_names())}")


def registered_studies(in_run_all: bool | None = None) -> tuple[Study, ...]:
    """Every registered study in its ``order`` (then registration order); ``in_run_all`` keeps only those that
    ``run_all`` does (True) or does not (False) run."""
    ordered = sorted(_REGISTRY.values(), key=lambda study: study.order)  # stable: ties keep registration order
    return tuple(s for s in ordered if in_run_all is None or s.in_run_all == in_run_all)


def study_names(in_run_all: bool | None = None) -> tuple[str, ...]:
    """The names of :func:`registered_studies`."""
    return tuple(study.name for study in registered_studies(in_run_all))


def _module(study: Study) -> str:
    """The module that declared ``study`` (where its run or main function lives)."""
    return getattr(study.run or study.main, "__module__", "?")
