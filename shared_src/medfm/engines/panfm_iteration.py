"""Pan-FM pre-training: batch preparation and the self-distillation step for ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils.enums import CommonKeys as Keys

from medfm.losses.self_distill import teacher_temp_schedule
from medfm.masking.saliency import SUPPORTED_ORGAN_MASKING, organ_masking
from medfm.organs import PANFM_ORGANS
from medfm.utils.dist import rank_generator

from .prepare_batch import plain_tensor
from .schedules import cosine_schedule, set_weight_decay

__all__ = ["PanFMIteration", "PanFMPrepareBatch"]


class PanFMPrepareBatch(PrepareBatch):
    """Turn a collated pan-organ batch into ``(images, labels, (), {"present": present})``.

    The batch holds ``<image_prefix><organ>`` (B, C, *organ_shape) per organ (zeros where missing), ``present``
    (B, len(data_organs)) bool with columns in ``data_organs`` order, and optionally ``labels`` (B, K).
    ``images`` maps each of ``organs`` to its image on ``device``; an organ missing from the whole batch is not
    read or moved. ``present`` is reordered to ``organs`` (a subset of ``data_organs`` works).

    Args:
        organs: the network's organs, in its order.
        image_prefix: prefix of the image keys.
        present_key: key of the presence matrix.
        label_key: key of the labels; a batch without it gives ``labels=None``.
        data_organs: column order of ``present`` in the batch.
    """

    def __init__(
        self,
        organs: Sequence[str] = PANFM_ORGANS,
        image_prefix: str = "image_",
        present_key: str = "present",
        label_key: str = "labels",
        data_organs: Sequence[str] = PANFM_ORGANS,
    ) -> None:
        unknown = [o for o in organs if o not in data_organs]
        if unknown:
            raise ValueError(f"organs {unknown} are not columns of the batch's present matrix {list(data_organs)}.")
        self.organs = tuple(organs)
        self.image_prefix = image_prefix
        self.present_key = present_key
        self.label_key = label_key
        self.columns = [list(data_organs).index(o) for o in self.organs]
        self.num_data_organs = len(data_organs)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        if self.present_key not in batchdata:
            raise KeyError(f"the batch has no {self.present_key!r} entry (keys: {sorted(batchdata)}).")
        present = batchdata[self.present_key]
        if isinstance(present, (list, tuple)) and present and isinstance(present[0], torch.Tensor):
            present = torch.stack(list(present), dim=1)  # per-item lists collate to one (B,) tensor per organ
        present = plain_tensor(present, None, False)
        if present.ndim != 2 or present.shape[1] != self.num_data_organs:
            raise ValueError(
                f"batch[{self.present_key!r}] must be (B, {self.num_data_organs}), got {tuple(present.shape)}."
            )
        present = present[:, self.columns].bool()
        images = {}
        for organ, used in zip(self.organs, present.any(0).tolist()):
            if not used:
                continue
            key = self.image_prefix + organ
            if key not in batchdata:
                raise KeyError(f"organ {organ!r} is present in the batch but there is no {key!r} entry.")
            images[organ] = plain_tensor(batchdata[key], device, non_blocking).float()
        labels = batchdata.get(self.label_key)
        labels = None if labels is None else plain_tensor(labels, device, non_blocking).float()
        return images, labels, (), {"present": present.to(device=device, non_blocking=non_blocking)}


class PanFMIteration:
    """One Pan-FM self-distillation step (our proposal after iBOT, arXiv:2111.07832, and Pan-FM's SGM,
    arXiv:2605.07055), usable as ``SupervisedTrainer(iteration_update=PanFMIteration(...))``.

    The engine holds ``network`` = :class:`medfm.networks.nets.PanFMSelfDistill` (DDP-wrapped or not),
    ``optimizer`` over ``network.student`` only, ``loss_function`` = :class:`medfm.losses.PanFMLoss` and
    ``prepare_batch`` = :class:`PanFMPrepareBatch`; its ``inferer`` is not used. Per iteration:

    1. teacher on every present organ (no gradient), with its last-block CLS attention per organ;
    2. organ masks: ``"random"`` (uniform), ``"sgm"`` (saliency-guided) or ``"mix"`` (SGM for a
       ``sgm_fraction`` of the subjects), see :func:`medfm.masking.organ_masking`; drawn from this object's
       generator on the batch's device, seeded ``seed + rank`` (``(seed, rank, step)`` after :meth:`set_step`);
    3. student on the masked view (through ``engine.network``, so DDP syncs its gradients); the teacher's patch
       head on every token (same ``present`` -> same packing -> same token slots): the masked ones are the
       patch loss's targets, and all of them update its centre, as in iBOT;
    4. ``L = L_cls + patch_weight * L_patch`` (weight set in the loss), backward, clipping; weight decay set from
       its cosine schedule (DINO: 0.04 -> 0.4) on the groups that decay, optimizer step;
    5. EMA teacher update with the cosine momentum schedule.

    Schedules use ``step = engine.state.iteration - 1``, so a resumed run continues them. The loss's centres
    are buffers: put the loss in the checkpoint's ``save_dict`` beside the network and optimizer. The output
    holds ``image`` (organ -> image), ``label``, ``pred`` (student and teacher CLS logits), ``loss``,
    ``organ_attention`` (B, O), ``organ_mask`` and ``present`` (B, O), and ``terms``: ``loss``, ``cls``,
    ``patch``, ``teacher_temp``, ``momentum``, ``weight_decay``, ``masked_fraction`` (masked / present organs), ``lr``
    and ``attn_<organ>`` (batch mean of the teacher's token-normalised attention share, 0 for subjects without the
    organ: the shares sum to 1) for :func:`medfm.engines.loss_terms`. The weight-decay schedule reuses M-IDoL's
    helpers (:func:`~medfm.engines.cosine_schedule`, :func:`~medfm.engines.set_weight_decay`).

    Args:
        organs: the network's organs (names of the ``attn_<organ>`` terms); must match the network.
        masking: ``"random"``, ``"sgm"`` or ``"mix"`` (the ablation switch; default ``"mix"``, as the bundle).
        sgm_fraction: share of subjects masked by SGM in ``"mix"`` mode.
        floor: lambda, the uniform share of the SGM probabilities.
        ratio_range: range of the per-subject organ masking ratio.
        warmup_teacher_temp_steps: steps of the teacher-temperature warm-up; None takes 30% of ``total_steps``.
        total_steps: steps of the momentum and weight-decay schedules; None takes ``max_epochs * epoch_length``.
        momentum_start: EMA momentum at step 0 (cosine to 1).
        teacher_temp: (start, end) teacher temperature of the warm-up.
        weight_decay: (start, end) of the cosine weight-decay schedule (DINO: 0.04 -> 0.4), applied to the
            optimizer groups whose weight decay is > 0 at the first step (the others stay at 0); None leaves the
            optimizer's weight decay as it is.
        grad_clip_norm: clip the student's gradient norm; None disables.
        seed: base seed of the mask generator.
        bf16: autocast the forward passes to bfloat16.
    """

    def __init__(
        self,
        organs: Sequence[str] = PANFM_ORGANS,
        masking: Literal["random", "sgm", "mix"] = "mix",
        sgm_fraction: float = 0.5,
        floor: float = 0.2,
        ratio_range: tuple[float, float] = (0.1, 0.5),
        warmup_teacher_temp_steps: int | None = None,
        total_steps: int | None = None,
        momentum_start: float = 0.992,
        teacher_temp: tuple[float, float] = (0.04, 0.07),
        weight_decay: tuple[float, float] | None = (0.04, 0.4),
        grad_clip_norm: float | None = 3.0,
        seed: int = 0,
        bf16: bool = False,
    ) -> None:
        if masking not in SUPPORTED_ORGAN_MASKING:
            raise ValueError(f"masking must be one of {SUPPORTED_ORGAN_MASKING}, got {masking!r}.")
        if not 0.0 <= sgm_fraction <= 1.0:
            raise ValueError(f"sgm_fraction must be in [0, 1], got {sgm_fraction}.")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}.")
        if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
            raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {tuple(ratio_range)}.")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be positive or None, got {total_steps}.")
        if warmup_teacher_temp_steps is not None and warmup_teacher_temp_steps < 0:
            raise ValueError(f"warmup_teacher_temp_steps must be non-negative, got {warmup_teacher_temp_steps}.")
        if not 0.0 <= momentum_start <= 1.0:
            raise ValueError(f"momentum_start must be in [0, 1], got {momentum_start}.")
        if len(teacher_temp) != 2 or min(teacher_temp) <= 0:
            raise ValueError(f"teacher_temp must be two positive temperatures (start, end), got {teacher_temp}.")
        if weight_decay is not None and (len(weight_decay) != 2 or min(weight_decay) < 0):
            raise ValueError(f"weight_decay must be two non-negative values (start, end) or None, got {weight_decay}.")
        self.organs = tuple(organs)
        self.masking = masking
        self.weight_decay = None if weight_decay is None else (float(weight_decay[0]), float(weight_decay[1]))
        self.sgm_fraction = sgm_fraction
        self.floor = floor
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.total_steps = total_steps
        self.momentum_start = momentum_start
        self.teacher_temp = (float(teacher_temp[0]), float(teacher_temp[1]))
        self.grad_clip_norm = grad_clip_norm
        self.seed = seed
        self.bf16 = bf16
        self._generators: dict[str, torch.Generator] = {}
        self._step: int | None = None

    def set_step(self, step: int) -> None:
        """Reseed the mask generators from ``(seed, rank, step)`` (:class:`medfm.engines.StepSeedHandler` calls this
        as each iteration starts), so a resumed run draws the masks of the uninterrupted one."""
        self._step = int(step)
        self._generators.clear()

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The mask generator on ``device`` (seeded ``seed + rank``, or ``(seed, rank, step)``, on first use)."""
        dev = torch.device(device)
        if str(dev) not in self._generators:
            self._generators[str(dev)] = rank_generator(self.seed, dev, self._step)
        return self._generators[str(dev)]

    def schedules(self, engine: Any) -> dict[str, float]:
        """``teacher_temp``, ``momentum`` and (unless switched off) ``weight_decay`` of the engine's current
        iteration."""
        total = self.total_steps or max(1, int(engine.state.max_epochs) * int(engine.state.epoch_length))
        warmup = self.warmup_teacher_temp_steps
        warmup = round(0.3 * total) if warmup is None else warmup
        step = int(engine.state.iteration) - 1
        sched = {
            "teacher_temp": teacher_temp_schedule(step, warmup, *self.teacher_temp),
            "momentum": cosine_schedule(step, total, self.momentum_start, 1.0),
        }
        if self.weight_decay is not None:
            sched["weight_decay"] = cosine_schedule(step, total, *self.weight_decay)
        return sched

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("no batch data for this iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, labels, _, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        if "present" not in kwargs:
            raise KeyError("prepare_batch must give {'present': (B, O) bool} as keyword arguments (PanFMPrepareBatch).")
        present = kwargs["present"]
        model = getattr(engine.network, "module", engine.network)  # unwrap DistributedDataParallel
        if tuple(model.organs) != self.organs:
            raise ValueError(f"PanFMIteration organs {self.organs} differ from the network's {tuple(model.organs)}.")
        sched = self.schedules(engine)
        teacher_temp, momentum = sched["teacher_temp"], sched["momentum"]
        device_type = present.device.type
        engine.network.train()  # the teacher stays in eval mode (PanFMSelfDistill.train)

        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            teacher = model.forward_teacher(images, present)
        attention = teacher["organ_attention"]
        organ_mask = organ_masking(
            self.masking, attention, present, self.sgm_fraction, self.floor, self.ratio_range,
            self.generator(present.device),
        )  # fmt: skip

        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            student = engine.network(images, present, organ_mask)
            if student["masked"].shape != teacher["tokens"].shape[:2]:
                raise RuntimeError("student and teacher token layouts differ: they must pack the same organs.")
            if getattr(engine.loss_function, "patch_loss", None) is None:
                teacher["patch_logits"] = model.teacher_patch_logits(teacher["tokens"], student["masked"])
            else:  # every teacher token, for iBOT's patch centre; the masked ones are the loss's targets
                valid = teacher["valid"]
                every = model.teacher_patch_logits(teacher["tokens"], valid)
                teacher["patch_logits"] = every[student["masked"][valid]]
                teacher["patch_center_logits"] = every
                teacher["patch_center_sample"] = valid.nonzero()[:, 0]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function.forward_terms(student, teacher, teacher_temp)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.student.parameters(), self.grad_clip_norm)
        if "weight_decay" in sched:
            set_weight_decay(engine.optimizer, sched["weight_decay"])
        engine.optimizer.step()
        model.update_teacher(momentum)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged.update(sched, lr=float(engine.optimizer.param_groups[0]["lr"]))
        logged["masked_fraction"] = float(organ_mask.sum()) / max(1, int(present.sum()))
        for organ, share in zip(self.organs, attention.float().mean(0).tolist()):
            logged[f"attn_{organ}"] = share
        preds = {"student_cls": student["cls_logits"].detach(), "teacher_cls": teacher["cls_logits"]}
        return {Keys.IMAGE: images, Keys.LABEL: labels, Keys.PRED: preds, Keys.LOSS: terms["loss"].detach(),
                "organ_attention": attention.detach(), "organ_mask": organ_mask, "present": present,
                "terms": logged}  # fmt: skip
