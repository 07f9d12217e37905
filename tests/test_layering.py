"""The layout shows the architecture and imports only go down: building blocks never import the
training core, commands or process groups; every public class says what it is."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import moekit

PACKAGE = Path(moekit.__file__).parent
# package -> packages it must never import (directly or lazily inside a function)
FORBIDDEN = {
    "layers": ("moekit.train", "moekit.commands", "moekit.distributed", "moekit.models", "moekit.data", "moekit.rl"),
    "models": ("moekit.train", "moekit.commands", "moekit.distributed", "moekit.data", "moekit.rl"),
    "data": ("moekit.train", "moekit.commands", "moekit.distributed", "moekit.models", "moekit.rl"),
    "rl": ("moekit.train", "moekit.commands", "moekit.distributed"),
    "distributed": ("moekit.train", "moekit.commands"),
    "io.py": ("moekit.",),
    "config.py": ("moekit.",),
    "plots.py": ("moekit.train", "moekit.commands", "moekit.models", "moekit.layers"),
}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_only_go_down(part):
    files = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
    bad = [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in files for name in imports_of(path)
           if any(name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") for f in FORBIDDEN[part])]
    assert not bad, "\n".join(bad)


def test_private_names_are_not_imported_across_packages():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moekit"):
                source_package = node.module.split(".")[1] if "." in node.module else ""
                own_package = path.relative_to(PACKAGE).parts[0]
                for alias in node.names:
                    dunder = alias.name.startswith("__") and alias.name.endswith("__")
                    if alias.name.startswith("_") and not dunder and source_package != own_package:
                        bad.append(f"{path.relative_to(PACKAGE.parent)} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)


def _public_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="moekit."):
        if info.name.startswith("moekit.commands") or info.name == "moekit.__main__":
            continue
        yield info.name


def test_every_public_class_and_function_has_a_docstring():
    missing = []
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value):
                missing.append(f"{name}.{attr}")
    assert not missing, "no docstring: " + ", ".join(missing)


def test_models_package_exports_its_classes():
    import moekit.models as models

    for name in ("Transformer", "MultiTaskModel", "SASRec", "FAME", "TwoTower"):
        assert hasattr(models, name) and name in models.__all__
