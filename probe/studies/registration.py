"""A study's design fixed before its run: ``<out>/<study>_registration.md``, a text that states the question, outcome,
arms, comparison family, pilot and power calculation, and ends in a ```json block holding the settings the run must
use (the study function's keywords) and the numbers of the power calculation.

An answer is read only from a run made at its registration's settings; any other run is exploratory, and the index
says so instead of answering (:func:`registration_problem`). ``probe study NAME --registered`` runs a study at the
settings its registration fixes, so a registered run cannot be made at another size by mistake.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path

META = ("study", "power", "pilot", "note")  # keys of the JSON block that describe the design rather than set it


def registration_path(study: str, out: str | Path = "figures") -> Path:
    """Where the registration of ``study`` lives: beside the tables it fixes."""
    return Path(out) / f"{study}_registration.md"


def read_registration(path: str | Path, study: str) -> dict:
    """The JSON block of a registration file, checked to be ``study``'s (FileNotFoundError where there is none,
    ValueError for anything else wrong)."""
    path = Path(path)
    text = path.read_text()
    block = re.search(r"```json\n(.*?)\n```", text, re.S)
    if block is None:
        raise ValueError(f"{path} holds no ```json block")
    try:
        spec = json.loads(block.group(1))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its ```json block is not JSON ({err})") from None
    if not isinstance(spec, dict) or spec.get("study") != study:
        raise ValueError(f"{path} is not a registration of the {study} study (its \"study\" is "
                         f"{spec.get('study') if isinstance(spec, dict) else spec!r})")
    return spec


def registered_settings(spec: Mapping) -> dict:
    """The study function's keywords a registration fixes: its ``settings`` object, or (the guidance study's older
    layout) every top-level key that does not describe the design (:data:`META`)."""
    if "settings" in spec:
        return dict(spec["settings"])
    return {key: value for key, value in spec.items() if key not in META}


def same_value(a: object, b: object) -> bool:
    """Equal as a registration means it: a list and a tuple of the same items are the same setting."""
    def plain(v: object) -> object:
        return tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v
    return plain(a) == plain(b)


def function_defaults(function) -> dict:
    """A study function's keyword defaults (what a run that overrides nothing runs at)."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def registration_problem(study: str, function, settings: Mapping, out: str | Path = "figures",
                         quick: bool = False) -> str | None:
    """Why a run of ``study`` (``function`` called with ``settings``) may not be read as an answer, None where it
    may: no registration, a registration that cannot be read, a quick run, or a setting that differs from the
    registered one (a size chosen after reading answers is not a test; a new size is a new registration)."""
    path = registration_path(study, out)
    if not path.is_file():
        return f"no registration ({path.name}) fixed this study's design before it ran, so its tables are exploratory"
    try:
        registered = registered_settings(read_registration(path, study))
    except ValueError as err:
        return f"its registration cannot be read: {err}"
    if quick:
        return f"this is a quick run, not the design its registration ({path.name}) fixes"
    ran = {**function_defaults(function), **settings}
    differ = [f"{key}={ran.get(key)!r} (registered {value!r})" for key, value in registered.items()
              if not same_value(ran.get(key), value)]
    if differ:
        return (f"the run differs from its registration ({path.name}): {', '.join(differ)}; an answer is read only "
                "from a run at the registered design")
    return None


def settings_for_run(study: str, function, given: Mapping, out: str | Path = "figures") -> dict:
    """The keywords ``probe study NAME --registered`` runs with: the registration's settings, where ``given``
    (``--set``) may repeat a registered value but not change it."""
    path = registration_path(study, out)
    if not path.is_file():
        raise FileNotFoundError(f"no registration of the {study} study at {path} (write its design "
                                "there first, ending in a ```json block of its settings)")
    registered = registered_settings(read_registration(path, study))
    unknown = sorted(set(registered) - set(inspect.signature(function).parameters))
    if unknown:
        raise ValueError(f"{path}: {function.__name__} has no keywords {unknown}")
    clash = [f"{key}={value!r} (registered {registered[key]!r})" for key, value in given.items()
             if key in registered and not same_value(value, registered[key])]
    if clash:
        raise ValueError(f"--set {', '.join(clash)} conflicts with {path}: a registered study runs at its registered "
                         "design (a new size is a new registration)")
    return {**given, **registered}
