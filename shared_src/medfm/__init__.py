"""medfm: medical-imaging foundation models (FratMAE, SPAD-ViT, Pan-FM, M-IDoL) as MONAI bundles."""

__version__ = "0.1.0"

from . import data, engines, losses, masking, metrics, networks, transforms, utils  # noqa: E402

__all__ = ["data", "engines", "losses", "masking", "metrics", "networks", "transforms", "utils"]
