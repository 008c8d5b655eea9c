from .attention import SelfAttention
from .code_usage import token_entropy, usage_entropy_loss
from .cross_attention import CrossAttention
from .dino_head import DINOHead
from .ema import EMATeacherPair
from .eva_block import eva_block
from .linear_probe import ProbedBackbone
from .mae_decoder import MAEDecoder
from .moe import MoEProjector
from .patch_embed import PatchEmbed, patchify, token_grid, unpatchify
from .pos_embed import sincos_pos_embed
from .rope import Rope3D, apply_rope, rope_frequencies
from .sizes import SPAD_VIT_SIZES, SWIN_SIZES, resolve_size
from .soft_quantizer import SoftQuantizer, SoftQuantizerOutput
from .spad import (
    MAX_ANISO_D,
    SpadConv3d,
    SpadConvTranspose3d,
    SpadDownsample,
    SpadSequential,
    SpadUpsample,
    aniso_d_from_spacing,
    default_aniso_d,
    inflate_2d_weight,
)
from .swin import PatchMerging, SwinBackbone, SwinBlock, SwinStage, WindowAttention
from .text_encoder import TextEncoder, filter_clip_text_state_dict, load_clip_text_weights
from .transformer_block import Mlp, SwiGLU, TransformerBlock
from .trunk import TransformerTrunk, resolve_indices
from .twin_encoder import evenly_spaced_layers, twin_features, twin_vit_encoders
from .vit_encoder import VIT_SIZES, ViTEncoder, init_transformer_weights, init_trunc_normal_weights

__all__ = [
    "EMATeacherPair",
    "MAX_ANISO_D",
    "CrossAttention",
    "DINOHead",
    "MAEDecoder",
    "Mlp",
    "MoEProjector",
    "PatchEmbed",
    "ProbedBackbone",
    "PatchMerging",
    "Rope3D",
    "SelfAttention",
    "SoftQuantizer",
    "SoftQuantizerOutput",
    "SpadConv3d",
    "SpadConvTranspose3d",
    "SpadDownsample",
    "SpadSequential",
    "SpadUpsample",
    "SwiGLU",
    "SwinBackbone",
    "SwinBlock",
    "SwinStage",
    "TextEncoder",
    "TransformerBlock",
    "TransformerTrunk",
    "SPAD_VIT_SIZES",
    "SWIN_SIZES",
    "VIT_SIZES",
    "ViTEncoder",
    "WindowAttention",
    "aniso_d_from_spacing",
    "apply_rope",
    "default_aniso_d",
    "eva_block",
    "evenly_spaced_layers",
    "filter_clip_text_state_dict",
    "inflate_2d_weight",
    "init_transformer_weights",
    "init_trunc_normal_weights",
    "load_clip_text_weights",
    "patchify",
    "resolve_indices",
    "resolve_size",
    "rope_frequencies",
    "sincos_pos_embed",
    "token_entropy",
    "token_grid",
    "twin_features",
    "twin_vit_encoders",
    "unpatchify",
    "usage_entropy_loss",
]
