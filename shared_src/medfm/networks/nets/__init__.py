from .fratmae import FratMAE

__all__ = ["FratMAE"]
