"""One SPAD-VT training iteration (generator step, then discriminator step) for ``SupervisedTrainer``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medfm.losses.tokenizer import hinge_d_loss
from medfm.utils.dist import get_world_size, is_distributed, unwrap

from .iteration import clip_and_step

__all__ = ["SpadTokenizerIteration"]


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require grad inside the block; their flags are restored after."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class SpadTokenizerIteration:
    """SPAD-VT's adversarial training step (SPAD-Nets, arXiv:2312.07630; PUMIT ``scripts/tokenizer/main.py``),
    usable as ``SupervisedTrainer(iteration_update=SpadTokenizerIteration(...))``.

    The engine holds the tokenizer (``network``, e.g. :class:`medfm.networks.nets.SpadVT`), its optimizer
    (``optimizer``) and the generator objective (``loss_function``, :class:`medfm.losses.SpadVTLoss`); the
    discriminator and its optimizer are given here. The engine's ``prepare_batch`` must give
    ``(x, x, (), {"aniso_d": int})`` (:class:`medfm.engines.SpadInputPrepareBatch`). Per iteration:

    1. generator: ``x_rec, quant_out = network(x, aniso_d=…)``; the GAN term is on only when
       ``max(disc_loss_ema, last disc_loss) <= gan_gate``; the discriminator's parameters are frozen and it is
       called unwrapped from DDP (no gradient sync for it in this step); backward, optional clipping, step.
    2. discriminator: hinge loss on ``x`` and the detached ``x_rec`` (one forward over both: the
       discriminator must normalise per sample, as GroupNorm does); backward, optional clipping, step; the
       loss is averaged over DDP ranks (every rank takes the same gate decision) and updates
       ``disc_loss_ema = momentum * ema + (1 - momentum) * disc_loss``.

    The gate state (``disc_loss_ema``, ``last_disc_loss``; the last loss starts at +inf so the first
    iteration never uses the GAN term, as in the reference) has ``state_dict`` / ``load_state_dict``: put this
    object in the checkpoint ``save_dict`` (with the discriminator and its optimizer) so a resumed run keeps it.
    The engine output holds ``image``, ``label``, ``pred`` (x_rec), ``loss`` and ``terms``: every loss term,
    ``gan_enabled`` (0/1), ``disc_loss``, ``disc_loss_ema``, ``lr`` and ``d_lr``
    (see :func:`medfm.engines.loss_terms`).

    Args:
        discriminator: patch discriminator, ``discriminator(x, aniso_d)`` -> scores.
        d_optimizer: optimizer of the discriminator (reference: AdamW lr 1e-3, wd 0.05).
        gan_gate: the GAN term is used once the discriminator loss (EMA and last) is at most this
            (reference ``use_gan_th``: 0.025 in ``conf/tokenizer/simple/main.yaml``).
        disc_loss_momentum: EMA momentum of the discriminator loss (reference 0.9).
        disc_loss_ema_init: initial EMA (reference 0.1).
        bf16: autocast the forward passes to bfloat16.
        grad_clip_norm: clip the tokenizer's gradient norm; None disables (reference default).
        d_grad_clip_norm: clip the discriminator's gradient norm; None disables.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        gan_gate: float = 0.025,
        disc_loss_momentum: float = 0.9,
        disc_loss_ema_init: float = 0.1,
        bf16: bool = False,
        grad_clip_norm: float | None = None,
        d_grad_clip_norm: float | None = None,
    ) -> None:
        if not 0.0 <= disc_loss_momentum < 1.0:
            raise ValueError(f"disc_loss_momentum must be in [0, 1), got {disc_loss_momentum}.")
        for name, v in (("grad_clip_norm", grad_clip_norm), ("d_grad_clip_norm", d_grad_clip_norm)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive or None, got {v}.")
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.gan_gate = float(gan_gate)
        self.disc_loss_momentum = float(disc_loss_momentum)
        self.bf16 = bf16
        self.grad_clip_norm = grad_clip_norm
        self.d_grad_clip_norm = d_grad_clip_norm
        self.disc_loss_ema = float(disc_loss_ema_init)
        self.last_disc_loss = math.inf

    @property
    def gan_enabled(self) -> bool:
        """Whether the next generator step uses the GAN term."""
        return max(self.disc_loss_ema, self.last_disc_loss) <= self.gan_gate

    def state_dict(self) -> dict[str, float]:
        return {"disc_loss_ema": self.disc_loss_ema, "last_disc_loss": self.last_disc_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"disc_loss_ema", "last_disc_loss"} - set(state)
        if missing:
            raise KeyError(f"SpadTokenizerIteration state lacks {sorted(missing)} (got {sorted(state)}).")
        self.disc_loss_ema = float(state["disc_loss_ema"])
        self.last_disc_loss = float(state["last_disc_loss"])

    def _update_gate(self, disc_loss: torch.Tensor) -> float:
        value = disc_loss.detach().clone()
        if is_distributed():
            dist.all_reduce(value)
            value /= get_world_size()
        d = float(value)
        self.last_disc_loss = d
        self.disc_loss_ema = self.disc_loss_momentum * self.disc_loss_ema + (1.0 - self.disc_loss_momentum) * d
        return d

    def __call__(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("no batch data for this iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        aniso_d = kwargs.get("aniso_d")
        device_type = torch.device(engine.state.device if engine.state.device is not None else inputs.device).type
        disc = self.discriminator
        engine.network.train()
        disc.train()
        gan_enabled = self.gan_enabled and getattr(engine.loss_function, "gan_weight", 1.0) > 0

        # generator step
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with _frozen(disc):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
                preds = engine.inferer(inputs, engine.network, *args, **kwargs)
                x_rec = preds[0]
                fake_logits = unwrap(disc)(x_rec, aniso_d) if gan_enabled else None
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function.forward_terms(preds, targets, fake_logits=fake_logits)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            terms["loss"].backward()
        clip_and_step(engine, self.grad_clip_norm)

        # discriminator step
        self.d_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            # one forward over real and fake (GroupNorm is per sample, so this equals two separate calls)
            scores = disc(torch.cat([targets.detach(), x_rec.detach().to(targets.dtype)]), aniso_d)
        score_real, score_fake = scores.chunk(2)
        disc_loss = hinge_d_loss(score_real, score_fake)
        disc_loss.backward()
        if self.d_grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(disc.parameters(), self.d_grad_clip_norm)
        self.d_optimizer.step()
        d = self._update_gate(disc_loss)

        logged = {k: float(v.detach()) for k, v in terms.items()}
        logged.update(gan_enabled=float(gan_enabled), disc_loss=d, disc_loss_ema=self.disc_loss_ema)
        logged["lr"] = float(engine.optimizer.param_groups[0]["lr"])
        logged["d_lr"] = float(self.d_optimizer.param_groups[0]["lr"])
        return {Keys.IMAGE: inputs, Keys.LABEL: targets, Keys.PRED: x_rec.detach(), Keys.LOSS: terms["loss"].detach(),
                "terms": logged}  # fmt: skip
