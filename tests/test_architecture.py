"""The layout's rules, checked on the source itself: no import cycles, no branch on a model family outside
``probe.families``, no function longer than a screenful or two."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "probe"
LONGEST = 80  # lines
LONG_ALLOWED: dict[str, str] = {}  # "module:function" → why it may be longer


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The probe modules that importing ``name`` runs first, from every import in it (in functions too, outside
    ``if TYPE_CHECKING``): the named module and each package above it that does not hold ``name`` itself (importing
    ``probe.a.b`` runs ``probe/a/__init__.py``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if _is_type_checking(node) for n in ast.walk(node)}
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        if id(node) in skipped:
            targets = targets[: len(targets) - len(node.names)]
    found = set()
    for target in targets:
        if not target.startswith("probe"):
            continue
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # the root package is always running already
            above = ".".join(parts[:i])
            if above != name and not name.startswith(above + "."):
                found.add(above)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a module path."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_cycle_finder_finds_a_cycle_through_a_package():
    graph = {"probe.a.x": {"probe.b"}, "probe.b": {"probe.b.y"}, "probe.b.y": {"probe.a"}, "probe.a": {"probe.a.x"},
             "probe.c": {"probe.a"}}
    assert cycles(graph) == [["probe.a", "probe.a.x", "probe.b", "probe.b.y"]]
    assert cycles({"probe.a": {"probe.b"}, "probe.b": set()}) == []


def test_importing_a_submodule_runs_its_package(tmp_path):
    modules = {"probe.a": tmp_path / "a/__init__.py", "probe.a.x": tmp_path / "a/x.py",
               "probe.b.y": tmp_path / "b/y.py", "probe.c": tmp_path / "c/__init__.py",
               "probe.c.z": tmp_path / "c/z.py"}
    source = tmp_path / "b" / "y.py"
    source.parent.mkdir()
    source.write_text("from probe.a.x import f\n\ndef g():\n    from probe.a import x\n\n"
                      "if TYPE_CHECKING:\n    from probe.c import z\n")
    assert _imported("probe.b.y", source, modules) == {"probe.a", "probe.a.x"}  # not probe.c: types only


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among: " + "; ".join(" ↔ ".join(c) for c in found)


FAMILY_BRANCH = re.compile(
    r"""(\.name|family)\)?\s*(==|!=|\bin)\s*[(\[{]?\s*["'](unet|sd3|flux|flux2)["']"""  # family.name == "flux"
    r"""|["'](unet|sd3|flux|flux2)["']\s*(==|!=|\bin)\s*\w*(\.name|family)"""
    r"""|__name__\s*(==|!=|\bin)\s*[(\[{]?\s*["'][^"']*(Transformer|UNet)"""  # type(net).__name__ == "Flux2…"
    r"""|isinstance\([^)]*(Transformer2DModel|UNet2DConditionModel)"""
)


def test_the_family_branch_pattern_catches_the_usual_forms():
    for line in ('if family_of(net).name == "flux":', "if family in ('sd3', 'flux'):", '"sd3" == family_of(n).name',
                 'if type(net).__name__ == "Flux2Transformer2DModel":', "isinstance(net, FluxTransformer2DModel)"):
        assert FAMILY_BRANCH.search(line), line
    assert not FAMILY_BRANCH.search('stage = "unet"') and not FAMILY_BRANCH.search("if family.flow:")


def test_no_branch_on_a_family_outside_families():
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if "families" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1) if FAMILY_BRANCH.search(line)]
    assert not found, "\n".join(found)


def long_functions() -> list[str]:
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST and f"{name}:{node.name}" not in LONG_ALLOWED:
                    found.append(f"{name}:{node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    found = long_functions()
    assert not found, "split these: " + ", ".join(found)


MOVED = {"probe.tap.unet": "probe.families.unet", "probe.tap.joint": "probe.families.sd3",
         "probe.tap.flux": "probe.families.flux", "probe.sweeps": "probe.record.sweep",
         "probe.inversion": "probe.steer.inversion", "probe.edit": "probe.steer.edit",
         "probe.intervene": "probe.steer.intervene", "probe.guide": "probe.steer.guide",
         "probe.pipelines": "probe.steer.pipelines", "probe.maps": "probe.analysis.maps",
         "probe.overlap": "probe.analysis.overlap", "probe.stats": "probe.analysis.stats",
         "probe.probes": "probe.analysis.probes", "probe.lazy": "probe.analysis.lazy",
         "probe.explore": "probe.ui.explore", "probe.lab": "probe.ui.lab"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_still_import_with_a_warning(old):
    import importlib
    import sys

    import probe

    new, leaf = MOVED[old], old.rpartition(".")[2]
    moved = importlib.import_module(new)
    public = [name for name in dir(moved) if not name.startswith("_")]
    on_package = getattr(probe, leaf, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        if type(sys.modules.get(old)).__name__ != "_MovedExplore":  # a file: warns when imported
            sys.modules.pop(old, None)
        module = importlib.import_module(old)
        names = {name: getattr(module, name) for name in public}  # the registered old path warns on reading
    assert public and all(names[name] is getattr(moved, name) for name in public)
    if old == "probe.explore":
        assert probe.explore is on_package and callable(probe.explore)  # still the function


def test_nothing_in_probe_imports_an_old_path():
    found = {name: sorted(set(imported) & set(MOVED)) for name, imported in import_graph().items()
             if name not in MOVED and set(imported) & set(MOVED)}
    assert not found, found


def test_no_module_takes_another_modules_private_names():
    """A name with a leading underscore is its module's own; one that others need is public, with a docstring."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("probe"):
                found += [f"{name} takes {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
