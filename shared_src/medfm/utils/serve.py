"""Assemble a bundle folder that MONAI Label's stock ``monaibundle`` app serves and re-trains.

MONAI Label reads fixed names from a bundle folder: ``configs/inference.json`` (``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``), ``configs/train.json`` (run with overrides of
``train#dataset#data``, ``train#trainer#max_epochs``, ``train#handlers``, ``validate#dataset#data``, its
``network`` loaded from ``models/model.pt``), ``configs/metadata.json`` (input key and label names from
``network_data_format``) and ``models/model.pt``. A medfm bundle keeps pre-training in ``train.json`` and its
segmentation in ``finetune_seg.json``, so :func:`build_served_bundle` writes a separate folder whose
``inference.json`` and ``train.json`` are the bundle's segmentation configs merged with its
``serve_*.json`` overlays (one input image as MONAI Label passes it, a plain ``Dataset`` that re-reads
labels saved again under the same path, ``models/model.pt`` rewritten after each training) and with the
fine-tuned weights as ``models/model.pt``.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from ..networks.pretrained import count_matching, load_checkpoint_file

__all__ = ["SERVED", "ServedTask", "build_served_bundle", "merged_config"]


@dataclass(frozen=True)
class ServedTask:
    """Configs that make up one served task of a bundle (file names in its ``configs/``), merged in the order
    task configs, demo overrides (with ``demo=True``), serve overlays."""

    name: str  # default folder name of the served bundle
    inference: tuple[str, ...]
    train: tuple[str, ...]
    serve_inference: tuple[str, ...] = ("serve_inference.json",)
    serve_train: tuple[str, ...] = ("serve_train.json",)
    demo_inference: tuple[str, ...] = ("demo_inference.json",)
    demo_train: tuple[str, ...] = ()
    # merged as flat overrides into multi_gpu_train.json, which MONAI Label's multi-GPU /train merges over train.json
    multi_gpu: tuple[str, ...] = ("multi_gpu_train.json", "serve_multi_gpu_train.json")

    def inference_files(self, demo: bool) -> list[str]:
        return [*self.inference, *(self.demo_inference if demo else ()), *self.serve_inference]

    def train_files(self, demo: bool) -> list[str]:
        return [*self.train, *(self.demo_train if demo else ()), *self.serve_train]


SERVED: dict[str, dict[str, ServedTask]] = {
    "fratmae_petct": {
        "segmentation": ServedTask(
            name="fratmae_petct_segmentation",
            inference=("inference.json",),
            train=("finetune_seg.json",),
            demo_train=("demo_seg.json",),
        )
    },
    "spad_vit": {
        "segmentation": ServedTask(
            name="spad_vit_segmentation",
            inference=("inference.json",),
            train=("finetune_seg.json",),
            demo_train=("demo.json", "demo_seg.json"),
        )
    },
    "midol_multimodal": {
        "segmentation": ServedTask(
            name="midol_multimodal_segmentation",
            inference=("inference.json",),
            train=("finetune_seg.json",),
            demo_train=("demo_seg.json",),
        )
    },
}


def merged_config(files: list[Path]) -> dict:
    """The config dict MONAI gets from ``--config_file "[a, b, …]"`` (later files win, ``a#b`` keys set
    nested entries), without the parser's ``_meta_`` entry."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    config = dict(parser.config)
    config.pop(parser.meta_key, None)
    return config


def _check_weights(inference: dict, weights: Path) -> dict:
    state = load_checkpoint_file(weights, "weights file")
    state = state.get("model", state) if isinstance(state, dict) else state
    parser = ConfigParser(copy.deepcopy(inference))  # parsing rewrites ids ("a#b" -> "a::b") in the dict it is given
    network = parser.get_parsed_content("network_def", instantiate=True)
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        own = network.state_dict()
        matched = count_matching(own, state) if isinstance(state, dict) else 0
        raise ValueError(
            f"weights file {weights} does not fit the served network_def: it matches {matched} of {len(own)} tensors "
            f"(check the demo flag or the network settings it was trained with): {cause}"
        ) from e
    return state


def _write_served(out: Path, bundle: Path, spec: ServedTask, inference: dict, train: dict, state: dict) -> None:
    configs = bundle / "configs"
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    for name, config in (("inference.json", inference), ("train.json", train)):
        (out / "configs" / name).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    for name in ("metadata.json", "logging.conf"):
        shutil.copyfile(configs / name, out / "configs" / name)
    if spec.multi_gpu:
        # kept flat ("train#sampler": …): MONAI Label merges this file over its exported train config, and a
        # nested "train" entry would replace that config's whole "train" section
        overrides: dict = {}
        for name in spec.multi_gpu:
            overrides.update(json.loads((configs / name).read_text(encoding="utf-8")))
        (out / "configs" / "multi_gpu_train.json").write_text(json.dumps(overrides, indent=4) + "\n", encoding="utf-8")
    torch.save(state, out / "models" / "model.pt")
    if (bundle / "docs").is_dir():
        shutil.copytree(bundle / "docs", out / "docs")
    shutil.copyfile(bundle / "LICENSE", out / "LICENSE")


def build_served_bundle(
    bundle_dir: str | Path,
    weights: str | Path,
    out_dir: str | Path,
    task: str = "segmentation",
    demo: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a MONAI Label-ready bundle folder ``out_dir`` for ``task`` of the bundle in ``bundle_dir``.

    ``out_dir`` gets ``configs/{inference,train,metadata,multi_gpu_train}.json``, ``configs/logging.conf``,
    ``models/model.pt`` (``weights``, checked to load strictly into the served ``network_def``), ``docs/`` and
    ``LICENSE``. Serve it with
    ``python -m monailabel.main start_server --app apps/monaibundle --conf models <out_dir name> …`` after
    placing it at ``apps/monaibundle/model/<out_dir name>``.

    Args:
        bundle_dir: the medfm bundle (its folder name selects the entry of :data:`SERVED`).
        weights: fine-tuned weights of the task (state dict, or a dict with a ``model`` entry).
        out_dir: folder to write.
        task: key in ``SERVED[<bundle>]``.
        demo: merge the bundle's demo overrides (demo-size network) as well.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.
    """
    bundle = Path(bundle_dir).resolve()
    tasks = SERVED.get(bundle.name)
    if tasks is None:
        raise ValueError(f"{bundle} has no served task; bundles with one: {sorted(SERVED)}.")
    if task not in tasks:
        raise ValueError(f"{bundle.name} serves {sorted(tasks)}, not {task!r}.")
    spec = tasks[task]
    configs = bundle / "configs"
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
    inference = merged_config([configs / f for f in spec.inference_files(demo)])
    train = merged_config([configs / f for f in spec.train_files(demo)])
    state = _check_weights(inference, Path(weights))  # before anything of an existing out_dir is touched
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside out_dir and renamed into place: a failure part-way never leaves a half-written or missing
    # served bundle (with --overwrite, the folder being replaced holds the weights that /train improved)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}"
    try:
        _write_served(tmp, bundle, spec, inference, train, state)
        if out.exists():
            old = out.parent / f".{out.name}.old.{uuid.uuid4().hex}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
