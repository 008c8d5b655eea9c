"""TensorBoard images of masked reconstruction: input / masked input / reconstruction, one slice each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys
from torch.utils.tensorboard import SummaryWriter

from medfm.networks.blocks import token_grid, unpatchify

__all__ = ["ReconstructionImageHandler", "reconstruction_panel"]


def reconstruction_panel(
    image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: Sequence[int], slice_axis: int = 1
) -> torch.Tensor:
    """Middle slice of [input | masked input | reconstruction (visible patches pasted back)] side by side.

    Args:
        image: (C, *spatial) one sample.
        pred: (N, P) predicted patches of that sample.
        mask: (N,) bool, True = masked.
        patch_size: patch size per spatial dim.
        slice_axis: spatial axis to slice (1 = coronal in RAS array order X, Y, Z).

    Returns:
        (1, H, 3 W) float image in [0, 1] for ``SummaryWriter.add_image`` (CHW).
    """
    c = image.shape[0]
    grid = token_grid(image.shape[1:], patch_size)
    m = mask.to(image.dtype).reshape(-1, 1).expand(-1, pred.shape[-1])
    mask_img = unpatchify(m.unsqueeze(0), grid, patch_size, c)[0]
    recon = unpatchify(pred.unsqueeze(0).to(image.dtype), grid, patch_size, c)[0]
    recon = image * (1 - mask_img) + recon * mask_img
    masked = image * (1 - mask_img)
    idx = image.shape[1 + slice_axis] // 2
    panels = [t[0].select(slice_axis, idx) for t in (image, masked, recon)]
    # show the long body axis vertically, head up
    panels = [p.t().flip(0) if p.ndim == 2 else p for p in panels]
    return torch.cat(panels, dim=1).clamp(0, 1).unsqueeze(0).float()


class ReconstructionImageHandler:
    """Every ``interval`` epochs, log for each modality masked in the last iteration a coronal-slice panel
    (input / masked / reconstruction) of the batch's first sample, tagged ``recon/<modality>``.

    Args:
        log_dir: TensorBoard folder (shared with the stats handler is fine).
        patch_size: the network's patch size.
        modalities: modality names; each is also the batch key of its image (``engine.state.batch[m]``).
        slice_axis: spatial axis to slice (1 = coronal).
        interval: epochs between logs.
    """

    def __init__(
        self,
        log_dir: str,
        patch_size: Sequence[int],
        modalities: Sequence[str] = ("pet", "ct"),
        slice_axis: int = 1,
        interval: int = 1,
    ) -> None:
        self.log_dir = log_dir
        self.patch_size = tuple(patch_size)
        self.modalities = tuple(modalities)
        self.slice_axis = slice_axis
        self.interval = interval
        self.writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def close(self, engine: Engine | None = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __call__(self, engine: Engine) -> None:
        output: dict[str, Any] = engine.state.output
        preds = output[Keys.PRED]
        batch = engine.state.batch
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        for m in self.modalities:
            if f"{m}_pred" not in preds:
                continue
            image = batch[m][0]
            image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
            panel = reconstruction_panel(
                image.detach().cpu().float(),
                preds[f"{m}_pred"][0].detach().cpu().float(),
                preds[f"{m}_mask"][0].detach().cpu(),
                self.patch_size,
                self.slice_axis,
            )
            self.writer.add_image(f"recon/{m}", panel, engine.state.iteration)
        self.writer.flush()
