"""Batch preparation shared by every SPAD stage (tokenizer training, fine-tuning, inference): the image (scaled for
the tokenizer) and the batch's anisotropy level."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from medfm.networks.blocks.spad import default_aniso_d

from .batch import plain_tensor

__all__ = ["SpadInputPrepareBatch", "batch_aniso_d"]


def batch_aniso_d(batchdata: Mapping[str, Any], key: str = "aniso_d") -> int:
    """The single anisotropy level of a collated batch; a clear error when it is missing or mixed."""
    if key not in batchdata:
        raise KeyError(f"the batch has no '{key}' (add medfm.transforms.ReorientToDepthd to the transforms).")
    values = torch.as_tensor(batchdata[key]).reshape(-1).unique()
    if values.numel() != 1:
        raise ValueError(
            f"a batch mixes aniso_d values {values.tolist()}; build the DataLoader with "
            "medfm.data.AnisoBatchSampler so that every batch has one."
        )
    return int(values.item())


class SpadInputPrepareBatch(PrepareBatch):
    """Turn a collated batch into ``(image, target, (), {"aniso_d": int})`` for ``SupervisedTrainer`` /
    ``SupervisedEvaluator``.

    SPAD networks take one anisotropy level per batch (the reference buckets batches by ``aniso_d``), passed
    as a Python int so the network sees plain tensors; a batch mixing levels is refused. The target is the
    (scaled) image itself (SPAD-VT reconstructs its input) or, with ``label_key``, the label (fine-tuning).

    Args:
        image_key: batch key of the (N, C, D, H, W) images, intensities in [0, 1].
        aniso_key: batch key of the per-sample levels (collated ints); None derives the level from the depth
            (5 for D = 1, else 0, :func:`medfm.networks.blocks.spad.default_aniso_d`).
        scale_to_tokenizer: map [0, 1] to [-1, 1] (``2 x - 1``), the SPAD-VT input range.
        label_key: batch key of the target (segmentation map or class); None makes the image the target.
        keep_meta: keep MetaTensor metadata on image and label (inference: ``Invertd`` in the postprocessing
            needs the image's applied transforms); training drops it, the hot path needs plain tensors.
    """

    def __init__(
        self,
        image_key: str = "image",
        aniso_key: str | None = "aniso_d",
        scale_to_tokenizer: bool = True,
        label_key: str | None = None,
        keep_meta: bool = False,
    ):
        self.image_key = image_key
        self.keep_meta = keep_meta
        self.label_key = label_key
        self.aniso_key = aniso_key
        self.scale_to_tokenizer = scale_to_tokenizer

    def _tensor(self, x: Any, device: str | torch.device | None, non_blocking: bool) -> torch.Tensor:
        if self.keep_meta and isinstance(x, torch.Tensor):
            return x.to(device=device, non_blocking=non_blocking)
        return plain_tensor(x, device, non_blocking)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, int]]:
        if self.image_key not in batchdata:
            raise KeyError(f"the batch has no {self.image_key!r} entry (keys: {sorted(batchdata)}).")
        image = self._tensor(batchdata[self.image_key], device, non_blocking)
        if kwargs:  # the engine's to_kwargs (e.g. memory_format)
            image = image.to(**kwargs)
        if image.ndim != 5:
            raise ValueError(f"{self.image_key!r} must be (N, C, D, H, W), got shape {tuple(image.shape)}.")
        # one level per batch (clear errors when missing or mixed), checked to lie in [0, MAX_ANISO_D]
        aniso_d = batch_aniso_d(batchdata, self.aniso_key) if self.aniso_key else None
        aniso_d = default_aniso_d(image, aniso_d)
        if not image.is_floating_point():
            image = image.float()
        if self.scale_to_tokenizer:
            image = image * 2 - 1
        if self.label_key is None:
            return image, image, (), {"aniso_d": aniso_d}
        label = batchdata.get(self.label_key)
        label = None if label is None else self._tensor(label, device, non_blocking)
        return image, label, (), {"aniso_d": aniso_d}
