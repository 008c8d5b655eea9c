from .fratmae import FratMAE
from .fratmae_downstream import FratMAEClassifier, FratMAESegmenter

__all__ = ["FratMAE", "FratMAEClassifier", "FratMAESegmenter"]
