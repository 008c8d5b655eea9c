"""Self-distillation objectives: DINO's CLS loss, iBOT's masked-patch loss, their schedules, Pan-FM's sum.

DINO (Caron et al., arXiv:2104.14294): the teacher's output, centred and sharpened with a low temperature, is
the target of the student's softmax. iBOT (Zhou et al., arXiv:2111.07832) applies the same to the tokens the
student saw masked. Each loss owns its centre (a buffer, saved with the checkpoint) and updates it from the
teacher outputs of the batch after computing the loss, averaged over DDP ranks when a process group exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medfm.utils.dist import is_distributed

__all__ = ["DINOLoss", "IBOTPatchLoss", "PanFMLoss", "momentum_schedule", "teacher_temp_schedule"]


def teacher_temp_schedule(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Teacher temperature: linear from ``start`` (step 0) to ``end`` (step ``warmup_steps``), then ``end``."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}.")
    if step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * max(step, 0) / warmup_steps)


def momentum_schedule(step: int, total_steps: int, start: float = 0.992, end: float = 1.0) -> float:
    """EMA momentum, cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and after)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    t = min(max(step, 0), total_steps) / total_steps
    return float(end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * t)))


def _global_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sum over DDP ranks (identity without an initialised process group)."""
    if is_distributed():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return list(flat.split([t.numel() for t in tensors]))
    return [t.reshape(-1) for t in tensors]


class _CenteredDistill(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax and the student's, with a centre EMA."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}.")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}.")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}.")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _loss(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Per-row cross-entropy (N,), float32."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive, got {teacher_temp}.")
        if student.shape != teacher.shape or student.ndim != 2 or student.shape[1] != self.center.shape[1]:
            raise ValueError(
                f"expected student and teacher outputs of shape (N, {self.center.shape[1]}), got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}."
            )
        with torch.no_grad():
            target = F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)
        return -(target * F.log_softmax(student.float() / self.student_temp, dim=-1)).sum(-1)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """``center = m * center + (1 - m) * mean over the batch (all ranks) of the teacher outputs``; a batch
        with no rows (on every rank) leaves it unchanged."""
        t = teacher.detach().float()
        total, count = _global_sum(t.sum(0), t.new_tensor([t.shape[0]]))
        if float(count) > 0:
            self.center.mul_(self.center_momentum).add_(
                total.view_as(self.center) / count, alpha=1 - self.center_momentum
            )


class DINOLoss(_CenteredDistill):
    """DINO's CLS loss (arXiv:2104.14294) for one student view and one teacher view.

    ``loss = mean_b  -sum_k softmax((t_b - c) / teacher_temp)_k  log_softmax(s_b / student_temp)_k``, then the
    centre ``c`` moves towards the batch mean of the teacher outputs. Computed in float32.

    Args:
        out_dim: head outputs K.
        student_temp: student temperature (DINO: 0.1).
        center_momentum: centre EMA momentum (DINO: 0.9).
    """

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        """
        Args:
            student: (B, K) student logits.
            teacher: (B, K) teacher logits (no gradient flows into them).
            teacher_temp: this step's teacher temperature (:func:`teacher_temp_schedule`).
            update_center: update the centre after computing the loss.
        """
        loss = self._loss(student, teacher, teacher_temp).mean()
        if update_center:
            self.update_center(teacher)
        return loss


class IBOTPatchLoss(_CenteredDistill):
    """iBOT's masked-image-modelling loss (arXiv:2111.07832): the DINO loss on the tokens the student saw masked,
    averaged over all masked tokens of the batch; with no masked token it is 0 and still part of the graph.

    The centre is updated, as in iBOT's code, from *all* the teacher's patch outputs (``center_tokens``, masked or
    not), averaged per sample first and then over the samples (``center_sample``), so every image weighs the same
    whatever its token count; without ``center_tokens`` it falls back to the teacher outputs of the masked tokens.

    Args:
        patch_out_dim: patch head outputs K.
        student_temp: student temperature (iBOT: 0.1).
        center_momentum: centre EMA momentum (iBOT: 0.9).
    """

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
        center_tokens: torch.Tensor | None = None,
        center_sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            student: (M, K) student patch logits of the M masked tokens.
            teacher: (M, K) teacher patch logits of the same tokens, same order.
            teacher_temp: this step's teacher temperature.
            update_center: update the centre after computing the loss.
            center_tokens: (N, K) teacher patch logits of every token of the batch (iBOT's centre source); None
                takes ``teacher``.
            center_sample: (N,) long, the sample of each row of ``center_tokens``; None averages over rows.
        """
        per_token = self._loss(student, teacher, teacher_temp)
        loss = per_token.mean() if per_token.numel() > 0 else student.float().sum() * 0.0
        if update_center:
            source = teacher if center_tokens is None else center_tokens
            self.update_center(source if center_sample is None else self.per_sample_mean(source, center_sample))
        return loss

    @staticmethod
    @torch.no_grad()
    def per_sample_mean(tokens: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """(S, K) mean of ``tokens`` (N, K) over the rows of each sample that has rows (``sample``: (N,) long)."""
        if sample.shape != tokens.shape[:1]:
            raise ValueError(f"center_sample must be ({tokens.shape[0]},), got {tuple(sample.shape)}.")
        if tokens.shape[0] == 0:
            return tokens.detach().float()
        t = tokens.detach().float()
        counts = torch.bincount(sample)
        sums = t.new_zeros(counts.shape[0], t.shape[1]).index_add_(0, sample, t)
        keep = counts > 0
        return sums[keep] / counts[keep, None]


class PanFMLoss(nn.Module):
    """Pan-FM's self-distillation objective (our proposal, ``notes/METHODS.md`` section 3):
    ``L = L_cls + patch_weight * L_patch`` with :class:`DINOLoss` between the teacher's CLS (all present organs)
    and the student's (masked view), and :class:`IBOTPatchLoss` on the tokens of the masked organs. A
    ``patch_weight`` of 0 removes the patch term (no centre, no computation).

    Args:
        out_dim: CLS head outputs.
        patch_out_dim: patch head outputs.
        patch_weight: weight of the patch term.
        student_temp: student temperature of both terms.
        center_momentum: centre momentum of both terms.
    """

    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        patch_weight: float = 1.0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if patch_weight < 0:
            raise ValueError(f"patch_weight must be non-negative, got {patch_weight}.")
        self.patch_weight = float(patch_weight)
        self.cls_loss = DINOLoss(out_dim, student_temp, center_momentum)
        self.patch_loss = IBOTPatchLoss(patch_out_dim, student_temp, center_momentum) if patch_weight > 0 else None

    def forward_terms(
        self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student: ``cls_logits`` (B, out_dim) and ``patch_logits`` (M, patch_out_dim) of the masked tokens.
            teacher: the same keys, same shapes and token order; optionally ``patch_center_logits`` (N,
                patch_out_dim), the teacher's patch logits of every token, and ``patch_center_sample`` (N,), their
                samples, from which the patch centre is updated (iBOT; see :class:`IBOTPatchLoss`).
            teacher_temp: this step's teacher temperature.

        Returns:
            ``loss``, ``cls`` and ``patch`` (0 when the term is off).
        """
        cls = self.cls_loss(student["cls_logits"], teacher["cls_logits"], teacher_temp)
        if self.patch_loss is None:
            patch = cls.new_zeros(())
            loss = cls
        else:
            patch = self.patch_loss(
                student["patch_logits"], teacher["patch_logits"], teacher_temp,
                center_tokens=teacher.get("patch_center_logits"), center_sample=teacher.get("patch_center_sample"),
            )  # fmt: skip
            loss = cls + self.patch_weight * patch
        return {"loss": loss, "cls": cls, "patch": patch}

    def forward(
        self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], teacher_temp: float
    ) -> torch.Tensor:
        return self.forward_terms(student, teacher, teacher_temp)["loss"]
