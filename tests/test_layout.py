"""The package's layout holds (docs/architecture.md): no module imports one of a
higher layer, and no import cycle. Read from the source's own import
statements, so the check needs nothing but the files."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_kedit"

# Layers from the bottom up; a module may import its own layer and those below it.
LAYERS = [
    {"errors", "version", "cache", "anatomy", "batching", "progress", "processes", "sampling", "partial_forward",
     "trace"},
    {"kinds"},
    {"pack"},
    {"attach", "methods"},
    {"models", "evaluate", "demo", "playground", "cli", "__init__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The hf_kedit modules `path` imports (relative imports resolved), at any depth in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # `from . import x` may import a module x
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                          or _is_package(sub) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "hf_kedit" or m.startswith("hf_kedit.")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else "__init__"
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def test_every_module_has_a_layer():
    assert sorted(m for m in _graph() if _layer(m) is None) == []


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{m} -> {i}" for m, imports in _graph().items() for i in imports
                    if i != "hf_kedit" and (_layer(i) or 0) > (_layer(m) or 0))
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_only_the_package_face_imports_the_package_face():
    """`from hf_kedit import X` inside the package would import everything in `__init__`."""
    assert sorted(m for m, imports in _graph().items() if "hf_kedit" in imports) == []
