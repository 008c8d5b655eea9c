"""M-IDoL pre-training: multi-crop batch preparation and the self-distillation step for ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from .teacher_student import TeacherStudentIteration

__all__ = ["MIDoLPretrainIteration", "MIDoLPretrainPrepareBatch"]


class MIDoLPretrainPrepareBatch(PrepareBatch):
    """Turn a collated multi-crop batch into ``(crops, None, (), {})``, ``crops`` a list of (B, C, H_v, W_v).

    The crops come from ``crop_keys`` (one batch entry per crop, global crops first) or, with ``list_key``, from
    one entry holding the list of crops (what a transform returning a list per item collates to).

    Args:
        crop_keys: keys of the crops, global first (ignored when ``list_key`` is given).
        list_key: key of a list of crops.
        check_finite: raise on NaN/Inf in a crop.
    """

    def __init__(
        self,
        crop_keys: Sequence[str] = ("global_0", "global_1", "local_0", "local_1"),
        list_key: str | None = None,
        check_finite: bool = True,
    ) -> None:
        if list_key is None and len(crop_keys) < 2:
            raise ValueError(f"need at least 2 crop keys, got {list(crop_keys)}.")
        self.crop_keys = tuple(crop_keys)
        self.list_key = list_key
        self.check_finite = check_finite

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor], None, tuple, dict]:
        if self.list_key is not None:
            if self.list_key not in batchdata:
                raise KeyError(f"the batch has no {self.list_key!r} entry (keys: {sorted(batchdata)}).")
            raw, names = (
                list(batchdata[self.list_key]),
                [f"{self.list_key}[{i}]" for i in range(len(batchdata[self.list_key]))],
            )
        else:
            missing = [k for k in self.crop_keys if k not in batchdata]
            if missing:
                raise KeyError(f"the batch has no crop(s) {missing} (keys: {sorted(batchdata)}).")
            raw, names = [batchdata[k] for k in self.crop_keys], list(self.crop_keys)
        crops = []
        for name, x in zip(names, raw):
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            if x.ndim < 3:
                raise ValueError(f"crop {name!r} must be (B, C, *spatial), got shape {tuple(x.shape)}.")
            if self.check_finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"crop {name!r} holds NaN or Inf values.")
            crops.append(x.to(device=device, non_blocking=non_blocking).float())
        if len({c.shape[0] for c in crops}) != 1:
            raise ValueError(f"crops {names} have different batch sizes {[c.shape[0] for c in crops]}.")
        return crops, None, (), {}


class MIDoLPretrainIteration(TeacherStudentIteration):
    """One M-IDoL self-distillation step (``notes/METHODS.md`` section 4), for
    ``SupervisedTrainer(iteration_update=MIDoLPretrainIteration(...))``.

    The engine holds ``network`` = :class:`medfm.networks.nets.midol.MIDoLSelfDistill` (DDP-wrapped or not),
    ``optimizer`` over ``network.student`` only (AdamW; groups with weight decay > 0 at the first step follow the
    weight-decay schedule, the others stay at 0), ``loss_function`` = :class:`medfm.losses.MIDoLLoss` and
    ``prepare_batch`` = :class:`MIDoLPretrainPrepareBatch`; its ``inferer`` is not used. Per iteration:

    1. teacher on the ``num_global`` global crops, no gradient;
    2. student on all crops (through ``engine.network``, so DDP syncs its gradients);
    3. ``L = L_cst + L_route``, backward;
    4. while ``step < freeze_last_layer_steps`` the last layer's gradients are dropped (before clipping, so they do
       not count in the norm; DINO clips first), then the student's gradient norm is clipped;
    5. weight decay set from the cosine schedule, optimizer step, EMA teacher update (cosine momentum to 1).

    Schedules use ``step = engine.state.iteration - 1`` (a resumed run continues them); ``total_steps`` None takes
    ``max_epochs * epoch_length``. Schedules, clipping, the optimizer step and the EMA update are
    :class:`~medfm.engines.TeacherStudentIteration`'s, shared with Pan-FM. The output holds ``image`` (the crops),
    ``pred`` (teacher router logits of the global crops, (G*B, E)), ``loss`` and ``terms`` for
    :func:`medfm.engines.loss_terms`: ``loss``, ``cst``, ``route``, ``teacher_temp``, ``momentum``,
    ``weight_decay``, ``lr`` and ``expert_<e>`` (share of the global crops whose teacher top-1 expert is ``e``, over
    this rank's batch), ``target_<e>`` and ``target_mass_<e>`` (what the routing loss's Sinkhorn targets ask of
    expert ``e``, :meth:`target_shares`).

    Args:
        num_global: global crops G (the first G crops).
        weight_decay: (start, end) of the cosine weight-decay schedule (reference: 0.04 -> 0.4).
        momentum_start: EMA momentum at step 0, cosine to 1 (reference: 0.996).
        teacher_temp: (start, end) teacher temperature of a linear warm-up (reference: 0.04, 0.04, no warm-up).
        warmup_teacher_temp_steps: steps of that warm-up.
        freeze_last_layer_steps: steps with a frozen last layer; None takes one epoch (reference: 1 epoch).
        total_steps: steps of the cosine schedules; None takes the run's ``max_epochs * epoch_length``.
        grad_clip_norm: clip the student's gradient norm (reference: 3.0); None disables.
        bf16: autocast the forward passes to bfloat16.
    """

    def __init__(
        self,
        num_global: int = 2,
        weight_decay: tuple[float, float] = (0.04, 0.4),
        momentum_start: float = 0.996,
        teacher_temp: tuple[float, float] = (0.04, 0.04),
        warmup_teacher_temp_steps: int = 0,
        freeze_last_layer_steps: int | None = None,
        total_steps: int | None = None,
        grad_clip_norm: float | None = 3.0,
        bf16: bool = False,
    ) -> None:
        if weight_decay is None:
            raise ValueError("weight_decay must be two non-negative values (start, end), got None.")
        if warmup_teacher_temp_steps is None:
            raise ValueError("warmup_teacher_temp_steps must be non-negative, got None.")
        super().__init__(
            momentum_start, teacher_temp, warmup_teacher_temp_steps, total_steps, weight_decay, grad_clip_norm, bf16
        )
        if num_global < 1:
            raise ValueError(f"num_global must be positive, got {num_global}.")
        if freeze_last_layer_steps is not None and freeze_last_layer_steps < 0:
            raise ValueError(f"freeze_last_layer_steps must be non-negative or None, got {freeze_last_layer_steps}.")
        self.num_global = num_global
        self.freeze_last_layer_steps = freeze_last_layer_steps

    def last_layer_frozen(self, engine: Any) -> bool:
        steps = self.freeze_last_layer_steps
        steps = int(engine.state.epoch_length) if steps is None else steps
        return int(engine.state.iteration) - 1 < steps

    @staticmethod
    @torch.no_grad()
    def target_shares(
        loss_function: Any, router_logits: Sequence[torch.Tensor], teacher_temp: float
    ) -> dict[str, float]:
        """What the routing loss asks of the student, per expert ``e`` over this rank's global crops of the step:
        ``target_<e>``, the share of crops whose Sinkhorn target (the loss's ``routing.targets``) has ``e`` as its
        largest entry, and ``target_mass_<e>``, the share of the targets' total mass on ``e``. Both are ``1 / E``
        when the targets equipartition the crops; ``target_mass`` can be balanced while ``target`` is not (an
        expert that is no crop's favourite receives a thin, even share of every row). Empty when the loss has no
        ``routing`` (not :class:`medfm.losses.MIDoLLoss`)."""
        routing = getattr(loss_function, "routing", None)
        if routing is None:
            return {}
        q = torch.cat(routing.targets(router_logits, teacher_temp))
        top = torch.bincount(q.argmax(1), minlength=q.shape[1]).float() / q.shape[0]
        mass = q.sum(0) / q.sum()
        out = {f"target_{e}": float(v) for e, v in enumerate(top.tolist())}
        out.update({f"target_mass_{e}": float(v) for e, v in enumerate(mass.tolist())})
        return out

    def unpack(self, engine: Any, batch: Any, model: nn.Module) -> dict[str, Any]:
        crops = batch[0]
        if not isinstance(crops, (list, tuple)) or len(crops) <= self.num_global:
            raise ValueError(
                f"prepare_batch must give a list of more than num_global={self.num_global} crops "
                f"(MIDoLPretrainPrepareBatch), got {type(crops).__name__} of length {len(crops)}."
            )
        return {"crops": crops}

    def forward_teacher(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return model.forward_teacher(inputs["crops"][: self.num_global])

    def forward_student(
        self, engine: Any, model: nn.Module, inputs: dict[str, Any], teacher: dict[str, Any]
    ) -> dict[str, Any]:
        return engine.network(inputs["crops"])

    def before_clip(self, engine: Any, model: nn.Module) -> None:
        if self.last_layer_frozen(engine):
            model.student.head.cancel_last_layer_grad()

    def extra_terms(
        self, engine: Any, inputs: dict[str, Any], teacher: dict[str, Any], sched: dict[str, float]
    ) -> dict[str, float]:
        router = torch.cat(list(teacher["router_logits"]))
        share = torch.bincount(router.argmax(1), minlength=router.shape[1]).float() / router.shape[0]
        logged = {f"expert_{e}": s for e, s in enumerate(share.tolist())}
        logged.update(self.target_shares(engine.loss_function, teacher["router_logits"], sched["teacher_temp"]))
        return logged

    def outputs(self, inputs: dict[str, Any], student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
        router = torch.cat(list(teacher["router_logits"]))
        return {Keys.IMAGE: inputs["crops"], Keys.LABEL: None, Keys.PRED: router}
