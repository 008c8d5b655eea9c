"""DINO projection head: MLP -> bottleneck -> L2-normalise -> weight-normalised prototypes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """DINO projection head (Caron et al., arXiv:2104.14294): MLP -> bottleneck -> L2-normalise ->
    weight-normalised linear layer without bias.

    The last layer's weight is ``g * v / ||v||`` row-wise, written out here (no ``nn.utils.weight_norm``). With
    ``norm_last_layer=True`` (DINO's default) ``g`` is fixed at 1 and not a parameter. With ``nlayers=0`` there is
    no MLP (``mlp`` is ``nn.Identity``): the input itself is normalised and projected onto the prototypes (the
    M-IDoL head, whose mixture of experts comes before).

    Args:
        in_dim: input width.
        out_dim: prototypes (DINO: 65536).
        hidden_dim: MLP width (DINO: 2048).
        bottleneck_dim: width before the last layer (DINO: 256); with ``nlayers=0`` None or ``in_dim``.
        nlayers: linear layers before the last one (DINO: 3); 0 for none.
        norm_last_layer: fix the last layer's row norms at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int | None = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 0 or out_dim < 1:
            raise ValueError(f"nlayers must be >= 0 and out_dim positive, got {nlayers} and {out_dim}.")
        if nlayers == 0 and bottleneck_dim not in (None, in_dim):
            raise ValueError(f"nlayers=0: bottleneck_dim must be None or in_dim={in_dim}, got {bottleneck_dim}.")
        if nlayers > 0 and (bottleneck_dim is None or bottleneck_dim < 1):
            raise ValueError(f"bottleneck_dim must be positive with an MLP, got {bottleneck_dim}.")
        width = in_dim if nlayers == 0 else int(bottleneck_dim)  # type: ignore[arg-type]
        layers: list[nn.Module] = []
        if nlayers > 0:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [width]
            for i, (a, b) in enumerate(itertools.pairwise(dims)):
                layers.append(nn.Linear(a, b))
                if i < nlayers - 1:
                    layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers) if layers else nn.Identity()
        self.last_v = nn.Parameter(torch.empty(out_dim, width))
        self.last_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_v, std=0.02)

    def last_weight(self) -> torch.Tensor:
        """(out_dim, bottleneck_dim) weight of the last layer: rows of v scaled to norm g."""
        w = F.normalize(self.last_v, dim=1)
        return w if self.last_g is None else w * self.last_g

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype weights (``last_v`` and, without ``norm_last_layer``, ``last_g``): DINO freezes them
        during the first epoch."""
        return [p for p in (self.last_v, self.last_g) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_dim) -> (..., out_dim) logits."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_weight().to(x.dtype))
