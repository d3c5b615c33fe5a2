"""The package's structure, read from its source: imports run one way (no cycle), no module
imports another's private names, and torch's private APIs are reached only through
``_compat.py``; the installed package holds only what users import."""

from __future__ import annotations

import ast
from pathlib import Path

import memsave_dispatch

PACKAGE = Path(memsave_dispatch.__file__).resolve().parent
NAME = "memsave_dispatch"
COMPAT = f"{NAME}._compat"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((NAME, *parts))] = path
    return found


def _resolve(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute name of a relative import in ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node.level, node.module) if node.level else node.module
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        for source, name, _line in _imports(module, path):
            if name is not None and f"{source}.{name}" in modules:
                graph[module].add(f"{source}.{name}")  # from . import engine
            elif source in modules and source != module:
                graph[module].add(source)
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph = _graph()
    # a package's __init__ imports its children; children importing their package's
    # __init__ would be the cycle
    state: dict[str, str] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = "open"
        for target in sorted(graph[node]):
            if target == NAME or (target in path and target != node):
                if target in path:
                    cycle.extend(path[path.index(target) :] + [target])
                    return True
            if state.get(target) == "open":
                cycle.extend([*path, target])
                return True
            if target not in state and visit(target, [*path, target]):
                return True
        state[node] = "done"
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)
    assert not any(NAME in targets for module, targets in graph.items() if module.startswith(f"{NAME}.")), (
        "a module imports the package's __init__"
    )


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = []
    for module, path in modules.items():
        for source, name, line in _imports(module, path):
            if not source.startswith(NAME) or source == module:
                continue
            imported = source if name is None else f"{source}.{name}"
            private = [part for part in imported.split(".")[1:] if part.startswith("_") and part != "__init__"]
            if private and imported != COMPAT and source != COMPAT:
                offences.append(f"{path.name}:{line} imports {imported}")
    assert not offences, offences


def test_torch_private_apis_only_through_compat():
    offences = []
    for module, path in _modules().items():
        if module == COMPAT:
            continue
        tree = ast.parse(path.read_text())
        for source, _name, line in _imports(module, path):
            if source.startswith("torch.") and any(part.startswith("_") for part in source.split(".")):
                offences.append(f"{path.name}:{line} imports {source}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, (ast.Name, ast.Attribute))
                and _dotted(node.value).split(".")[0] == "torch"
            ):
                offences.append(f"{path.name}:{node.lineno} uses {_dotted(node.value)}.{node.attr}")
    assert not offences, offences


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_the_public_face_is_small():
    assert len(memsave_dispatch.__all__) <= 8
    for name in memsave_dispatch.__all__:
        assert hasattr(memsave_dispatch, name)


def test_the_compiled_engine_is_built_in_one_module_and_driven_from_one():
    """extension.py alone builds and loads the C++ extension (torch.utils.cpp_extension);
    compiled.py alone calls into it; everything torch-private on that side stays in csrc/."""
    builders, drivers = [], []
    for module, path in _modules().items():
        for source, name, _line in _imports(module, path):
            imported = source if name is None else f"{source}.{name}"
            if imported.startswith("torch.utils.cpp_extension"):
                builders.append(module)
            if imported == f"{NAME}.extension":
                drivers.append(module)
    assert builders == [f"{NAME}.extension"], builders
    assert drivers == [f"{NAME}.compiled"], drivers
    native = sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".cpp", ".cc", ".h", ".hpp", ".cu"))
    assert native and all(p.parent == PACKAGE / "csrc" for p in native), native
    assert {p.suffix for p in (PACKAGE / "csrc").iterdir()} <= {".cpp", ".h"}
