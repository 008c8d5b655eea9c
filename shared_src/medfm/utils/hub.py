"""The Hugging Face Hub repository layout of a release zip.

A bundle repository on the Hub holds the bundle folder's files at its root (``configs/``, ``models/``,
``docs/``, ``LICENSE``, ``large_files.yml``, the ``medfm/`` code copy) and a ``README.md`` model card: the
bundle's ``docs/README.md`` under the Hub's YAML header (``license``, ``library_name: monai``, ``tags``), as
MONAI's ``push_to_hf_hub`` writes it. Upload the folder with ``huggingface-cli upload <org>/<name> <folder>``
(tag the commit with the bundle version); users fetch it with
``python -m monai.bundle download --source huggingface_hub --repo <org>/<name> --name <name> --version <tag>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import yaml

from .release import safe_extract

__all__ = ["hub_card_header", "write_hub_layout"]


def hub_card_header(bundle: Path) -> dict:
    """The model card's YAML header for the bundle folder ``bundle``: licence read from its ``LICENSE``
    (``apache-2.0``, ``mit``, else ``other``), ``library_name: monai`` and the tags ``monai``, ``medical`` and the
    bundle's name."""
    text = (bundle / "LICENSE").read_text(encoding="utf-8") if (bundle / "LICENSE").is_file() else ""
    if "Apache License" in text and "Version 2.0" in text:
        licence = "apache-2.0"
    elif "MIT License" in text:
        licence = "mit"
    else:
        licence = "other"
    return {"license": licence, "library_name": "monai", "tags": ["monai", "medical", bundle.name]}


def write_hub_layout(zip_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hub repository layout of the release ``zip_path`` into ``out_dir`` (which must not exist).

    Returns:
        ``out_dir``, holding the bundle folder's files and ``README.md`` (the model card with the Hub header).
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; the Hub layout is written into a new folder.")
    with zipfile.ZipFile(zip_path) as zf:
        name = zf.namelist()[0].split("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = safe_extract(zip_path, tmp, name)
        header = yaml.safe_dump(hub_card_header(bundle), sort_keys=False)
        shutil.copytree(bundle, out)
    card = (out / "docs" / "README.md").read_text(encoding="utf-8")
    (out / "README.md").write_text(f"---\n{header}---\n{card}", encoding="utf-8")
    return out
