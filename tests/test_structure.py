"""The package's import graph has no cycles, runs only downwards through the layers below, and nothing but the
CLI's tests imports the entry script.

Imports are read with ``ast`` (module level and inside functions alike), so a cycle hidden behind a lazy import
counts too. The layers, top to bottom (a unit imports only its own modules and units of lower layers)::

    pretrain   benchmark   comm_model   evaluation
    training   convert   generation   benchmark_baselines
    model      data      checkpoint_layout
    config     atomic    safe_load
    errors
"""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = "megatron_mobilellm"
ENTRY = f"{PACKAGE}.pretrain"
LAYERS = [{"errors"}, {"config", "atomic", "safe_load", ""}, {"model", "data", "checkpoint_layout"},
          {"training", "convert", "generation", "benchmark_baselines"},
          {"pretrain", "benchmark", "comm_model", "evaluation"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports; ``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in out if m in known}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search with an explicit stack)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.config" in graph and graph[f"{PACKAGE}.pretrain"], "the walk found no modules/imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer_of(module: str) -> int | None:
    unit = module.split(".")[1] if "." in module else ""
    return next((i for i, units in enumerate(LAYERS) if unit in units), None)


def test_imports_only_run_down_the_layers():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add their unit to LAYERS): {unplaced}"
    upward = []
    for source, targets in graph.items():
        for target in targets:
            same_unit = source.split(".")[:2] == target.split(".")[:2]
            if not same_unit and None not in (layer_of(source), layer_of(target)) and \
                    layer_of(target) >= layer_of(source):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports against the layering: " + "; ".join(sorted(upward))


def test_only_cli_tests_import_the_entry_script():
    modules = package_modules()
    scripts = sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    offenders = [str(p.relative_to(ROOT)) for p in [*modules.values(), *scripts]
                 if ENTRY in imported_modules(p, set(modules)) and module_name(p) != ENTRY]
    assert not offenders, f"{', '.join(offenders)} import {ENTRY}; import its parts from {PACKAGE}.training instead"


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in package_modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without a docstring: {', '.join(missing)}"
