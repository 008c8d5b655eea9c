from . import blocks, nets
from .pretrained import filter_fratmae_encoders, init_from_pretraining, load_fratmae_encoders

__all__ = ["blocks", "filter_fratmae_encoders", "init_from_pretraining", "load_fratmae_encoders", "nets"]
