"""M-IDoL objectives: Sinkhorn-Knopp routing targets, the routing-consistency loss, and their sum with DINO's loss.

M-IDoL (``notes/METHODS.md`` section 4): ``L = cst_weight * L_cst + route_weight * L_route``. ``L_cst`` is DINO's
multi-crop cross-entropy on the MoE-head outputs ("minimise intra-modality uncertainty"); ``L_route`` asks the
student's routing of every crop to match the teacher's routing of the other global crop after Sinkhorn-Knopp
equipartition over the experts across the global batch ("maximise inter-modality entropy"). Tutel's balance
loss is not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medfm.losses.self_distill import DINOLoss
from medfm.utils.dist import is_distributed

__all__ = ["SINKHORN_FLOOR", "MIDoLLoss", "RoutingConsistencyLoss", "sinkhorn_knopp"]


SINKHORN_FLOOR = 1e-12
"""Floor of Sinkhorn-Knopp's assignments (reference code: after ``exp`` and after every iteration)."""


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor, temperature: float = 1.0, epsilon: float = 0.05, iterations: int = 3
) -> torch.Tensor:
    """Equipartitioned soft assignments of images to experts (SwAV, arXiv:2006.09882; M-IDoL's variant).

    With ``x = scores / temperature`` and ``Q[b, e] = max(exp((x[b, e] - max_e x[b, e]) / epsilon), floor)``
    (the per-image max shift only guards against overflow; ``floor`` = :data:`SINKHORN_FLOOR`), ``Q`` is scaled to
    total 1 over the global batch and then, ``iterations`` times: each expert's column is scaled to sum to ``1 / E``
    over the GLOBAL batch (column sums all-reduced over the ranks when a process group is initialised), each
    image's row to sum to ``1 / B_global``, and ``Q`` is floored again. Finally ``Q * B_global`` is floored and each
    row renormalised to sum to 1, so rows sum to 1 and columns to about ``B / E``. Every division adds ``floor`` to
    its denominator. This is the reference code's computation (its ``_sinkhorn_knopp``), except that the first
    scaling uses the global total where the reference divides by its rank's own total (which weights the ranks
    unequally in the all-reduced column sums). The floor is what lets a collapsed router be rebalanced: at
    ``scores / (0.04 * 0.05)`` an expert that is no image's favourite by a margin of 0.2 gets ``exp(-100)``, 0 in
    float32, for every image, and without a floor a column of zeros stays zero whatever it is scaled by.
    Computed in float32, without gradient. Under DDP each rank passes its own rows and gets its own rows of the
    assignment of the whole global batch.

    Args:
        scores: (B, E) routing logits of this rank's images.
        temperature: divides the scores first (M-IDoL: the teacher temperature of the step, 0.04).
        epsilon: entropic regularisation (0.05).
        iterations: Sinkhorn iterations (3).

    Returns:
        (B, E) float32 assignments.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, E), got {tuple(scores.shape)}.")
    if temperature <= 0 or epsilon <= 0:
        raise ValueError(f"temperature and epsilon must be positive, got {temperature} and {epsilon}.")
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}.")
    floor = SINKHORN_FLOOR
    x = scores.float() / temperature
    q = torch.exp((x - x.max(dim=1, keepdim=True).values) / epsilon).clamp_min(floor)
    total = q.sum()
    n = torch.tensor(float(q.shape[0]), device=q.device)
    if is_distributed():
        dist.all_reduce(total)
        dist.all_reduce(n)
    q = q / (total + floor)
    num_experts = q.shape[1]
    for _ in range(iterations):
        col = q.sum(0, keepdim=True)
        if is_distributed():
            dist.all_reduce(col)
        q = q / (col + floor) / num_experts
        q = q / (q.sum(1, keepdim=True) + floor) / n
        q = q.clamp_min(floor)
    q = (q * n).clamp_min(floor)
    return q / (q.sum(1, keepdim=True) + floor)


class RoutingConsistencyLoss(nn.Module):
    """M-IDoL's cross-view routing consistency.

    ``L_route = mean over pairs (v, g), v != g, of mean_b  -sum_e a_S[v, b, e] log a_T[g, b, e]`` where
    ``a_S = softmax(r_S / student_temp)`` (student router logits of crop ``v``, any of the V crops; gradient
    flows here) and ``a_T = sinkhorn_knopp(r_T, temperature=teacher_temp, epsilon, iterations)`` (teacher router
    logits of global crop ``g``, each global crop equipartitioned on its own, no gradient). Student crop ``v < G``
    is the same view as teacher crop ``v`` and skipped. ``log a_T`` is clamped at ``log(1e-12)``.

    Temperatures: the reference divides the teacher logits by the DINO teacher temperature of the step (0.04)
    before Sinkhorn's ``1 / epsilon`` (so ``exp(r_T / (0.04 * 0.05))``, nearly hard assignments); pass it to
    :meth:`forward`, or fix ``teacher_temp`` here to decouple the two.

    Args:
        student_temp: student routing temperature (0.1).
        teacher_temp: fixed teacher routing temperature; None takes the one given to :meth:`forward`.
        epsilon: Sinkhorn's entropic regularisation (0.05).
        iterations: Sinkhorn iterations (3).
    """

    def __init__(
        self, student_temp: float = 0.1, teacher_temp: float | None = None, epsilon: float = 0.05, iterations: int = 3
    ) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}.")
        if teacher_temp is not None and teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive or None, got {teacher_temp}.")
        if epsilon <= 0 or iterations < 1:
            raise ValueError(f"epsilon and iterations must be positive, got {epsilon} and {iterations}.")
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.epsilon = epsilon
        self.iterations = iterations

    def targets(self, teacher: Sequence[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Sinkhorn assignments (B, E) of each teacher crop's router logits."""
        temp = self.teacher_temp if self.teacher_temp is not None else teacher_temp
        return [sinkhorn_knopp(t, temp, self.epsilon, self.iterations) for t in teacher]

    def forward(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """
        Args:
            student: V router logits (B, E), the G global crops first.
            teacher: G router logits (B, E) of the global crops.
            teacher_temp: this step's teacher temperature (used unless fixed in the constructor).
        """
        _check_pairs(student, teacher)
        log_t = [a.clamp_min(1e-12).log() for a in self.targets(teacher, teacher_temp)]
        a_s = [F.softmax(s.float() / self.student_temp, dim=-1) for s in student]
        terms = [
            -(a_s[v] * log_t[g]).sum(-1).mean() for g in range(len(teacher)) for v in range(len(student)) if v != g
        ]
        return torch.stack(terms).mean()


def _check_pairs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> None:
    if len(teacher) < 1 or len(student) < len(teacher) or len(student) + len(teacher) < 3:
        raise ValueError(
            f"need G >= 1 teacher crops and V >= G student crops (global first) with at least one pair v != g, "
            f"got V={len(student)}, G={len(teacher)}."
        )


class MIDoLLoss(nn.Module):
    """M-IDoL's objective: ``cst_weight * L_cst + route_weight * L_route`` (reference: both 1).

    ``L_cst`` is DINO's multi-crop loss (arXiv:2104.14294) with :class:`~medfm.losses.DINOLoss` (its centre, its
    float32 cross-entropy): the mean over pairs (v, g), v != g, of G teacher global crops and V student crops
    (global first) of ``DINOLoss(student[v], teacher[g])``; the centre is updated once per step from all teacher
    outputs (all ranks). ``L_route`` is :class:`RoutingConsistencyLoss`. A weight of 0 removes its term.

    Args:
        out_dim: prototypes K.
        student_temp: DINO student temperature (0.1).
        center_momentum: DINO centre EMA (0.9).
        route_student_temp: student routing temperature (0.1).
        route_teacher_temp: fixed teacher routing temperature; None (reference) uses the step's teacher temperature.
        epsilon: Sinkhorn epsilon (0.05).
        iterations: Sinkhorn iterations (3).
        cst_weight: weight of L_cst (1).
        route_weight: weight of L_route (1).
    """

    def __init__(
        self,
        out_dim: int = 65536,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        route_student_temp: float = 0.1,
        route_teacher_temp: float | None = None,
        epsilon: float = 0.05,
        iterations: int = 3,
        cst_weight: float = 1.0,
        route_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if cst_weight < 0 or route_weight < 0 or cst_weight + route_weight == 0:
            raise ValueError(f"weights must be non-negative, not both 0, got {cst_weight} and {route_weight}.")
        self.dino = DINOLoss(out_dim, student_temp, center_momentum)
        self.routing = RoutingConsistencyLoss(route_student_temp, route_teacher_temp, epsilon, iterations)
        self.cst_weight = cst_weight
        self.route_weight = route_weight

    def cross_view(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        """L_cst without the centre update (V x (B, K) student, G x (B, K) teacher logits)."""
        _check_pairs(student, teacher)
        terms = [
            self.dino(student[v], teacher[g], teacher_temp, update_center=False)
            for g in range(len(teacher))
            for v in range(len(student))
            if v != g
        ]
        return torch.stack(terms).mean()

    def forward_terms(
        self,
        student: Mapping[str, Sequence[torch.Tensor]],
        teacher: Mapping[str, Sequence[torch.Tensor]],
        teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student: ``logits`` V x (B, K) and ``router_logits`` V x (B, E), global crops first
                (:meth:`medfm.networks.nets.midol.MIDoLSelfDistill.forward_student`).
            teacher: the same keys for the G global crops (``forward_teacher``).
            teacher_temp: this step's teacher temperature.

        Returns:
            ``loss``, ``cst`` and ``route`` (a term with weight 0 is not computed and reported as 0).
        """
        zero = student["logits"][0].new_zeros((), dtype=torch.float32)
        cst = zero
        if self.cst_weight > 0:
            cst = self.cross_view(student["logits"], teacher["logits"], teacher_temp)
            self.dino.update_center(torch.cat(list(teacher["logits"])))
        route = (
            self.routing(student["router_logits"], teacher["router_logits"], teacher_temp)
            if self.route_weight > 0
            else zero
        )
        return {"loss": self.cst_weight * cst + self.route_weight * route, "cst": cst, "route": route}

    def forward(
        self,
        student: Mapping[str, Sequence[torch.Tensor]],
        teacher: Mapping[str, Sequence[torch.Tensor]],
        teacher_temp: float,
    ) -> torch.Tensor:
        return self.forward_terms(student, teacher, teacher_temp)["loss"]
