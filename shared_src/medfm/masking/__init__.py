from .cross_modal import asymmetric_cross_modal_masking, independent_masking
from .random import TokenMask, num_visible, random_masking
from .saliency import (
    SUPPORTED_ORGAN_MASKING,
    organ_attention_share,
    organ_masking,
    random_organ_mask,
    sample_organ_mask,
    sgm_probabilities,
)

__all__ = ["TokenMask", "asymmetric_cross_modal_masking", "independent_masking", "num_visible", "random_masking"]
__all__ += [
    "SUPPORTED_ORGAN_MASKING",
    "organ_attention_share",
    "organ_masking",
    "random_organ_mask",
    "sample_organ_mask",
    "sgm_probabilities",
]
