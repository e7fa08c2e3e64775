"""samkit.train's modules: no import cycle, and no module uses another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import samkit.train

TRAIN = Path(samkit.train.__file__).parent
MODULES = sorted(p.stem for p in TRAIN.glob("*.py") if p.stem != "__init__")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every samkit import in a file, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samkit"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("samkit")]
    return found


def _train_deps(module: str) -> set[str]:
    deps = set()
    for target, names in _imports(TRAIN / f"{module}.py"):
        if target.startswith("samkit.train."):
            deps.add(target.removeprefix("samkit.train."))
        elif target == "samkit.train":
            deps.update(n for n in names if n in MODULES)
    return deps


def test_the_training_modules_import_one_way():
    graph = {m: _train_deps(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            pytest.fail(f"import cycle: {' -> '.join((*path, module))}")
        if module not in done:
            for dep in graph[module]:
                visit(dep, (*path, module))
            done.add(module)

    for module in MODULES:
        visit(module, ())
    assert {"config", "data", "synthetic", "source", "loop", "recipe", "distill"} <= set(MODULES)


def test_each_training_module_imports_first():
    """In a fresh interpreter, each module is imported first with no samkit.train module loaded (a cycle
    shows as an ImportError of a partly initialised module for some order)."""
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('samkit.train')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('samkit.train.' + name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_no_private_names_cross_module_boundaries():
    """`from samkit.x import _name` or `module._name` on an imported samkit module, anywhere in train/."""
    offenders = []
    for path in sorted(TRAIN.glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = set()
        for target, names in _imports(path):
            offenders += [f"{path.name}: {target}.{n}" for n in names if n.startswith("_")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samkit"):
                aliases.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                aliases.update(
                    a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("samkit")
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                offenders.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders
