"""Student/teacher pair whose teacher is an exponential moving average (EMA) of the student (DINO, iBOT)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMATeacherPair"]


class EMATeacherPair(nn.Module):
    """Base of self-distillation models: ``student`` trains, ``teacher`` is a copy that never requires grad, stays
    in eval mode (no stochastic depth) and moves only by :meth:`update_teacher`.

    A subclass assigns ``self.student`` and then calls :meth:`init_teacher`. With ``ema_buffers`` True,
    floating-point buffers follow the EMA too and integer buffers (counters) are copied; otherwise buffers are
    left as they were copied.
    """

    ema_buffers: bool = False

    def init_teacher(self) -> None:
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> EMATeacherPair:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = momentum * teacher + (1 - momentum) * student``."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        t = list(self.teacher.parameters())
        s = [p.detach() for p in self.student.parameters()]
        if self.ema_buffers:
            for tb, sb in zip(self.teacher.buffers(), self.student.buffers()):
                if tb.is_floating_point():
                    t.append(tb)
                    s.append(sb)
                else:
                    tb.copy_(sb)  # counters (BatchNorm's num_batches_tracked)
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)
