"""Batch preparation for SPAD-ViT masked image modelling: soft-token targets and masks built outside the ViT."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from torch import nn

from .batch import StepSeededGenerators, plain_tensor
from .spad_input import batch_aniso_d

__all__ = ["SpadMIMPrepareBatch"]


class SpadMIMPrepareBatch(StepSeededGenerators, PrepareBatch):
    """``(image, {"probs", "mask"}, (), {"aniso_d", "mask"})`` for ``SupervisedTrainer`` running
    :class:`medfm.networks.nets.SpadViTMIM`.

    The frozen tokenizer sees ``2 * image - 1`` and gives the soft tokens ``softmax(logits)`` (N, L, K); a
    uniform random mask hides ``L - int(L * (1 - mask_ratio))`` tokens of every sample (the reference's count).
    Masks come from this object's generator, seeded with ``seed + rank``, or from ``(seed, rank, step)`` after
    :meth:`set_step` (a run seeded per iteration, resumable exactly).

    Args:
        tokenizer: a trained :class:`medfm.networks.nets.SpadVT` (kept frozen, in eval mode).
        mask_ratio: fraction of masked tokens (SPAD-ViT: 0.55).
        seed: base seed of the mask generator.
        image_key, aniso_key: batch keys.
    """

    def __init__(
        self, tokenizer: nn.Module, mask_ratio: float = 0.55, seed: int = 0, image_key: str = "image",
        aniso_key: str = "aniso_d",
    ) -> None:  # fmt: skip
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.mask_ratio = mask_ratio
        self.init_generators(seed)
        self.image_key = image_key
        self.aniso_key = aniso_key

    def random_mask(self, batch_size: int, num_tokens: int, device: torch.device | str) -> torch.Tensor:
        """(N, L) bool, True at exactly ``L - int(L * (1 - mask_ratio))`` random tokens per row."""
        num_masked = num_tokens - int(num_tokens * (1.0 - self.mask_ratio))
        noise = torch.rand(batch_size, num_tokens, device=device, generator=self.generator(device))
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return ranks < num_masked

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, Any]]:  # fmt: skip
        aniso_d = batch_aniso_d(batchdata, self.aniso_key)
        image = plain_tensor(batchdata[self.image_key], device, non_blocking)
        self.tokenizer.eval()
        with torch.no_grad():
            logits = self.tokenizer.tokenize(2.0 * image - 1.0, aniso_d).logits
        probs = logits.float().flatten(1, -2).softmax(dim=-1)
        mask = self.random_mask(probs.shape[0], probs.shape[1], image.device)
        return image, {"probs": probs, "mask": mask}, (), {"aniso_d": aniso_d, "mask": mask}
