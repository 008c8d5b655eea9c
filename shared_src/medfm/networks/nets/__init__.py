from .fratmae import FratMAE
from .fratmae_downstream import FratMAEClassifier, FratMAESegmenter
from .midol import MIDoLHead, MIDoLSelfDistill, midol_backbone_state
from .midol_downstream import MIDoLClassifier, MIDoLSegmenter
from .panfm import PANFM_ORGANS, PanFMEncoder, PanFMOutput, PanFMSelfDistill, panfm_encoder_state
from .panfm_downstream import PanFMClassifier
from .spad_vit import SpadViT, SpadViTMIM
from .spad_vit_downstream import SpadViTClassifier, SpadViTSegmenter
from .spad_vt import ChannelLayerNorm, SpadPatchDiscriminator, SpadVT

__all__ = [
    "MIDoLClassifier",
    "MIDoLHead",
    "MIDoLSegmenter",
    "MIDoLSelfDistill",
    "midol_backbone_state",
    "PANFM_ORGANS",
    "ChannelLayerNorm",
    "FratMAE",
    "FratMAEClassifier",
    "FratMAESegmenter",
    "PanFMClassifier",
    "PanFMEncoder",
    "PanFMOutput",
    "PanFMSelfDistill",
    "SpadPatchDiscriminator",
    "SpadVT",
    "SpadViT",
    "SpadViTClassifier",
    "SpadViTMIM",
    "SpadViTSegmenter",
    "panfm_encoder_state",
]
