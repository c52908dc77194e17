"""The package's imports flow one way: no two modules, and no two folders of astra_ds, import each other, directly or
through others (imports inside functions count: they run too). Registries name their entries as text
("module:attribute", astra_ds/choices.py), which is how a lower module reaches a chosen component."""

import ast
from pathlib import Path

import astra_ds

PACKAGE = Path(astra_ds.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """astra_ds module -> the astra_ds modules it imports."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from astra_ds import labels` imports the package astra_ds.labels
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _room(module: str) -> str:
    """The folder (astra_ds/training/...) or top-level module a module belongs to."""
    return ".".join(module.split(".")[:2])


def test_no_two_modules_import_each_other():
    assert _cycles(_imports()) == []


def test_no_two_folders_import_each_other():
    rooms: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    assert _cycles(rooms) == []


def test_training_and_the_model_below_it_import_no_serving():
    """The HTTP wing (serve/) sits on top: training, the run directory and the loaded model do not need it."""
    for module, targets in _imports().items():
        if _room(module) in ("astra_ds.training", "astra_ds.rundir", "astra_ds.inference", "astra_ds.labels"):
            assert not {t for t in targets if _room(t) == "astra_ds.serve"}, module


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
