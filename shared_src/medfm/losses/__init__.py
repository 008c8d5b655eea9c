from .fratmae_loss import FratMAELoss
from .infonce import InfoNCELoss
from .masked_mse import MaskedMSELoss, masked_mse

__all__ = ["FratMAELoss", "InfoNCELoss", "MaskedMSELoss", "masked_mse"]
