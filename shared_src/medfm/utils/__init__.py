from .bundle import bundle_root, default_device
from .optim import weight_decay_groups
from .release import download_bundle, package_bundle, safe_extract, sha256_file

__all__ = [
    "bundle_root",
    "default_device",
    "download_bundle",
    "package_bundle",
    "safe_extract",
    "sha256_file",
    "weight_decay_groups",
]
