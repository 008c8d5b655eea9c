from .fratmae import FratMAE
from .fratmae_downstream import FratMAEClassifier, FratMAESegmenter
from .spad_vit import SpadViT, SpadViTMIM
from .spad_vit_downstream import SpadViTClassifier, SpadViTSegmenter
from .spad_vt import ChannelLayerNorm, SpadPatchDiscriminator, SpadVT

__all__ = [
    "ChannelLayerNorm",
    "FratMAE",
    "FratMAEClassifier",
    "FratMAESegmenter",
    "SpadPatchDiscriminator",
    "SpadVT",
    "SpadViT",
    "SpadViTClassifier",
    "SpadViTMIM",
    "SpadViTSegmenter",
]
