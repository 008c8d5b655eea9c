"""M-IDoL: multi-modality self-distillation with a mixture-of-experts head (``notes/METHODS.md`` section 4).

M-IDoL (information decomposition for multimodal representation learning) pre-trains one backbone (Swin-B,
global-average-pooled 1024-d) on five imaging modalities with DINO-style self-distillation whose projection head is
a per-image mixture of experts; a routing loss asks the student's routing of every view to match the teacher's
equipartitioned (Sinkhorn) routing of the other global view. The backbone is any module ``forward(x) -> (B, D)``;
the loss is :class:`medfm.losses.MIDoLLoss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medfm.networks.blocks.dino_head import DINOHead
from medfm.networks.blocks.ema import EMATeacherPair
from medfm.networks.blocks.moe import MoEProjector

__all__ = ["MIDoLHead", "MIDoLSelfDistill", "midol_backbone_state"]


def _skip_projection_draws(in_dim: int) -> None:
    """Advance the global RNG by the draws of an initialised ``Linear(in_dim, in_dim)`` (its default init, then
    the truncated normal), a module that is not kept. With it a seed gives the head without bottleneck the same
    prototypes (and every later draw) as the head with a square bottleneck, ``bottleneck_dim=in_dim``, so the two
    options start from the same point and seeded runs of either are reproducible against each other."""
    nn.init.trunc_normal_(nn.Linear(in_dim, in_dim).weight, std=0.02)


class MIDoLHead(nn.Module):
    """M-IDoL projection head: :class:`~medfm.networks.blocks.MoEProjector` -> L2-normalise -> weight-normalised
    linear layer without bias (DINO's last layer, arXiv:2104.14294).

    The normalise + last layer is :class:`~medfm.networks.blocks.DINOHead` without MLP (``nlayers=0``; reference
    code: the 1024-d MoE output goes straight to the 65536 prototypes) or, with ``bottleneck_dim``, with a single
    Linear(in_dim -> bottleneck_dim) (``nlayers=1``, our option). Without bottleneck the head draws, between the
    MoE and the prototypes, the random numbers of a ``Linear(in_dim, in_dim)`` that it does not keep
    (:func:`_skip_projection_draws`): a seed gives the prototypes of ``bottleneck_dim=in_dim`` and the same draws
    afterwards, so seeded runs keep their initialisation whichever option they take.

    Args:
        in_dim: feature width D of the backbone.
        num_experts: experts E (paper: 5, one per modality; reference code: 2 * GPUs).
        top_k: experts per image (paper: 1; reference code: 4).
        out_dim: prototypes K (reference: 65536).
        hidden_dim: expert MLP width (reference: 2048).
        bottleneck_dim: None (reference) or a width to project to before normalising.
        norm_last_layer: fix the last layer's row norms at 1 (reference: True).
        normalize_gate: renormalise the selected gate probabilities (reference: False; see :class:`MoEProjector`).
        gate_noise: training-time gate noise in units of ``1 / E`` (reference: 1.0).
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int = 5,
        top_k: int = 1,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int | None = None,
        norm_last_layer: bool = True,
        normalize_gate: bool = False,
        gate_noise: float = 1.0,
    ) -> None:
        super().__init__()
        if bottleneck_dim is not None and bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim must be positive or None, got {bottleneck_dim}.")
        self.moe = MoEProjector(
            in_dim=in_dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k,
            normalize_gate=normalize_gate, gate_noise=gate_noise,
        )
        if bottleneck_dim is None:  # the draws of the projection this head does not have (see the docstring)
            _skip_projection_draws(in_dim)
        self.last_layer = DINOHead(
            in_dim, out_dim, bottleneck_dim=bottleneck_dim, nlayers=0 if bottleneck_dim is None else 1,
            norm_last_layer=norm_last_layer,
        )
        self.num_experts = num_experts

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype weights (``last_v`` and, without ``norm_last_layer``, ``last_g``): DINO freezes them
        during the first epoch."""
        return self.last_layer.last_layer_parameters()

    def cancel_last_layer_grad(self) -> None:
        """Drop the gradients of :meth:`last_layer_parameters` (call after backward, before the optimiser step):
        the optimiser then skips them, weight decay included."""
        for p in self.last_layer_parameters():
            p.grad = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, in_dim) -> (logits (B, out_dim), router_logits (B, E) float32)."""
        y, router_logits = self.moe(x)
        return self.last_layer(y), router_logits


class _MIDoLBranch(nn.Module):
    """Backbone + MoE head over a list of crops."""

    def __init__(self, backbone: nn.Module, head: MIDoLHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        if len(crops) == 0:
            raise ValueError("no crops to encode.")
        n = crops[0].shape[0]
        if any(c.shape[0] != n for c in crops):
            raise ValueError(f"all crops must have the same batch size, got {[c.shape[0] for c in crops]}.")
        # DINO's multi-crop wrapper: the backbone runs once per run of consecutive same-size crops, the head once.
        feats, start = [], 0
        for end in range(1, len(crops) + 1):
            if end == len(crops) or crops[end].shape[1:] != crops[start].shape[1:]:
                f = self.backbone(torch.cat(list(crops[start:end])))
                if f.ndim != 2 or f.shape[0] != n * (end - start):
                    raise ValueError(f"the backbone must return pooled features (B, D), got {tuple(f.shape)}.")
                feats.append(f)
                start = end
        logits, router_logits = self.head(torch.cat(feats))
        return {"logits": list(logits.split(n)), "router_logits": list(router_logits.split(n))}


class MIDoLSelfDistill(EMATeacherPair):
    """M-IDoL pre-training pair: student = backbone + :class:`MIDoLHead`, teacher = its EMA copy.

    The teacher starts as a deep copy of the student, never requires grad and moves only by
    :meth:`update_teacher` (parameters and floating-point buffers, e.g.
    BatchNorm statistics, by the same EMA). The state dict holds ``student.*`` and ``teacher.*``; downstream
    models take the teacher's backbone (the reference keeps only the teacher Swin), see
    :func:`midol_backbone_state`. Give the optimiser ``model.student.parameters()``. With ``teacher_train_mode``
    (default, as the reference code, which never puts its teacher in eval mode) the teacher follows the pair's
    mode, so in training its stochastic depth and gate noise are active; without it the teacher always stays in
    eval mode (deterministic targets, DINO's choice for ViTs).

    Args:
        backbone: module ``forward(x) -> (B, embed_dim)`` pooled features (reference: Swin-B, 1024).
        embed_dim: D.
        teacher_train_mode: the teacher follows the pair's train/eval mode (reference) instead of staying in eval.
        head_kwargs: keyword arguments of the :class:`MIDoLHead` (``num_experts``, ``top_k``, ``out_dim``,
            ``hidden_dim``, ``bottleneck_dim``, ``norm_last_layer``, ``normalize_gate``, ``gate_noise``).
    """

    ema_buffers = True  # float buffers follow the EMA, counters are copied

    def __init__(
        self, backbone: nn.Module, embed_dim: int, *, teacher_train_mode: bool = True, **head_kwargs: Any
    ) -> None:
        super().__init__()
        head = MIDoLHead(embed_dim, **head_kwargs)
        self.num_experts = head.num_experts
        self.teacher_train_mode = teacher_train_mode
        self.student = _MIDoLBranch(backbone, head)
        self.init_teacher()
        self.train(self.training)

    def train(self, mode: bool = True) -> MIDoLSelfDistill:
        """Set the mode; the teacher follows it with ``teacher_train_mode``, else stays in eval mode."""
        super().train(mode)
        if self.teacher_train_mode:
            self.teacher.train(mode)
        return self

    @torch.no_grad()
    def forward_teacher(self, global_crops: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Teacher on the global crops, without gradient.

        Args:
            global_crops: G tensors (B, C, H, W), all the same size.

        Returns:
            ``logits``: G tensors (B, out_dim); ``router_logits``: G tensors (B, E) float32.
        """
        return self.teacher(global_crops)

    def forward_student(self, crops: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Student on all crops (global first, in the teacher's order, then local).

        Args:
            crops: V tensors (B, C, H_v, W_v); consecutive crops of one size share a backbone pass.

        Returns:
            ``logits``: V tensors (B, out_dim); ``router_logits``: V tensors (B, E) float32.
        """
        return self.student(crops)

    def forward(self, crops: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """:meth:`forward_student` (the pass that trains goes through ``forward``, so DDP syncs its gradients)."""
        return self.forward_student(crops)


def midol_backbone_state(state_dict: Mapping[str, Any], branch: str = "teacher") -> dict[str, Any]:
    """Key filter: the backbone weights of a :class:`MIDoLSelfDistill` state dict (``<branch>.backbone.`` removed).
    Downstream uses the teacher (as the reference); ``branch="student"`` takes the student's."""
    if branch not in ("teacher", "student"):
        raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}.")
    prefix = f"{branch}.backbone."
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' weights in the state dict (first keys: {list(state_dict)[:5]}).")
    return out
