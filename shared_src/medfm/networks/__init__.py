from . import blocks, nets

__all__ = ["blocks", "nets"]
