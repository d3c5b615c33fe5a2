"""The installed package is the library and its demo: no benchmark, model zoo or plotting
(those live under tools/, run from a checkout)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memsave_dispatch"

#: Module names that belong to the benchmark, not to the library.
BENCHMARK_NAMES = re.compile(r"^(bench.*|.*benchmark.*|models?|model_zoo|zoo|plot.*|.*_plot.*)$")
#: Imports that pull the benchmark, the model zoo or plotting into the package.
BENCHMARK_IMPORTS = re.compile(r"^(matplotlib|tools|memsave_dispatch\.(bench|models))(\.|$)")


def _modules() -> list[tuple[str, Path]]:
    """Every module and package of the source tree, as ``(dotted name, file)``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join(parts), path))
    return found


def _imported(module: str, path: Path) -> list[str]:
    """What ``path`` imports, relative imports resolved to absolute names; also the string
    argument of ``importlib.import_module(...)`` and ``__import__(...)`` calls."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = getattr(node.func, "attr", getattr(node.func, "id", None))
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def test_the_source_tree_walks():
    names = [name for name, _ in _modules()]
    assert "memsave_dispatch.demo" in names and "memsave_dispatch.ops" in names


def test_no_module_is_named_for_the_benchmark():
    offending = [
        name for name, _ in _modules() if any(BENCHMARK_NAMES.match(part) for part in name.split(".")[1:])
    ]
    assert not offending, f"benchmark modules in the installed package, not tools/bench/: {offending}"


def test_no_module_imports_the_benchmark_or_plotting():
    offending = {
        name: hits
        for name, path in _modules()
        if (hits := [imported for imported in _imported(name, path) if BENCHMARK_IMPORTS.match(imported)])
    }
    assert not offending, f"the installed package imports the benchmark or matplotlib: {offending}"


def test_the_import_check_sees_relative_and_dynamic_imports(tmp_path):
    module = tmp_path / "demo.py"
    module.write_text(
        "from .bench import main\nfrom . import models\n"
        "import importlib\nimportlib.import_module('matplotlib.pyplot')\n"
    )
    caught = {"memsave_dispatch.bench", "memsave_dispatch.models", "matplotlib.pyplot"}
    assert caught <= set(_imported("memsave_dispatch.demo", module))
    assert all(BENCHMARK_IMPORTS.match(name) for name in (*caught, "tools.bench.cli"))
    assert not any(BENCHMARK_IMPORTS.match(name) for name in ("memsave_dispatch.measure", "torch", "toolz"))


def test_the_console_script_runs_the_demo_only():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"memsave-dispatch": "memsave_dispatch.demo:main"}
