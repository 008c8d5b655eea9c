"""Helpers that bundle configs call: where the bundle lives, which device to use, what a metric reads."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

__all__ = [
    "DEMO_SIZES", "PANFM_DEMO_ORGAN_SHAPES", "bundle_root", "class_scores_and_labels", "copy_key", "default_device",
    "demo_size", "image_meta", "organ_loading", "panfm_demo_organ_shapes",
]  # fmt: skip

# Pan-FM's demo organ grids (voxels per axis), read by its three demo overlays (pre-training, fine-tuning, inference):
# the weights the demo chain passes on fit only when all three agree.
PANFM_DEMO_ORGAN_SHAPES: dict[str, tuple[int, int, int]] = {
    "brain": (16, 16, 16), "heart": (16, 16, 8), "adipose": (16, 16, 8), "liver": (16, 16, 8),
    "kidney": (8, 8, 8), "spleen": (8, 8, 8), "pancreas": (16, 8, 8),
}  # fmt: skip


# Each bundle's demo encoder size (the ``size`` mapping its encoder takes), read by all of the bundle's demo overlays
# (pre-training, fine-tuning, inference): the weights the demo chain passes on fit only when they agree.
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "fratmae_petct": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "mlp_dim": 192},
    "midol_multimodal": {
        "patch_size": 2,
        "window_size": 4,
        "embed_dim": 16,
        "depths": (2, 2),
        "num_heads": (2, 4),
        "mlp_ratio": 4.0,
    },
    "panfm_panorgan": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128},
    "spad_vit": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128},
}


def bundle_root(fallback: str = ".") -> str:
    """The folder of the bundle whose config is being parsed, found from the config file's path.

    ``python -m monai.bundle run --config_file <abs>/configs/train.json`` resolves ids inside a
    ``ConfigWorkflow`` that knows its config folder; this walks the call stack to that workflow and returns
    the bundle folder (the parent of ``configs/``), so a run works from any working directory. Outside a
    workflow (a bare ``ConfigParser``) it returns ``fallback`` made absolute; callers such as MONAI Label
    override ``bundle_root`` anyway.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            # vars(), not getattr(): a workflow's __getattr__ looks unknown names up as config ids
            root = vars(owner).get("config_root_path") if hasattr(owner, "__dict__") else None
            if root is not None and isinstance(owner, ConfigWorkflow):
                root = Path(root).resolve()
                return str(root.parent if root.name == "configs" else root)
            frame = frame.f_back
    finally:
        del frame
    return os.path.abspath(fallback)


def default_device() -> torch.device:
    """CUDA device ``LOCAL_RANK`` (or 0) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def class_scores_and_labels(output: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A classification evaluator's decollated output as ``(scores, labels)`` for ``ignite.metrics.Accuracy``.

    Args:
        output: one dict per case with ``"pred"``, the class scores ``(C,)``, and ``"label"``, the one-hot label
            ``(C,)`` (after ``AsDiscreted(to_onehot=C)``).

    Returns:
        ``scores`` ``(B, C)`` and class indices ``(B,)``, the label's arg-max.
    """
    scores = torch.stack([o["pred"] for o in output])
    labels = torch.stack([o["label"] for o in output]).argmax(1)
    return scores, labels


def image_meta(batch: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The ``image`` metadata of each case of a decollated batch (``MetricsSaver``'s ``batch_transform``)."""
    return [item["image"].meta for item in batch]


def copy_key(datalist: Sequence[Mapping[str, Any]], source: str, target: str) -> list[dict[str, Any]]:
    """Each item of ``datalist`` with the value of ``source`` also under ``target`` (e.g. a mask read as the label).

    Raises:
        ValueError: an item has no ``source`` (named, with the item's position).
    """
    out = []
    for i, d in enumerate(datalist):
        if source not in d:
            raise ValueError(f"datalist item {i} has no {source!r} to copy to {target!r}: keys {sorted(d)}.")
        out.append({**d, target: d[source]})
    return out


def panfm_demo_organ_shapes() -> dict[str, list[int]]:
    """Pan-FM's demo organ grids as a config writes them: ``{organ: [D, H, W]}``, a fresh copy each call."""
    return {organ: list(shape) for organ, shape in PANFM_DEMO_ORGAN_SHAPES.items()}


def organ_loading(organs: Sequence[str], organ_shapes: Mapping[str, Sequence[int]], intensity: str) -> Any:
    """The organ-loading pipeline Pan-FM's configs share: ``Compose([LoadOrgansd(organs, organ_shapes, intensity)])``.

    Args:
        organs: organ names, in the encoder's order.
        organ_shapes: ``{organ: [D, H, W]}`` grid each organ volume is resampled to.
        intensity: intensity normalisation of ``LoadOrgansd`` (e.g. ``"percentile"``).

    Returns:
        A ``monai.transforms.Compose`` holding the one ``LoadOrgansd``.
    """
    from monai.transforms import Compose

    from medfm.transforms import LoadOrgansd

    return Compose([LoadOrgansd(organs=organs, organ_shapes=organ_shapes, intensity=intensity)])


def demo_size(bundle: str) -> dict[str, Any]:
    """The demo encoder size of ``bundle`` (:data:`DEMO_SIZES`) as a config writes it, a fresh copy each call.

    Raises:
        ValueError: ``bundle`` has no demo size.
    """
    if bundle not in DEMO_SIZES:
        raise ValueError(f"no demo size for bundle {bundle!r}; known: {sorted(DEMO_SIZES)}.")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_SIZES[bundle].items()}
