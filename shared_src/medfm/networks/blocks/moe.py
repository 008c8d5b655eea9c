"""Mixture-of-experts projector routed per image (M-IDoL's MoE head, ``notes/METHODS.md`` 4).

A dense PyTorch re-implementation of what the reference code builds with Tutel: no compiled extension, no
``torch.distributed`` requirement, every expert on every rank (no expert parallelism).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoEProjector"]


class MoEProjector(nn.Module):
    """Top-k mixture of MLP experts on a pooled feature, one routing decision per image (M-IDoL).

    Gate: ``router_logits = x @ W_g^T`` (Linear(in_dim -> E) without bias), computed in float32 also under
    autocast. Experts: Linear(in_dim -> hidden_dim) - GELU - Linear(hidden_dim -> in_dim).

    Combination rule (Tutel's top-k gate, as the reference code configures it): in training, noise
    ``gate_noise * n / E`` with ``n ~ N(0, 1)`` per image and expert is added to the router logits (in eval mode
    and with ``gate_noise`` 0, none); ``p = softmax(noisy logits)`` over all E experts; ``S`` = the ``top_k``
    experts of largest ``p`` (ties broken by ``torch.topk``); ``w_e = p_e`` (default, the reference's
    ``normalize_gate=False``) or, with ``normalize_gate``, ``w_e = p_e / sum_{j in S} p_j``; ``output =
    sum_{e in S} w_e * expert_e(x)``. The returned ``router_logits`` are the noise-free logits (what the reference's
    routing loss reads). Without renormalisation the gate learns from the task loss through ``w_e``; with
    ``normalize_gate`` and ``top_k = 1`` the weight is exactly 1 and the gate gets no gradient through the output.

    Each expert runs once per forward on the images routed to it (gathered with ``index_select``, scattered back
    with ``index_add``; a Python loop over experts, none over samples). An expert that receives no image still
    runs on an empty batch, so all parameters are in the graph (zero gradient) and DDP needs no
    ``find_unused_parameters``.

    Settings: the M-IDoL paper describes 5 experts (one per modality) with top-1 routing (our default); the
    reference code's default is ``num_experts = 2 * GPUs`` with top-4 (dense), e.g. ``num_experts=4, top_k=4``.

    Args:
        in_dim: feature width (Swin-B pooled: 1024); also the output width.
        hidden_dim: expert MLP width (reference: 2048).
        num_experts: E.
        top_k: experts per image, 1 <= top_k <= E.
        normalize_gate: renormalise the selected gate probabilities to sum to 1 (reference: False).
        gate_noise: scale of the training-time gate noise, in units of ``1 / E`` (reference: 1.0; 0 disables).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        hidden_dim: int = 2048,
        num_experts: int = 5,
        top_k: int = 1,
        normalize_gate: bool = False,
        gate_noise: float = 1.0,
    ) -> None:
        super().__init__()
        if in_dim < 1 or hidden_dim < 1:
            raise ValueError(f"in_dim and hidden_dim must be positive, got {in_dim} and {hidden_dim}.")
        if num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {num_experts}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        if gate_noise < 0:
            raise ValueError(f"gate_noise must be non-negative, got {gate_noise}.")
        self.in_dim = in_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_gate = normalize_gate
        self.gate_noise = float(gate_noise)
        self.gate = nn.Linear(in_dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, in_dim))
            for _ in range(num_experts)
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate of ``x`` (B, in_dim); in training with ``gate_noise`` > 0 the selection is drawn with noise.

        Returns:
            router_logits (B, E) float32 without noise, expert indices (B, top_k) long (largest probability
            first), combination weights (B, top_k) float32.
        """
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        noisy = logits
        if self.training and self.gate_noise > 0:
            noisy = logits + self.gate_noise * torch.randn_like(logits) / self.num_experts
        probs = noisy.softmax(-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.normalize_gate:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return logits, index, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, in_dim) pooled features.

        Returns:
            output (B, in_dim) in the experts' dtype, router_logits (B, E) float32.
        """
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected features of shape (B, {self.in_dim}), got {tuple(x.shape)}.")
        logits, index, weights = self.route(x)
        out = x.new_zeros(x.shape, dtype=torch.float32)
        dtype = x.dtype
        for e, expert in enumerate(self.experts):
            rows, slot = (index == e).nonzero(as_tuple=True)  # images routed to e, and at which rank of their top-k
            y = expert(x.index_select(0, rows))
            dtype = y.dtype
            out = out.index_add(0, rows, y.float() * weights[rows, slot].unsqueeze(1))
        return out.to(dtype), logits
