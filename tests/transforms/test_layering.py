"""The package's layers import one way: read every module's import statements (``ast``, nothing is executed) and
check that no lower layer imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import medfm

ROOT = Path(medfm.__file__).parent

# layer -> medfm subpackages it must not import (lazy imports inside functions count too)
FORBIDDEN = {
    "transforms": ("data", "engines", "losses"),
    "masking": ("data", "transforms", "engines", "losses"),
    "losses": ("data", "transforms", "engines", "masking"),
    "data": ("engines",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
            else:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def test_imported_modules_resolves_relative_imports():
    pkg = ROOT / "transforms" / "text.py"
    assert "medfm.transforms.prompt" in imported_modules(pkg)  # ``from .prompt import …``


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_higher_layers(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under medfm.{layer}"
    bad = []
    for path in files:
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "medfm" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{module_name(path)} imports {name}")
    assert not bad, "\n".join(bad)
