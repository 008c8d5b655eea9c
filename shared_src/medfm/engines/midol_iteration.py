"""M-IDoL pre-training: multi-crop batch preparation and the self-distillation step for ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils.enums import CommonKeys as Keys

from medfm.losses.self_distill import teacher_temp_schedule

from .schedules import cosine_schedule, set_weight_decay

__all__ = ["MIDoLIteration", "MIDoLPrepareBatch"]


class MIDoLPrepareBatch(PrepareBatch):
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


class MIDoLIteration:
    """One M-IDoL self-distillation step (``notes/METHODS.md`` section 4), for
    ``SupervisedTrainer(iteration_update=MIDoLIteration(...))``.

    The engine holds ``network`` = :class:`medfm.networks.nets.midol.MIDoLSelfDistill` (DDP-wrapped or not),
    ``optimizer`` over ``network.student`` only (AdamW; groups with weight decay > 0 at the first step follow the
    weight-decay schedule, the others stay at 0), ``loss_function`` = :class:`medfm.losses.MIDoLLoss` and
    ``prepare_batch`` = :class:`MIDoLPrepareBatch`; its ``inferer`` is not used. Per iteration:

    1. teacher on the ``num_global`` global crops, no gradient;
    2. student on all crops (through ``engine.network``, so DDP syncs its gradients);
    3. ``L = L_cst + L_route``, backward;
    4. while ``step < freeze_last_layer_steps`` the last layer's gradients are dropped (before clipping, so they do
       not count in the norm; DINO clips first), then the student's gradient norm is clipped;
    5. weight decay set from the cosine schedule, optimizer step, EMA teacher update (cosine momentum to 1).

    Schedules use ``step = engine.state.iteration - 1`` (a resumed run continues them); ``total_steps`` None takes
    ``max_epochs * epoch_length``. The output holds ``image`` (the crops), ``pred`` (teacher router logits of the
    global crops, (G*B, E)), ``loss`` and ``terms`` for :func:`medfm.engines.loss_terms`: ``loss``, ``cst``,
    ``route``, ``teacher_temp``, ``momentum``, ``weight_decay``, ``lr`` and ``expert_<e>`` (share of the global
    crops whose teacher top-1 expert is ``e``, over this rank's batch), ``target_<e>`` and ``target_mass_<e>``
    (what the routing loss's Sinkhorn targets ask of expert ``e``, :meth:`target_shares`).

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
        if num_global < 1:
            raise ValueError(f"num_global must be positive, got {num_global}.")
        if len(weight_decay) != 2 or min(weight_decay) < 0:
            raise ValueError(f"weight_decay must be two non-negative values (start, end), got {weight_decay}.")
        if not 0.0 <= momentum_start <= 1.0:
            raise ValueError(f"momentum_start must be in [0, 1], got {momentum_start}.")
        if len(teacher_temp) != 2 or min(teacher_temp) <= 0:
            raise ValueError(f"teacher_temp must be two positive temperatures (start, end), got {teacher_temp}.")
        if warmup_teacher_temp_steps < 0:
            raise ValueError(f"warmup_teacher_temp_steps must be non-negative, got {warmup_teacher_temp_steps}.")
        if freeze_last_layer_steps is not None and freeze_last_layer_steps < 0:
            raise ValueError(f"freeze_last_layer_steps must be non-negative or None, got {freeze_last_layer_steps}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive or None, got {total_steps}.")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}.")
        self.num_global = num_global
        self.weight_decay = (float(weight_decay[0]), float(weight_decay[1]))
        self.momentum_start = momentum_start
        self.teacher_temp = (float(teacher_temp[0]), float(teacher_temp[1]))
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.total_steps = total_steps
        self.grad_clip_norm = grad_clip_norm
        self.bf16 = bf16

    def schedules(self, engine: Any) -> dict[str, float]:
        """``teacher_temp``, ``momentum`` and ``weight_decay`` of the engine's current iteration."""
        total = self.total_steps or max(1, int(engine.state.max_epochs) * int(engine.state.epoch_length))
        step = int(engine.state.iteration) - 1
        return {
            "teacher_temp": teacher_temp_schedule(step, self.warmup_teacher_temp_steps, *self.teacher_temp),
            "momentum": cosine_schedule(step, total, self.momentum_start, 1.0),
            "weight_decay": cosine_schedule(step, total, *self.weight_decay),
        }

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

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("no batch data for this iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        crops = batch[0]
        if not isinstance(crops, (list, tuple)) or len(crops) <= self.num_global:
            raise ValueError(
                f"prepare_batch must give a list of more than num_global={self.num_global} crops "
                f"(MIDoLPrepareBatch), got {type(crops).__name__} of length {len(crops)}."
            )
        model = getattr(engine.network, "module", engine.network)  # unwrap DistributedDataParallel
        sched = self.schedules(engine)
        device_type = crops[0].device.type
        engine.network.train()  # the teacher follows unless MIDoLSelfDistill(teacher_train_mode=False)

        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            teacher = model.forward_teacher(crops[: self.num_global])
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            student = engine.network(crops)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function.forward_terms(student, teacher, sched["teacher_temp"])
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.last_layer_frozen(engine):
            model.student.head.cancel_last_layer_grad()
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.student.parameters(), self.grad_clip_norm)
        set_weight_decay(engine.optimizer, sched["weight_decay"])
        engine.optimizer.step()
        model.update_teacher(sched["momentum"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        router = torch.cat(list(teacher["router_logits"]))
        share = torch.bincount(router.argmax(1), minlength=router.shape[1]).float() / router.shape[0]
        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged.update(sched, lr=float(engine.optimizer.param_groups[0]["lr"]))
        logged.update({f"expert_{e}": s for e, s in enumerate(share.tolist())})
        logged.update(self.target_shares(engine.loss_function, teacher["router_logits"], sched["teacher_temp"]))
        return {Keys.IMAGE: crops, Keys.LABEL: None, Keys.PRED: router, Keys.LOSS: terms["loss"].detach(),
                "terms": logged}  # fmt: skip
