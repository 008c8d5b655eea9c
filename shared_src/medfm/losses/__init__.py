from .fratmae_loss import FratMAELoss
from .infonce import InfoNCELoss
from .masked_mse import MaskedMSELoss, masked_mse
from .routing import MIDoLLoss, RoutingConsistencyLoss, sinkhorn_knopp
from .self_distill import DINOLoss, IBOTPatchLoss, PanFMLoss, momentum_schedule, teacher_temp_schedule
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
    "DINOLoss",
    "FratMAELoss",
    "IBOTPatchLoss",
    "InfoNCELoss",
    "MIDoLLoss",
    "MaskedMSELoss",
    "PanFMLoss",
    "PerceptualLoss",
    "RoutingConsistencyLoss",
    "SoftTokenCELoss",
    "SpadVTLoss",
    "generator_gan_loss",
    "hinge_d_loss",
    "lpips_weight_shapes",
    "masked_mse",
    "momentum_schedule",
    "sinkhorn_knopp",
    "soft_cross_entropy",
    "teacher_temp_schedule",
    "token_entropy",
    "usage_entropy_loss",
]
