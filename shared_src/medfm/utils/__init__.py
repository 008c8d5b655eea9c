from .bundle import bundle_root, default_device

__all__ = ["bundle_root", "default_device"]
