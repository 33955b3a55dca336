"""The package's import graph, read from the source: no circles, and no module that starts another of the package's
modules by its name (a dependency that the imports would not show)."""
import ast
from pathlib import Path

import hw3lib

PACKAGE = Path(hw3lib.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from . import x``: the module x where there is one, else a name defined in ``module``
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "hw3lib":
                found.add(target)
    return found


def test_the_import_graph_has_no_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "hw3lib.llava.captioning" in graph["hw3lib.llava.prompt_sweep"]  # the reading works
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, " -> ".join([*trail, name, dep])
            if dep not in state:
                visit(dep, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_module_starts_another_by_its_name():
    """``python -m hw3lib.x`` is written only in ``hw3lib/x.py`` itself (its own worker or runner); a module that
    starts another one names it through an import (``kernel.__name__``), so the graph above sees the edge."""
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List) and any(isinstance(e, ast.Constant) and e.value == "-m" for e in node.elts):
                named = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                         and e.value.startswith("hw3lib")]
                assert named in ([], [name]), f"{path.name} starts {named} by name"
