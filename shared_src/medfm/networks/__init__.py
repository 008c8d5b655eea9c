from . import blocks, nets
from .pretrained import (
    count_matching,
    filter_fratmae_encoders,
    filter_spad_vit_encoder,
    init_from_pretraining,
    init_midol_from_pretraining,
    init_panfm_from_pretraining,
    init_spad_vit_from_pretraining,
    load_fratmae_encoders,
    load_midol_backbone,
    load_panfm_encoder,
    load_spad_vit_encoder,
    load_weights,
)

__all__ = [
    "blocks",
    "count_matching",
    "filter_fratmae_encoders",
    "filter_spad_vit_encoder",
    "init_from_pretraining",
    "init_midol_from_pretraining",
    "init_panfm_from_pretraining",
    "init_spad_vit_from_pretraining",
    "load_fratmae_encoders",
    "load_midol_backbone",
    "load_panfm_encoder",
    "load_spad_vit_encoder",
    "load_weights",
    "nets",
]
