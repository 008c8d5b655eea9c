"""Pan-FM pre-training: batch preparation and the self-distillation step for ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from monai.engines.utils import PrepareBatch
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medfm.masking.saliency import SUPPORTED_ORGAN_MASKING, organ_masking
from medfm.organs import PANFM_ORGANS

from .batch import StepSeededGenerators, plain_tensor
from .teacher_student import TeacherStudentIteration

__all__ = ["PanFMPretrainIteration", "PanFMPretrainPrepareBatch"]


class PanFMPretrainPrepareBatch(PrepareBatch):
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


class PanFMPretrainIteration(StepSeededGenerators, TeacherStudentIteration):
    """One Pan-FM self-distillation step (our proposal after iBOT, arXiv:2111.07832, and Pan-FM's SGM,
    arXiv:2605.07055), usable as ``SupervisedTrainer(iteration_update=PanFMPretrainIteration(...))``.

    The engine holds ``network`` = :class:`medfm.networks.nets.PanFMSelfDistill` (DDP-wrapped or not),
    ``optimizer`` over ``network.student`` only, ``loss_function`` = :class:`medfm.losses.PanFMLoss` and
    ``prepare_batch`` = :class:`PanFMPretrainPrepareBatch`; its ``inferer`` is not used. Per iteration:

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
    organ: the shares sum to 1) for :func:`medfm.engines.loss_terms`. Schedules, clipping, the optimizer step and
    the EMA update are :class:`~medfm.engines.TeacherStudentIteration`'s, shared with M-IDoL.

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
        super().__init__(
            momentum_start, teacher_temp, warmup_teacher_temp_steps, total_steps, weight_decay, grad_clip_norm, bf16
        )
        if masking not in SUPPORTED_ORGAN_MASKING:
            raise ValueError(f"masking must be one of {SUPPORTED_ORGAN_MASKING}, got {masking!r}.")
        if not 0.0 <= sgm_fraction <= 1.0:
            raise ValueError(f"sgm_fraction must be in [0, 1], got {sgm_fraction}.")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}.")
        if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
            raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {tuple(ratio_range)}.")
        self.organs = tuple(organs)
        self.masking = masking
        self.sgm_fraction = sgm_fraction
        self.floor = floor
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.init_generators(seed)

    def teacher_temp_warmup(self, total: int) -> int:
        """The given warm-up, or 30% of the run when None."""
        return round(0.3 * total) if self.warmup_teacher_temp_steps is None else self.warmup_teacher_temp_steps

    def unpack(self, engine: Any, batch: Any, model: nn.Module) -> dict[str, Any]:
        images, labels, _, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        if "present" not in kwargs:
            raise KeyError(
                "prepare_batch must give {'present': (B, O) bool} as keyword arguments (PanFMPretrainPrepareBatch)."
            )
        if tuple(model.organs) != self.organs:
            raise ValueError(
                f"PanFMPretrainIteration organs {self.organs} differ from the network's {tuple(model.organs)}."
            )
        return {"present": kwargs["present"], "images": images, "labels": labels}

    def forward_teacher(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return model.forward_teacher(inputs["images"], inputs["present"])

    def after_teacher(self, inputs: dict[str, Any], teacher: dict[str, Any]) -> None:
        present = inputs["present"]
        inputs["organ_mask"] = organ_masking(
            self.masking, teacher["organ_attention"], present, self.sgm_fraction, self.floor, self.ratio_range,
            self.generator(present.device),
        )  # fmt: skip

    def forward_student(
        self, engine: Any, model: nn.Module, inputs: dict[str, Any], teacher: dict[str, Any]
    ) -> dict[str, Any]:
        student = engine.network(inputs["images"], inputs["present"], inputs["organ_mask"])
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
        return student

    def extra_terms(
        self, engine: Any, inputs: dict[str, Any], teacher: dict[str, Any], sched: dict[str, float]
    ) -> dict[str, float]:
        logged = {"masked_fraction": float(inputs["organ_mask"].sum()) / max(1, int(inputs["present"].sum()))}
        for organ, share in zip(self.organs, teacher["organ_attention"].float().mean(0).tolist()):
            logged[f"attn_{organ}"] = share
        return logged

    def outputs(self, inputs: dict[str, Any], student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
        preds = {"student_cls": student["cls_logits"].detach(), "teacher_cls": teacher["cls_logits"]}
        return {Keys.IMAGE: inputs["images"], Keys.LABEL: inputs["labels"], Keys.PRED: preds,
                "organ_attention": teacher["organ_attention"].detach(), "organ_mask": inputs["organ_mask"],
                "present": inputs["present"]}  # fmt: skip
