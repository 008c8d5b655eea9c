"""A linear head on a backbone's features, fine-tuned with it or trained alone on the frozen backbone (a linear
probe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ProbedBackbone"]


class ProbedBackbone(nn.Module):
    """Base of the classifiers that put ``head`` (a Linear, truncated-normal weights with std 0.02, zero bias) on a
    backbone's pooled features. With ``linear_probe`` the backbone gets no gradient and stays in eval mode (no
    stochastic depth), and its forward runs without autograd.

    Subclasses build their backbone, then call :meth:`_init_probe`; :meth:`features` runs it.

    Args of :meth:`_init_probe`:
        backbone_name: attribute holding the backbone (kept as named for the checkpoints' keys).
        in_features, out_features: the head.
        linear_probe: freeze the backbone.
    """

    linear_probe: bool
    _backbone_name: str

    def _init_probe(self, backbone_name: str, in_features: int, out_features: int, linear_probe: bool) -> None:
        self._backbone_name = backbone_name
        self.linear_probe = linear_probe
        self.head = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if linear_probe:
            self.get_submodule(backbone_name).requires_grad_(False)

    def train(self, mode: bool = True) -> ProbedBackbone:
        super().train(mode)
        if self.linear_probe:
            self.get_submodule(self._backbone_name).eval()
        return self

    def features(self, run: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``run(*args)`` (a call of the backbone), without autograd under a linear probe."""
        if self.linear_probe:
            with torch.no_grad():
                return run(*args)
        return run(*args)
