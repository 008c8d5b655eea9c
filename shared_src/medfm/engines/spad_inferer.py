"""Sliding-window inference whose window follows the batch's anisotropy level."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference

from medfm.networks.blocks.spad import aniso_d_from_spacing, default_aniso_d
from medfm.transforms.spad import spad_roi_size

__all__ = ["SpadSlidingWindowInferer"]


class SpadSlidingWindowInferer(Inferer):
    """``sliding_window_inference`` with a window of ``tokens`` patches, sized per call from ``aniso_d``.

    ``aniso_d`` reaches the network as a keyword (``network(window, aniso_d=…)``). When the caller gives none
    (MONAI Label calls ``inferer(image, network)``), it is read from the input's spacing if the input is a
    MetaTensor laid out depth first (after :class:`medfm.transforms.ReorientToDepthd`), else 5 for a depth-1
    input and 0 otherwise. Images smaller than the window are padded.

    Args:
        tokens: window size in tokens (t_d, t_h, t_w).
        patch_size: the ViT's in-plane patch size.
        sw_batch_size, overlap, mode: as in ``monai.inferers.SlidingWindowInferer``.
    """

    def __init__(
        self, tokens: Sequence[int], patch_size: int = 16, sw_batch_size: int = 1, overlap: float = 0.25,
        mode: str = "gaussian",
    ) -> None:  # fmt: skip
        super().__init__()
        self.tokens = tuple(int(t) for t in tokens)
        spad_roi_size(self.tokens, 0, patch_size)
        self.patch_size = patch_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.mode = mode

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, aniso_d: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        if aniso_d is None and isinstance(inputs, MetaTensor) and inputs.shape[2] > 1:
            aniso_d = aniso_d_from_spacing([float(v) for v in inputs.pixdim[:3]])
        aniso_d = default_aniso_d(inputs, aniso_d)
        roi = spad_roi_size(self.tokens, aniso_d, self.patch_size, is_2d=inputs.shape[2] == 1)
        return sliding_window_inference(
            inputs, roi, self.sw_batch_size, network, self.overlap, self.mode, *args, aniso_d=aniso_d, **kwargs
        )
