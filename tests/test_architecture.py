"""The package layout keeps its one direction (docs/architecture.md).

Imports flow one way: rules <- planning <- loading <- api <- cli, with sources and report used from
below; errors, files and meta are what everyone shares. Each unit (a package under
src/remap/, or a top-level module) may import, at module level, only the units before it in
LAYERS. An import inside a function runs late and is not counted (``Plan.apply`` reaches the
engine that way); imports under ``if TYPE_CHECKING:`` name types only and are not counted for
the direction, but they are for circles, as ../shared/tools/import_circles.py counts them.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import remap

SRC = Path(remap.__file__).resolve().parent

LAYERS = ["errors", "exports", "collector", "files", "meta", "report", "sources", "rules", "planning", "loading", "verifying", "exporting", "diffing", "api", "cli"]
TOP = {"__init__", "__main__"}  # may import anything; nothing but cli and __main__ may import them


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(path: Path, *, type_checking: bool):
    """(line, text, imported module) for the imports that run when the module is imported."""
    module = next(m for m, p in MODULES.items() if p == path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    text = path.read_text(encoding="utf-8")

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # late: runs when called
            if isinstance(node, ast.If) and _is_type_checking(node):
                if type_checking:
                    yield from visit(node.body)
                yield from visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield node.lineno, ast.get_source_segment(text, node), a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                seg = ast.get_source_segment(text, node)
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
                for t in subs or [target]:  # `from . import ops` depends on ops, not on the package
                    yield node.lineno, seg, t
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from visit(getattr(node, field, []) or [])

    yield from visit(ast.parse(text).body)


def test_every_module_has_a_place():
    units = {_unit(m) for m in MODULES}
    unknown = sorted(units - set(LAYERS) - TOP)
    assert not unknown, f"src/remap units with no place in LAYERS: {unknown} (add them where they belong)"


def test_imports_flow_one_way():
    wrong = []
    for module, path in MODULES.items():
        unit = _unit(module)
        if unit in TOP or unit not in LAYERS:
            continue
        may = set(LAYERS[: LAYERS.index(unit)]) | {unit}
        for line, text, target in _module_level_imports(path, type_checking=False):
            if not (target == "remap" or target.startswith("remap.")):
                continue
            to = _unit(target)
            if to == "__init__" and unit in ("cli",) or to in may:
                continue
            rel = path.relative_to(SRC.parent)
            wrong.append(f"{rel}:{line}: `{text}` — {unit} may not import {to} at module level "
                         f"(it may import {', '.join(LAYERS[: LAYERS.index(unit)]) or 'nothing'}; "
                         f"import late, inside the function, or move the code down)")
    assert not wrong, "imports against the flow rules <- planning <- loading <- api <- cli:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, _, target in _module_level_imports(path, type_checking=True):
            if target in MODULES and target != module:
                graph[module].add(target)
    index, low, stack, on, circles = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
            # a package __init__ re-exporting its children is no circle of logic
            if sum(1 for m in comp if MODULES[m].name != "__init__.py") > 1:
                circles.append(" <-> ".join(sorted(comp)))

    for v in graph:
        if v not in index:
            strong(v)
    assert not circles, "import circles (module-level imports): " + "; ".join(circles)


@pytest.mark.parametrize("unit", [u for u in LAYERS if (SRC / u).is_dir()])
def test_every_package_says_what_it_owns_and_may_import(unit):
    doc = importlib.import_module(f"remap.{unit}").__doc__ or ""
    assert "May import" in doc, f"remap/{unit}/__init__.py: the docstring says what the package owns and may import"


def test_public_names_survive_every_import():
    for info in pkgutil.walk_packages(remap.__path__, "remap."):
        if info.name != "remap.__main__":
            importlib.import_module(info.name)
    from remap import api

    assert remap.plan is api.plan and callable(remap.plan)
    assert remap.diff is sys.modules["remap.diffing.alignment"].diff and callable(remap.diff)
    for name in ("load", "Plan", "Report", "Rules", "make_plan", "parse_rules", "load_rules", "RemapError", "align"):
        assert getattr(remap, name) is not None


def test_old_paths_still_import():
    from remap.report import Report
    from remap.rules import Rules, load_rules, parse_rules  # noqa: F401
    from remap.sources import open_source  # noqa: F401

    assert Report.__module__ == "remap.report.records" and Rules.__module__ == "remap.rules.parse"
    for old, new in getattr(remap, "_OLD_PATHS", {}).items():
        module = importlib.import_module(old)
        for name in getattr(importlib.import_module(new), "__all__", ()):
            assert getattr(module, name) is getattr(sys.modules[new], name), f"{old}.{name}"
