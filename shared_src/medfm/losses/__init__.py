from .fratmae_loss import FratMAELoss
from .infonce import InfoNCELoss
from .masked_mse import MaskedMSELoss, masked_mse
from .soft_ce import SoftTokenCELoss, soft_cross_entropy
from .tokenizer import (
    PerceptualLoss,
    SpadVTLoss,
    generator_gan_loss,
    hinge_d_loss,
    lpips_weight_shapes,
    token_entropy,
    usage_entropy_loss,
)

__all__ = [
    "FratMAELoss",
    "InfoNCELoss",
    "MaskedMSELoss",
    "PerceptualLoss",
    "SoftTokenCELoss",
    "SpadVTLoss",
    "generator_gan_loss",
    "hinge_d_loss",
    "lpips_weight_shapes",
    "masked_mse",
    "soft_cross_entropy",
    "token_entropy",
    "usage_entropy_loss",
]
