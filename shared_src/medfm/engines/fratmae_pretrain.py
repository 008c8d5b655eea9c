"""FratMAE pre-training: masks and reconstruction targets built outside the network (the step itself is
:class:`medfm.engines.TrainingIteration`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import ensure_tuple_rep

from medfm.masking import asymmetric_cross_modal_masking, independent_masking
from medfm.networks.blocks import patchify, token_grid

from .batch import StepSeededGenerators, plain_tensor

__all__ = ["FratMAEPretrainPrepareBatch"]


class FratMAEPretrainPrepareBatch(StepSeededGenerators, PrepareBatch):
    """Turn a collated PET/CT batch into ``(pet, targets, (ct,), {"masks", "text_tokens"})`` for
    ``SupervisedTrainer`` (its inferer then calls ``network(pet, ct, masks=…, text_tokens=…)``). ``targets`` holds
    the patchified masked modalities and, with ContextAlign, the prompt token ids (``text_tokens``) that
    :class:`medfm.losses.FratMAELoss` uses to keep identical prompts out of each other's negatives.

    Masks are drawn on the batch's device from this object's own generator, seeded with
    ``seed + rank`` so that DDP ranks draw different masks and a run is repeatable, or from ``(seed, rank, step)``
    after :meth:`set_step` (a run seeded per iteration, resumable exactly).

    Args:
        patch_size: the network's patch size.
        mask_ratio: fraction of the masked modality's tokens to mask (FratMAE: 0.5).
        cross_modal: FratMAE's asymmetric masking (one modality masked, chosen each iteration); False masks
            both modalities independently (the per-modality MAE ablation).
        seed: base seed of the mask generator.
        image_keys: batch keys of the PET and CT images, in that order.
        text_key: batch key of the prompt token ids, or None when ContextAlign is off.
        masked_modality: always mask this modality instead of drawing it (for tests and inspection).
    """

    def __init__(
        self,
        patch_size: int | Sequence[int],
        mask_ratio: float = 0.5,
        cross_modal: bool = True,
        seed: int = 0,
        image_keys: Sequence[str] = ("pet", "ct"),
        text_key: str | None = "prompt_ids",
        masked_modality: str | None = None,
        spatial_dims: int = 3,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if len(image_keys) != 2:
            raise ValueError(f"image_keys must name the PET and the CT key, got {list(image_keys)}.")
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        self.mask_ratio = mask_ratio
        self.cross_modal = cross_modal
        self.init_generators(seed)
        self.image_keys = tuple(image_keys)
        self.text_key = text_key
        self.masked_modality = masked_modality

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor], dict[str, Any]]:
        for k in (*self.image_keys, *([self.text_key] if self.text_key else [])):
            if k not in batchdata:
                raise KeyError(f"the batch has no {k!r} entry (keys: {sorted(batchdata)}).")
        pet, ct = (plain_tensor(batchdata[k], device, non_blocking) for k in self.image_keys)
        b = pet.shape[0]
        n = 1
        for g in token_grid(pet.shape[2:], self.patch_size):
            n *= g
        gen = self.generator(pet.device)
        mods = ("pet", "ct")
        if self.cross_modal:
            masks = asymmetric_cross_modal_masking(
                b, n, self.mask_ratio, mods, gen, pet.device, masked_modality=self.masked_modality
            )
        else:
            masks = independent_masking(b, n, self.mask_ratio, mods, gen, pet.device)
        images = {"pet": pet, "ct": ct}
        targets = {m: patchify(images[m], self.patch_size) for m, mk in masks.items() if mk is not None}
        net_kwargs: dict[str, Any] = {"masks": masks}
        if self.text_key:
            tokens = plain_tensor(batchdata[self.text_key], device, non_blocking).long()
            net_kwargs["text_tokens"] = tokens
            targets["text_tokens"] = tokens  # identical prompts are not each other's InfoNCE negatives
        return pet, targets, (ct,), net_kwargs
