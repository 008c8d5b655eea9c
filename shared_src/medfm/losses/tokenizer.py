"""SPAD-VT tokenizer objective: L1 + LPIPS + code-usage and token-entropy terms + hinge GAN.

SPAD-Nets (Luo et al., "Building Universal Foundation Models for Medical Image Analysis with Spatially Adaptive
Networks", arXiv:2312.07630); reference code PUMIT ``pumit/tokenizer/{loss,lpips,quantize}.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm.networks.blocks.code_usage import token_entropy, usage_entropy_loss

__all__ = [
    "PerceptualLoss",
    "SpadVTLoss",
    "generator_gan_loss",
    "hinge_d_loss",
    "lpips_weight_shapes",
    "token_entropy",
    "usage_entropy_loss",
]

logger = logging.getLogger(__name__)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))`` on raw scores."""
    return 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())


def generator_gan_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss ``-mean(fake)`` on the discriminator's raw scores of reconstructions."""
    return -fake.float().mean()


# VGG16 ``features`` (torchvision layout): conv channels; "M" = max-pool. LPIPS taps relu1_2 .. relu5_3.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (4, 9, 16, 23, 30)  # ends of the five slices of ``features`` (after each stage's last ReLU)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def lpips_weight_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes :class:`PerceptualLoss` needs from its weight file(s).

    * ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 convolutions of torchvision's VGG16
      (``i`` in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28): torchvision's ``vgg16-397923af.pth`` as is
      (its ``classifier.*`` keys are ignored);
    * ``lin{j}.model.1.weight`` of shape (1, C_j, 1, 1), j = 0..4: the LPIPS repository's ``weights/v0.1/vgg.pth``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    c_in, idx = 3, 0
    for v in _VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        shapes[f"features.{idx}.weight"] = (v, c_in, 3, 3)
        shapes[f"features.{idx}.bias"] = (v,)
        c_in, idx = v, idx + 2
    for j, c in enumerate(_LPIPS_CHANNELS):
        shapes[f"lin{j}.model.1.weight"] = (1, c, 1, 1)
    return shapes


class PerceptualLoss(nn.Module):
    """LPIPS with a VGG16 backbone (Zhang et al., arXiv:1801.03924), frozen, loaded from local files only.

    ``LPIPS(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` with ``f_l`` the VGG16 activations
    relu1_2 .. relu5_3, ``n`` unit-normalisation over channels and ``w_l`` the learned 1x1 weights; inputs in
    [-1, 1] are shifted and scaled with LPIPS's own constants. Returned averaged over the batch. The reference
    code returns twice this value (and shifts inputs with the opposite sign); ``SpadVTLoss(perceptual_weight=2)``
    reproduces its scale.

    Nothing is downloaded: give the file(s) holding the keys of :func:`lpips_weight_shapes`, e.g.
    ``[".../vgg16-397923af.pth", ".../lpips/weights/v0.1/vgg.pth"]`` or one file merging both.

    Args:
        weights: path, or paths merged in order, of state dicts loaded with ``torch.load(weights_only=True)``.
    """

    def __init__(self, weights: str | Sequence[str]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(weights)
        self.requires_grad_(False)
        self.eval()

    def _load(self, weights: str | Sequence[str]) -> None:
        paths = [weights] if isinstance(weights, str) else list(weights)
        merged: dict[str, torch.Tensor] = {}
        for p in paths:
            try:
                merged.update(torch.load(p, map_location="cpu", weights_only=True))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"cannot read LPIPS/VGG16 weights from {p!r}: {e}") from e
        expected = lpips_weight_shapes()
        missing = [k for k in expected if k not in merged]
        wrong = [
            f"{k} {tuple(merged[k].shape)} != {s}"
            for k, s in expected.items()
            if k in merged and tuple(merged[k].shape) != s
        ]
        if missing or wrong:
            raise ValueError(
                f"LPIPS weights {paths} do not match lpips_weight_shapes(): missing {missing[:6]}"
                f"{' …' if len(missing) > 6 else ''}; wrong shapes {wrong[:6]}."
            )
        state = {k: merged[k] for k in expected if k.startswith("features.")}
        state.update({f"lins.{j}.weight": merged[f"lin{j}.model.1.weight"] for j in range(len(_LPIPS_CHANNELS))})
        self.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always in eval mode (a frozen metric)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x, y: (B, C, H, W) images in [-1, 1], C = 3 (or 1, replicated to RGB).

        Returns:
            float32 scalar, LPIPS averaged over the batch.
        """
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] not in (1, 3):
            raise ValueError(
                f"expected two (B, 1 or 3, H, W) images of one shape, got {tuple(x.shape)}, {tuple(y.shape)}."
            )
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = x.new_zeros((), dtype=torch.float32)
        start = 0
        for end, lin in zip(_LPIPS_TAPS, self.lins):
            h = self.features[start:end](h)
            start = end
            f = h.float()
            f = f / (f.norm(dim=1, keepdim=True) + 1e-10)
            fx, fy = f.chunk(2)
            total = total + lin((fx - fy).pow(2).to(lin.weight.dtype)).float().mean()
        return total


class SpadVTLoss(nn.Module):
    """The SPAD-VT generator objective (arXiv:2312.07630; PUMIT ``VQGANLoss.forward_gen``).

    ``loss = rec_weight * L1(x_rec, x) + perceptual_weight * LPIPS + usage_weight * sum_k pbar_k log pbar_k
    + entropy_weight * mean H(p) + gan_weight * (-mean D(x_rec))``; a weight of 0 removes its term.

    Defaults and their sources: L1 and LPIPS weights 1 and at most 24 LPIPS slices (reference
    ``conf/tokenizer/simple/loss.yaml``); GAN weight 3e-3 without adaptive weighting (same file; the term is
    only switched on by the training loop's discriminator-loss gate, see
    :class:`medfm.engines.SpadTokenizerIteration`); usage (the reference's ``quant_weight``) 0.03 and entropy 1.0
    are the method's as given in the PUMIT README's training command and our notes (METHODS.md §2) — the
    ``loss.yaml`` itself has ``quant_weight: 1.0`` and ``entropy_weight: 0.2``.

    LPIPS needs pretrained VGG16 + LPIPS weights, which are never downloaded: with ``lpips_weights=None`` the
    perceptual term is off (reported as 0, logged once when the loss is built). Move the loss to the training
    device (``loss.to(device)``) when the perceptual term is on.

    Args:
        rec_weight: L1 reconstruction weight.
        perceptual_weight: LPIPS weight (per 2D slice).
        usage_weight: weight of the negative entropy of the batch-mean code usage.
        entropy_weight: weight of the mean per-token entropy (sharp token distributions).
        gan_weight: weight of the generator hinge-GAN term when the caller passes discriminator scores.
        max_perceptual_slices: LPIPS on at most this many random depth slices per sample while training.
        lpips_weights: local path(s) for :class:`PerceptualLoss`; None disables the perceptual term.
    """

    def __init__(
        self,
        rec_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        usage_weight: float = 0.03,
        entropy_weight: float = 1.0,
        gan_weight: float = 3e-3,
        max_perceptual_slices: int = 24,
        lpips_weights: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        weights = {"rec_weight": rec_weight, "perceptual_weight": perceptual_weight, "usage_weight": usage_weight,
                   "entropy_weight": entropy_weight, "gan_weight": gan_weight}  # fmt: skip
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}.")
        if max_perceptual_slices < 1:
            raise ValueError(f"max_perceptual_slices must be >= 1, got {max_perceptual_slices}.")
        self.rec_weight = rec_weight
        self.usage_weight = usage_weight
        self.entropy_weight = entropy_weight
        self.gan_weight = gan_weight
        self.max_perceptual_slices = max_perceptual_slices
        if perceptual_weight > 0 and lpips_weights is None:
            logger.warning("SpadVTLoss: no lpips_weights given, the LPIPS perceptual term is off (weight 0).")
            perceptual_weight = 0.0
        self.perceptual_weight = perceptual_weight
        self.perceptual = PerceptualLoss(lpips_weights) if perceptual_weight > 0 else None

    def perceptual_term(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """LPIPS over 2D slices of (N, C, D, H, W) images; at most ``max_perceptual_slices`` random slices per
        sample while training (all slices otherwise)."""
        if self.perceptual is None:
            return x.new_zeros((), dtype=torch.float32)
        n, c, d, h, w = x.shape
        k = self.max_perceptual_slices
        if self.training and d > k:
            idx = torch.rand(n, d, device=x.device).argsort(dim=1)[:, :k]
            idx = idx.view(n, 1, k, 1, 1).expand(n, c, k, h, w)
            x, x_rec = x.gather(2, idx), x_rec.gather(2, idx)
        return self.perceptual(x.movedim(2, 1).flatten(0, 1), x_rec.movedim(2, 1).flatten(0, 1))

    def forward_terms(
        self,
        preds: Sequence,
        targets: torch.Tensor,
        fake_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            preds: the tokenizer's output ``(x_rec, quant_out)``: x_rec (N, C, D, H, W) and a
                :class:`medfm.networks.blocks.SoftQuantizerOutput` (``usage_loss``, ``token_entropy``).
            targets: x (N, C, D, H, W), the tokenizer's input (in [-1, 1]).
            fake_logits: discriminator scores of ``x_rec`` (with gradient to ``x_rec``) to add the GAN term;
                None leaves it out (``gan`` reported as 0).

        Returns:
            float32 scalars ``loss`` (the total), ``rec``, ``perceptual``, ``usage``, ``entropy``, ``gan``
            (unweighted terms).
        """
        x_rec, quant_out = preds[0], preds[1]
        if x_rec.shape != targets.shape:
            raise ValueError(f"reconstruction {tuple(x_rec.shape)} and target {tuple(targets.shape)} differ in shape.")
        zero = targets.new_zeros((), dtype=torch.float32)
        terms = {
            "rec": F.l1_loss(x_rec.float(), targets.float()),
            "perceptual": self.perceptual_term(targets, x_rec),
            "usage": quant_out.usage_loss.float(),
            "entropy": quant_out.token_entropy.float(),
            "gan": generator_gan_loss(fake_logits) if fake_logits is not None else zero,
        }
        weights = {"rec": self.rec_weight, "perceptual": self.perceptual_weight, "usage": self.usage_weight,
                   "entropy": self.entropy_weight, "gan": self.gan_weight}  # fmt: skip
        total = zero
        for name, w in weights.items():
            if w > 0:
                total = total + w * terms[name]
        terms["loss"] = total
        return terms

    def forward(self, preds: Sequence, targets: torch.Tensor) -> torch.Tensor:
        return self.forward_terms(preds, targets)["loss"]

    def extra_repr(self) -> str:
        return (f"rec={self.rec_weight}, perceptual={self.perceptual_weight}, usage={self.usage_weight}, "
                f"entropy={self.entropy_weight}, gan={self.gan_weight}")  # fmt: skip
