from .attention import SelfAttention
from .cross_attention import CrossAttention
from .mae_decoder import MAEDecoder
from .patch_embed import PatchEmbed, patchify, token_grid, unpatchify
from .pos_embed import sincos_pos_embed
from .text_encoder import TextEncoder, filter_clip_text_state_dict, load_clip_text_weights
from .twin_encoder import evenly_spaced_layers, twin_features, twin_vit_encoders
from .transformer_block import Mlp, TransformerBlock
from .vit_encoder import ViTEncoder, init_transformer_weights

__all__ = [
    "CrossAttention",
    "MAEDecoder",
    "Mlp",
    "PatchEmbed",
    "SelfAttention",
    "TextEncoder",
    "TransformerBlock",
    "ViTEncoder",
    "evenly_spaced_layers",
    "filter_clip_text_state_dict",
    "init_transformer_weights",
    "load_clip_text_weights",
    "patchify",
    "sincos_pos_embed",
    "token_grid",
    "twin_features",
    "twin_vit_encoders",
    "unpatchify",
]
