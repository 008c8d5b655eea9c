"""Release packaging of a bundle, a download that checks what it fetched, and a load that checks the weights fit.

A release zip ``<name>_v<version>.zip`` holds the top folder ``<name>/`` with:

- ``configs/`` (``inference.json`` is the network that ``models/model.pt`` fits; override files given to
  :func:`package_bundle` are merged into it), ``docs/``, ``LICENSE``;
- ``models/model.pt``: the weights of ``inference.json``'s network (the fine-tuned task model);
  ``models/pretrained.pt`` (optional): the pre-trained encoders for the fine-tuning configs
  (``--pretrained_checkpoint <bundle>/models/pretrained.pt``); ``models/model.ts`` (optional);
- ``medfm/``: a copy of the ``medfm`` package the configs import, made at packaging from the installed source
  (never edited in the copy). It resolves when the bundle folder is on ``sys.path``: MONAI Label's
  ``monaibundle`` app puts it there, ``python -m monai.bundle run`` from inside the bundle folder has it as the
  working directory, and elsewhere ``PYTHONPATH=<bundle>`` (or ``sys.path.insert(0, <bundle>)`` before
  ``monai.bundle.load``) does it;
- ``configs/metadata.json`` whose ``required_packages_version`` lists public packages only (those of the
  bundle, without ``medfm``, plus what the copied code imports);
- ``large_files.yml``: every weights file with its own URL (``<url_base>/<name>_v<version>/models/<file>``, the
  files :func:`package_bundle` writes beside the zip) and sha256, as MONAI's ``download_large_files`` reads it.

MONAI's ``python -m monai.bundle download --url …`` does not check a hash; :func:`download_bundle` does, and
extracts only members that stay inside the bundle's own folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

__all__ = ["check_weights_fit", "download_bundle", "load_bundle", "package_bundle", "safe_extract", "sha256_file"]

# what goes into a release, relative to the bundle folder (run outputs and demo data never do)
_RELEASE_GLOBS = ("configs/*.json", "configs/logging.conf", "docs/**/*", "LICENSE")
# public distributions the copied medfm code imports (beyond torch, monai and numpy, which metadata names apart)
_CODE_REQUIREMENTS = ("nibabel", "pillow", "pytorch-ignite", "pyyaml", "scipy")
# the fine-tuning config whose ``network`` loads ``pretrained_checkpoint`` through the bundle's own loader
FINETUNE_CONFIGS = {"fratmae_petct": ("finetune_seg.json",), "spad_vit": ("finetune_seg.json",),
                    "panfm_panorgan": ("finetune.json",), "midol_multimodal": ("finetune_seg.json",)}  # fmt: skip


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_weights_fit(network, state: Mapping, path: str | os.PathLike) -> None:
    """Raise a ValueError naming ``path`` and the matched/total tensor count unless ``state`` holds every tensor of
    ``network`` (same name and shape) and nothing else."""
    from ..networks.pretrained import count_matching, with_legacy_buffers

    own = network.state_dict()
    state = with_legacy_buffers(network, state)
    matched = count_matching(own, state)
    extra = [k for k in state if k not in own]
    if matched != len(own) or extra:
        raise ValueError(
            f"{path} does not fit {type(network).__name__}: it matches {matched} of the network's {len(own)} tensors"
            f" and holds {len(extra)} tensors the network lacks (e.g. {extra[:3]})."
        )


def _inference_network(bundle: Path, config_files: Sequence[str], net_override: Mapping | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in config_files])
    parser["bundle_root"] = str(bundle)
    for k, v in (net_override or {}).items():
        parser[f"network_def#{k}"] = v
    return parser, parser.get_parsed_content("network_def")


def check_pretrained_fits(bundle: Path, pretrained: str | os.PathLike, config_files: Sequence[str]) -> None:
    """Build the fine-tuning ``network`` of ``config_files`` (merged, in the bundle's ``configs/``) from
    ``pretrained`` as a user's fine-tuning run does (the bundle's ``init_*_from_pretraining``, which refuses a
    checkpoint that does not fit its encoder, naming the file and the matched/total count)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in config_files])
    parser["bundle_root"] = str(bundle)
    parser["pretrained_checkpoint"] = str(pretrained)
    parser["device"] = "$torch.device('cpu')"
    try:
        parser.get_parsed_content("network")
    except RuntimeError as e:  # MONAI wraps the loader's error in "Failed to evaluate"
        cause = e.__cause__ if isinstance(e.__cause__, (ValueError, FileNotFoundError)) else None
        if cause is None:
            raise
        raise ValueError(f"pre-trained weights for fine-tuning refused: {cause}") from cause


def _release_metadata(meta: dict) -> dict:
    """``meta`` with ``required_packages_version`` holding public packages only: ``medfm`` is dropped (its code
    travels in the zip) and what that code imports is added at the installed versions."""
    meta = dict(meta)
    required = {k: v for k, v in meta.get("required_packages_version", {}).items() if k != "medfm"}
    for name in _CODE_REQUIREMENTS:
        try:
            required.setdefault(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"{name}, which the medfm code in the release imports, is not installed here: its version "
                             "cannot be recorded in required_packages_version; install it and package again.") from None
    meta["required_packages_version"] = required
    return meta


def _code_files() -> list[tuple[Path, str]]:
    """(file, archive path under the bundle) of every source file of the installed ``medfm`` package."""
    root = Path(__file__).resolve().parents[1]
    return [(f, f"medfm/{f.relative_to(root).as_posix()}") for f in sorted(root.rglob("*.py"))]


def package_bundle(
    bundle_dir: str | os.PathLike,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike,
    torchscript: str | os.PathLike | None = None,
    url_base: str | None = None,
    pretrained: str | os.PathLike | None = None,
    inference_configs: Sequence[str] = ("inference.json",),
    finetune_configs: Sequence[str] | None = None,
) -> tuple[Path, str]:
    """Build ``<out_dir>/<name>_v<version>.zip`` (layout: module doc) and, beside it, the weights files that
    ``large_files.yml`` points to (``<out_dir>/<name>_v<version>/models/…``).

    Args:
        bundle_dir: the bundle folder (``bundles/<name>``).
        weights: state dict of ``inference.json``'s network; checked to hold every tensor of that network.
        out_dir: folder for the zip and the published weights files.
        torchscript: optional TorchScript file shipped as ``models/model.ts``.
        url_base: where ``out_dir`` will be published; each ``large_files.yml`` entry gets its own URL under it
            (without it the entries have no URL).
        pretrained: optional pre-trained encoder weights shipped as ``models/pretrained.pt`` for fine-tuning.
        inference_configs: config files merged (in order) into the released ``inference.json``, e.g.
            ``("inference.json", "demo_inference.json")`` for demo-size weights.
        finetune_configs: fine-tuning configs (merged) whose ``network`` must load ``pretrained`` (default
            :data:`FINETUNE_CONFIGS` of the bundle), e.g. ``("finetune_seg.json", "demo_seg.json")`` for demo size.

    Returns:
        the zip's path and its sha256 (what :func:`download_bundle` checks).

    Raises:
        FileNotFoundError: not a bundle, or a weights file does not exist.
        ValueError: ``weights`` do not fit the network, or ``pretrained`` the fine-tuning network's encoder
            (naming the file and the matched/total count).
    """
    from ..networks.pretrained import load_checkpoint_file
    from .serve import merged_config

    bundle = Path(bundle_dir).resolve()
    name = bundle.name
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: {meta_file} does not exist.")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    files = {"model.pt": weights, "pretrained.pt": pretrained, "model.ts": torchscript}
    files = {k: Path(v) for k, v in files.items() if v is not None}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(f"weights file {f} does not exist.")
    _, network = _inference_network(bundle, inference_configs)
    check_weights_fit(network, load_checkpoint_file(weights, "weights file"), weights)
    if pretrained is not None:
        check_pretrained_fits(bundle, pretrained, finetune_configs or FINETUNE_CONFIGS.get(name, ("finetune.json",)))

    release = f"{name}_v{meta['version']}"
    out = Path(out_dir)
    (out / release / "models").mkdir(parents=True, exist_ok=True)
    entries = []
    for fname, src in files.items():
        shutil.copyfile(src, out / release / "models" / fname)
        entry = {"path": f"models/{fname}", "hash_val": sha256_file(src), "hash_type": "sha256"}
        if url_base:
            entry = {"path": entry["path"], "url": f"{url_base.rstrip('/')}/{release}/models/{fname}", **entry}
        entries.append(entry)
    zip_path = out / f"{release}.zip"
    replaced = {"configs/metadata.json": json.dumps(_release_metadata(meta), indent=4) + "\n"}
    if list(inference_configs) != ["inference.json"]:
        merged = merged_config([bundle / "configs" / f for f in inference_configs])
        base = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
        for key in ("ckpt_dir", "ckpt_path"):  # the released weights, never an override's run folder
            if key in base:
                merged[key] = base[key]
        replaced["configs/inference.json"] = json.dumps(merged, indent=4) + "\n"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for pattern in _RELEASE_GLOBS:
            for f in sorted(bundle.glob(pattern)):
                rel = f.relative_to(bundle).as_posix()
                if f.is_file() and rel not in replaced:
                    zf.write(f, f"{name}/{rel}")
        for rel, text in replaced.items():
            zf.writestr(f"{name}/{rel}", text)
        for fname, src in files.items():
            zf.write(src, f"{name}/models/{fname}")
        for src, rel in _code_files():
            zf.write(src, f"{name}/{rel}")
        zf.writestr(f"{name}/large_files.yml", yaml.safe_dump({"large_files": entries}, sort_keys=False))
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


def load_bundle(name: str, bundle_dir: str | os.PathLike, workflow_type: str = "inference", **kwargs):
    """``monai.bundle.load`` that refuses weights which do not fit: MONAI copies the tensors whose name and shape
    match and silently keeps the initialisation of the rest; this raises a ValueError naming ``models/model.pt``
    and the matched/total count unless every tensor of the returned network came from the file.

    Args:
        name: bundle name (its folder under ``bundle_dir``).
        bundle_dir: folder holding the bundle.
        workflow_type: config whose ``network_def`` is built (``inference`` is the network ``model.pt`` fits).
        kwargs: passed to ``monai.bundle.load`` (e.g. ``net_override``, ``device``).
    """
    import torch
    from monai.bundle import load

    from ..networks.pretrained import count_matching, with_legacy_buffers

    net = load(name, bundle_dir=str(bundle_dir), workflow_type=workflow_type, **kwargs)
    path = Path(bundle_dir) / name / "models" / "model.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = net.state_dict()
    filled = with_legacy_buffers(net, state)
    matched = count_matching(own, filled)
    if matched != len(own):
        raise ValueError(
            f"{path} does not fit the {workflow_type}.json network {type(net).__name__}: it matches {matched} of "
            f"{len(own)} tensors; the rest would keep their random initialisation."
        )
    if len(filled) != len(state):  # buffers the file predates: their values as it was trained, not the config's
        net.load_state_dict(filled)
    return net
