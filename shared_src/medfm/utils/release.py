"""Release packaging of a bundle and a download that checks what it fetched.

MONAI's ``python -m monai.bundle download --url …`` does not check a hash; :func:`download_bundle` does, and
extracts only members that stay inside the bundle's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import yaml

__all__ = ["download_bundle", "package_bundle", "safe_extract", "sha256_file"]

# what goes into a release, relative to the bundle folder (run outputs and demo data never do)
_RELEASE_GLOBS = ("configs/*.json", "configs/logging.conf", "docs/**/*", "LICENSE")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_bundle(
    bundle_dir: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    torchscript: str | os.PathLike | None = None,
    url_base: str | None = None,
) -> tuple[Path, str]:
    """Build ``<out_dir>/<name>_v<version>.zip`` (top folder ``<name>/``: configs, docs, LICENSE,
    ``models/model.pt``, optional ``models/model.ts``, ``large_files.yml`` with the weights' sha256).

    The version comes from ``configs/metadata.json``. With ``url_base`` the weights' entry in
    ``large_files.yml`` gets ``<url_base>/<name>_v<version>.zip`` as its url.

    Returns:
        the zip's path and its sha256 (what :func:`download_bundle` checks).
    """
    bundle = Path(bundle_dir).resolve()
    name = bundle.name
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: {meta_file} does not exist.")
    version = json.loads(meta_file.read_text())["version"]
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{name}_v{version}.zip"
    entry = {"path": "models/model.pt", "hash_val": sha256_file(weights), "hash_type": "sha256"}
    if url_base:
        entry["url"] = f"{url_base.rstrip('/')}/{zip_path.name}"
    large_files = yaml.safe_dump({"large_files": [entry]}, sort_keys=False)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for pattern in _RELEASE_GLOBS:
            for f in sorted(bundle.glob(pattern)):
                if f.is_file():
                    zf.write(f, f"{name}/{f.relative_to(bundle).as_posix()}")
        zf.write(weights, f"{name}/models/model.pt")
        if torchscript:
            zf.write(torchscript, f"{name}/models/model.ts")
        zf.writestr(f"{name}/large_files.yml", large_files)
    return zip_path, sha256_file(zip_path)


def safe_extract(zip_path: str | os.PathLike, dest_dir: str | os.PathLike, name: str) -> Path:
    """Extract a bundle zip whose every member lies under ``<name>/``; refuse absolute paths, ``..``,
    symbolic links and members outside that folder, naming the offending member. Nothing is written when
    any member is refused."""
    dest = Path(dest_dir).resolve()
    root = dest / name
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            member = info.filename
            target = (dest / member).resolve()
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ValueError(f"{zip_path}: member {member!r} is a symbolic link; refusing to extract.")
            if os.path.isabs(member) or ".." in Path(member).parts or not target.is_relative_to(root):
                raise ValueError(f"{zip_path}: member {member!r} would land outside {root}; refusing to extract.")
        zf.extractall(dest)
    return root


def download_bundle(url: str, name: str, bundle_dir: str | os.PathLike, sha256: str) -> Path:
    """Fetch a bundle zip from ``url``, check its sha256, and extract it safely into ``<bundle_dir>/<name>``.

    Raises:
        ValueError: the hash differs (nothing is extracted) or a member would escape the bundle folder.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"{name}.zip"
        with urllib.request.urlopen(url) as resp, open(local, "wb") as f:
            shutil.copyfileobj(resp, f)
        got = sha256_file(local)
        if got.lower() != sha256.lower():
            raise ValueError(f"{url}: sha256 {got} does not match the expected {sha256}; nothing was extracted.")
        return safe_extract(local, bundle_dir, name)
