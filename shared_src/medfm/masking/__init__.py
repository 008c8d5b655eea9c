from .cross_modal import asymmetric_cross_modal_masking, independent_masking
from .random import TokenMask, num_visible, random_masking

__all__ = ["TokenMask", "asymmetric_cross_modal_masking", "independent_masking", "num_visible", "random_masking"]
