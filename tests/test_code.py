"""The code's shape, read from its source: imports run one way, and every function fits on one screen."""

from __future__ import annotations

import ast
import os

import pytest

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
SCREEN = 60  # lines


def tree(module: str) -> ast.Module:
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        return ast.parse(f.read())


def imports(module: str) -> set[str]:
    """The repository's modules `module` imports anywhere: at its top or inside a function."""
    found = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of modules that leads back to its first one, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_imports_run_one_way():
    graph = {m: imports(m) for m in MODULES}
    assert {"basic_block", "resnet", "data", "config", "runs", "train"} <= set(graph)  # the scan sees the modules
    assert "runs" in graph["train"] and "resnet" in graph["runs"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    assert graph["hardware"] == set() and graph["basic_block"] == set()  # the bottom imports none of ours


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", MODULES)
def test_every_function_fits_on_one_screen(module):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree(module)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > SCREEN]
    assert not long, f"{module}.py: " + ", ".join(long)
