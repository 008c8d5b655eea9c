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
    "networks": ("data", "transforms", "engines", "losses"),
    "transforms": ("data", "engines", "losses"),
    "masking": ("data", "transforms", "engines", "losses"),
    "losses": ("data", "transforms", "engines", "masking"),
    "data": ("engines",),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against its package); for
    ``from X import a`` both ``X`` and ``X.a`` (``a`` may be a module: ``from .. import losses``)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def test_imported_modules_resolves_relative_imports():
    pkg = ROOT / "transforms" / "text.py"
    assert "medfm.transforms.prompt" in imported_modules(pkg)  # ``from .prompt import …``
    engines = ROOT / "engines" / "checkpoint.py"
    assert "medfm.utils.dist" in imported_modules(engines)  # ``from ..utils.dist import unwrap``


def test_layer_check_reads_only_medfm_modules(tmp_path):
    """``monai.data`` or ``torch.utils.data`` is not medfm's data layer; ``from .. import losses`` is."""
    pkg = tmp_path / "medfm" / "networks"
    pkg.mkdir(parents=True)
    mod = pkg / "m.py"
    mod.write_text("import monai.data\nfrom torch.utils.data import Dataset\nfrom .. import losses\n", encoding="utf-8")
    names = imported_modules(mod, root=tmp_path / "medfm")
    assert {"monai.data", "torch.utils.data", "medfm.losses"} <= names
    assert _offences(names, "networks") == ["medfm.losses"]


def _offences(names: set[str], layer: str) -> list[str]:
    """The names among ``names`` that are medfm modules of the layers ``layer`` must not import."""
    out = []
    for name in sorted(names):
        parts = name.split(".")
        if parts[0] == "medfm" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
            out.append(name)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_higher_layers(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no modules under medfm.{layer}"
    bad = []
    for path in files:
        bad += [f"{module_name(path)} imports {name}" for name in _offences(imported_modules(path), layer)]
    assert not bad, "\n".join(bad)
