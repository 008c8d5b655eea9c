"""Pan-FM's seven organs, in the order every Pan-FM component (data, transforms, network, iteration) uses.

One tuple, imported by each layer from here, so that data, transforms and networks need not import each other for
it. UK Biobank MRI: brain, heart, adipose tissue, liver, kidney, spleen, pancreas (Pan-FM's abstract).
"""

from __future__ import annotations

__all__ = ["PANFM_ORGANS"]

PANFM_ORGANS: tuple[str, ...] = ("brain", "heart", "adipose", "liver", "kidney", "spleen", "pancreas")
