"""The skeleton of a self-distillation step (DINO, arXiv:2104.14294; iBOT, arXiv:2111.07832) that the Pan-FM and
M-IDoL pre-training steps extend: teacher -> student -> loss -> step -> EMA teacher update."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medfm.losses.self_distill import teacher_temp_schedule
from medfm.utils.dist import unwrap

from .iteration import logged_terms
from .schedules import cosine_schedule, set_weight_decay

__all__ = ["TeacherStudentIteration"]


class TeacherStudentIteration:
    """One self-distillation step for ``SupervisedTrainer(iteration_update=…)``, the part every teacher-student
    pre-training shares. The engine holds ``network``, a :class:`medfm.networks.blocks.ema.EMATeacherPair`
    (``student``, ``teacher``, ``update_teacher(momentum)``; DDP-wrapped or not), ``optimizer`` over
    ``network.student`` only, and a ``loss_function`` with ``forward_terms(student, teacher, teacher_temp) ->
    {"loss": total, <term>: …}``; its ``inferer`` is not used. Per iteration:

    1. schedules of this step (:meth:`schedules`): teacher temperature (linear warm-up), EMA momentum (cosine to
       1) and, unless switched off, weight decay (cosine);
    2. :meth:`unpack` the prepared batch; :meth:`forward_teacher` (bf16 autocast when ``bf16``), then
       :meth:`after_teacher` (outside autocast; e.g. masks drawn from the teacher's output);
    3. zero the gradients; :meth:`forward_student` (autocast), ``FORWARD_COMPLETED``;
    4. ``loss_function.forward_terms(student, teacher, teacher_temp)``, ``LOSS_COMPLETED``; backward,
       ``BACKWARD_COMPLETED``;
    5. :meth:`before_clip` (e.g. dropping the last layer's gradients), clipping of the student's gradient norm,
       the scheduled weight decay on the groups that decay, optimizer step;
    6. EMA teacher update with the scheduled momentum, ``MODEL_COMPLETED``.

    Schedules use ``step = engine.state.iteration - 1``, so a resumed run continues them. The output holds what
    :meth:`outputs` gives (``image``, ``label``, ``pred`` and any extras), ``loss`` and ``terms``: every loss term,
    the schedules, ``lr`` and :meth:`extra_terms`, for :func:`medfm.engines.loss_terms`.

    Args:
        momentum_start: EMA momentum at step 0 (cosine to 1).
        teacher_temp: (start, end) teacher temperature of the linear warm-up.
        warmup_teacher_temp_steps: steps of that warm-up (a subclass may take None to mean a share of the run,
            :meth:`teacher_temp_warmup`).
        total_steps: steps of the cosine schedules; None takes the run's ``max_epochs * epoch_length``.
        weight_decay: (start, end) of the cosine weight-decay schedule, applied to the optimizer groups whose
            weight decay is > 0 at the first step (the others stay at 0); None leaves the weight decay as it is.
        grad_clip_norm: clip the student's gradient norm; None disables.
        bf16: autocast the forward passes to bfloat16.
    """

    def __init__(
        self,
        momentum_start: float,
        teacher_temp: tuple[float, float],
        warmup_teacher_temp_steps: int | None,
        total_steps: int | None = None,
        weight_decay: tuple[float, float] | None = (0.04, 0.4),
        grad_clip_norm: float | None = 3.0,
        bf16: bool = False,
    ) -> None:
        if not 0.0 <= momentum_start <= 1.0:
            raise ValueError(f"momentum_start must be in [0, 1], got {momentum_start}.")
        if len(teacher_temp) != 2 or min(teacher_temp) <= 0:
            raise ValueError(f"teacher_temp must be two positive temperatures (start, end), got {teacher_temp}.")
        if warmup_teacher_temp_steps is not None and warmup_teacher_temp_steps < 0:
            raise ValueError(f"warmup_teacher_temp_steps must be non-negative, got {warmup_teacher_temp_steps}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive or None, got {total_steps}.")
        if weight_decay is not None and (len(weight_decay) != 2 or min(weight_decay) < 0):
            raise ValueError(f"weight_decay must be two non-negative values (start, end) or None, got {weight_decay}.")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}.")
        self.momentum_start = momentum_start
        self.teacher_temp = (float(teacher_temp[0]), float(teacher_temp[1]))
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.total_steps = total_steps
        self.weight_decay = None if weight_decay is None else (float(weight_decay[0]), float(weight_decay[1]))
        self.grad_clip_norm = grad_clip_norm
        self.bf16 = bf16

    # ---- schedules -------------------------------------------------------------------------------------------
    def teacher_temp_warmup(self, total: int) -> int:
        """Steps of the teacher-temperature warm-up in a run of ``total`` steps."""
        return int(self.warmup_teacher_temp_steps or 0)

    def schedules(self, engine: Any) -> dict[str, float]:
        """``teacher_temp``, ``momentum`` and (unless switched off) ``weight_decay`` of the engine's current
        iteration."""
        total = self.total_steps or max(1, int(engine.state.max_epochs) * int(engine.state.epoch_length))
        step = int(engine.state.iteration) - 1
        sched = {
            "teacher_temp": teacher_temp_schedule(step, self.teacher_temp_warmup(total), *self.teacher_temp),
            "momentum": cosine_schedule(step, total, self.momentum_start, 1.0),
        }
        if self.weight_decay is not None:
            sched["weight_decay"] = cosine_schedule(step, total, *self.weight_decay)
        return sched

    def autocast(self, device_type: str) -> AbstractContextManager:
        """bfloat16 autocast on ``device_type`` when ``bf16`` (CPU or CUDA; bf16 needs no gradient scaler)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

    # ---- the model's parts -----------------------------------------------------------------------------------
    def unpack(self, engine: Any, batch: Any, model: nn.Module) -> dict[str, Any]:
        """The named inputs of the step from the engine's ``prepare_batch`` output (checked)."""
        raise NotImplementedError

    def forward_teacher(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's outputs (no gradient) for ``inputs``."""
        raise NotImplementedError

    def after_teacher(self, inputs: dict[str, Any], teacher: dict[str, Any]) -> None:
        """Anything drawn from the teacher's outputs before the student runs, stored in ``inputs``."""

    def forward_student(
        self, engine: Any, model: nn.Module, inputs: dict[str, Any], teacher: dict[str, Any]
    ) -> dict[str, Any]:
        """The student's outputs, through ``engine.network`` so that DDP syncs its gradients; teacher-side terms
        that need the student's layout may be added to ``teacher``."""
        raise NotImplementedError

    def before_clip(self, engine: Any, model: nn.Module) -> None:
        """Gradient edits after backward and before clipping."""

    def extra_terms(
        self, engine: Any, inputs: dict[str, Any], teacher: dict[str, Any], sched: dict[str, float]
    ) -> dict[str, float]:
        """Model-specific floats logged beside the loss terms."""
        return {}

    def outputs(self, inputs: dict[str, Any], student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
        """``image``, ``label``, ``pred`` and any extras of the engine output."""
        raise NotImplementedError

    # ---- the skeleton ----------------------------------------------------------------------------------------
    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("no batch data for this iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        model = unwrap(engine.network)
        inputs = self.unpack(engine, batch, model)
        sched = self.schedules(engine)
        device_type = _device_type(inputs)
        engine.network.train()  # the teacher stays in eval mode unless the network says otherwise

        with self.autocast(device_type):
            teacher = self.forward_teacher(model, inputs)
        self.after_teacher(inputs, teacher)
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with self.autocast(device_type):
            student = self.forward_student(engine, model, inputs, teacher)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function.forward_terms(student, teacher, sched["teacher_temp"])
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.before_clip(engine, model)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.student.parameters(), self.grad_clip_norm)
        if "weight_decay" in sched:
            set_weight_decay(engine.optimizer, sched["weight_decay"])
        engine.optimizer.step()
        model.update_teacher(sched["momentum"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        logged = logged_terms(terms, engine.optimizer, sched)
        logged.update(self.extra_terms(engine, inputs, teacher, sched))
        out = self.outputs(inputs, student, teacher)
        return {Keys.IMAGE: out.pop(Keys.IMAGE), Keys.LABEL: out.pop(Keys.LABEL), Keys.PRED: out.pop(Keys.PRED),
                Keys.LOSS: terms["loss"].detach(), **out, "terms": logged}  # fmt: skip


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _device_type(inputs: dict[str, Any]) -> str:
    """The device type of the first tensor in ``inputs`` (the prepared batch sits on one device)."""
    first = next(_tensors(inputs), None)
    if first is None:
        raise ValueError(f"the prepared batch holds no tensor (inputs: {sorted(inputs)}).")
    return first.device.type
