"""Imports flow one way: ``convert`` / CLI -> ``k25jax`` -> ``pallas_kernels``, with no cycles.

Every module of ``k25jax`` and ``pallas_kernels`` is read with ``ast`` (imports inside functions included, since a
lazy import is still a dependency) and the module graph is checked for imports of ``convert`` and for cycles.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ("k25jax", "pallas_kernels")


def module_files(packages=LIBRARY) -> dict[str, pathlib.Path]:
    files = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules ``name`` imports (absolute names; ``from pkg import sub`` resolves to ``pkg.sub`` when that is a
    module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in known else module)
    return out


def import_graph(packages=LIBRARY) -> dict[str, set[str]]:
    files = module_files(packages)
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as a list of names, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in graph or dep == node:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_library_never_imports_convert():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d == "convert" or d.startswith("convert.")) for m, deps in graph.items()}
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"library modules import the converter package: {offenders}"


def test_pallas_kernels_never_import_k25jax():
    graph = import_graph()
    offenders = {
        m: sorted(d for d in deps if d.split(".")[0] == "k25jax") for m, deps in graph.items() if m.startswith("pallas")
    }
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"pallas_kernels imports k25jax: {offenders}"


def test_no_import_cycles():
    graph = import_graph()
    # The package __init__ re-exports its modules; a module importing a sibling through the package is fine as
    # long as that sibling does not import back. Cycles through an __init__ are cycles all the same.
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"numpy"}, "c": {"a"}}, None),
    ],
)
def test_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_graph_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from convert import keymap\n    from . import b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph(("pkg",))
    assert graph["pkg.a"] == {"convert", "pkg.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
