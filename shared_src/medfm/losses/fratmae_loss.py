"""FratMAE's training objective: masked-token MSE plus (with ContextAlign) InfoNCE."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .infonce import InfoNCELoss
from .masked_mse import masked_mse

__all__ = ["FratMAELoss"]


class FratMAELoss(nn.Module):
    """L = MSE on the masked tokens of each masked modality (averaged over them) + w * InfoNCE(PET, text).

    The InfoNCE term runs over the global batch under DDP and leaves identical prompts out of each other's
    negatives (:class:`medfm.losses.InfoNCELoss`).

    FratMAE (Oh et al., arXiv:2503.02824), Eqs. (3) and (4). ``infonce_weight=0`` removes the InfoNCE term.

    Args:
        infonce_weight: weight of the ContextAlign term (paper: the two are summed, weight 1).
        temperature: InfoNCE temperature.
        symmetric: both InfoNCE directions (CLIP) or image-to-text only (the paper's Eq. 4).
        norm_pix: MAE's per-patch normalised targets.
    """

    def __init__(
        self, infonce_weight: float = 1.0, temperature: float = 0.07, symmetric: bool = True, norm_pix: bool = False
    ) -> None:
        super().__init__()
        if infonce_weight < 0:
            raise ValueError(f"infonce_weight must be >= 0, got {infonce_weight}.")
        self.infonce_weight = infonce_weight
        self.norm_pix = norm_pix
        self.infonce = InfoNCELoss(temperature, symmetric) if infonce_weight > 0 else None

    def forward_terms(
        self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            preds: network output: ``{m}_pred`` and ``{m}_mask`` per masked modality; ``image_embed`` and
                ``text_embed`` with ContextAlign.
            targets: ``{m}`` (B, N, P) patchified images; with ContextAlign optionally ``text_tokens`` (B, L), the
                prompt token ids: samples with identical prompts are not used as each other's negatives.

        Returns:
            ``loss`` (the total), ``mse``, and ``infonce`` when that term is on; float32 scalars.
        """
        mods = [k[: -len("_pred")] for k in preds if k.endswith("_pred")]
        if not mods:
            raise ValueError("the network output holds no '<modality>_pred': was any modality masked?")
        mse = torch.stack([masked_mse(preds[f"{m}_pred"], targets[m], preds[f"{m}_mask"], self.norm_pix) for m in mods])
        terms = {"mse": mse.mean()}
        total = terms["mse"]
        if self.infonce is not None:
            if "image_embed" not in preds or "text_embed" not in preds:
                raise ValueError("infonce_weight > 0 needs a network built with context_align=True.")
            terms["infonce"] = self.infonce(preds["image_embed"], preds["text_embed"], targets.get("text_tokens"))
            total = total + self.infonce_weight * terms["infonce"]
        terms["loss"] = total
        return terms

    def forward(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_terms(preds, targets)["loss"]
