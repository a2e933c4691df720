"""The package's layers: every import (lazy ones included) points down, and no modules import each
other in a circle, so a reader can follow the imports from the command line to the loss."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import weighted_mtp

SOURCE = Path(weighted_mtp.__file__).parent

# lowest first; a unit may import only units before it (a unit is a subpackage or top-level module)
LAYERS = [
    {"errors", "io", "redact", "__init__"},
    {"config", "plots"},
    {"losses"},
    {"models"},
    {"data"},
    {"weighting"},
    {"objectives", "tracking"},
    {"train", "eval"},
    {"demo", "study"},
    {"commands"},
    {"cli"},
    {"__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """Every module's imports of other weighted_mtp modules, wherever in the file they are."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SOURCE.rglob("*.py"):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weighted_mtp"):
                graph[module].add(node.module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name.startswith("weighted_mtp"))
    return graph


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in SOURCE.rglob("*.py")}
    assert units <= set().union(*LAYERS), units - set().union(*LAYERS)


def test_imports_point_down_the_layers():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    upward = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if unit_of(target) != unit_of(module) and layer[unit_of(target)] >= layer[unit_of(module)]
    ]
    assert not upward


def test_no_modules_import_each_other_in_a_circle():
    graph = imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target.startswith(module + "."):  # a package and its own modules
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles
