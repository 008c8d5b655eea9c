"""One training iteration for ``SupervisedTrainer(iteration_update=…)``, for every model whose step is a forward, a
loss and an optimizer step (FratMAE and SPAD-ViT pre-training, every fine-tuning).

MONAI's trainer autocasts only on CUDA (fp16 with a scaler); this iteration autocasts to bfloat16 on
whichever device the run uses (CPU or CUDA; bf16 needs no scaler) and keeps every term of the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

__all__ = ["TrainingIteration", "clip_and_step", "logged_terms", "loss_scalar", "loss_terms"]


class TrainingIteration:
    """Forward (bf16 autocast optional), loss with named terms, backward, optional clipping, step.

    A loss function with ``forward_terms(preds, targets) -> {"loss": total, <term>: …}`` (all ``medfm.losses``
    objectives) has every term logged; any other loss (e.g. MONAI's ``DiceCELoss``) gives ``{"loss": …}``.
    The engine's output holds the batch, predictions, ``loss`` and
    ``terms`` (floats of every term plus the learning rate) for handlers.

    Args:
        bf16: autocast the forward pass to bfloat16.
        grad_clip_norm: clip the global gradient norm to this value; None disables.
    """

    def __init__(self, bf16: bool = False, grad_clip_norm: float | None = None) -> None:
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}.")
        self.bf16 = bf16
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("no batch data for this iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        device_type = torch.device(engine.state.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            preds = engine.inferer(inputs, engine.network, *args, **kwargs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if hasattr(engine.loss_function, "forward_terms"):
            terms = engine.loss_function.forward_terms(preds, targets)
        else:
            terms = {"loss": engine.loss_function(preds, targets)}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["loss"].backward()
        clip_and_step(engine, self.grad_clip_norm)
        logged = logged_terms(terms, engine.optimizer)
        return {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: preds, Keys.LOSS: terms["loss"].detach(),
                "terms": logged}  # fmt: skip


def clip_and_step(engine: Any, grad_clip_norm: float | None) -> None:
    """The end of a supervised step after ``backward()``: fire ``BACKWARD_COMPLETED``, clip the total gradient norm of
    ``engine.network`` to ``grad_clip_norm`` (``None``: no clipping), step ``engine.optimizer``, fire
    ``MODEL_COMPLETED``."""
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), grad_clip_norm)
    engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)


def logged_terms(
    terms: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, extra: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The floats an iteration logs: every loss term, then ``extra`` (e.g. the step's schedules), then ``lr`` (the
    first parameter group's learning rate)."""
    logged = {k: float(v.detach()) for k, v in terms.items()}
    logged.update(extra or {})
    logged["lr"] = float(optimizer.param_groups[0]["lr"])
    return logged


def loss_terms(output: dict[str, Any]) -> dict[str, float]:
    """``output_transform`` for stats handlers: every loss term and the learning rate of the iteration."""
    return dict(output["terms"])


def loss_scalar(output: Any) -> float:
    """``output_transform`` for stats handlers of supervised training: the iteration's loss as a float, whether the
    engine output is one dict (``decollate=False``) or a list of per-item dicts."""
    item = output[0] if isinstance(output, (list, tuple)) else output
    return float(torch.as_tensor(item[Keys.LOSS]).detach().float().mean())
