"""What the batch preparations share: plain tensors on the device and per-device mask generators seeded by rank
(and by step, for an exactly resumable run)."""

from __future__ import annotations

from typing import Any

import torch

from medfm.utils.dist import rank_generator

__all__ = ["StepSeededGenerators", "plain_tensor"]


def plain_tensor(x: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """A plain tensor on ``device`` (MetaTensor metadata is not needed on the hot path)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x).to(device=device, non_blocking=non_blocking)


class StepSeededGenerators:
    """Mixin of the objects that draw masks from their own generators: one generator per device, seeded
    ``seed + rank`` on first use (DDP ranks draw different masks, a run is repeatable), or ``(seed, rank, step)``
    after :meth:`set_step` (a run seeded per iteration, resumable exactly). Call :meth:`init_generators` in
    ``__init__``."""

    seed: int

    def init_generators(self, seed: int) -> None:
        """Set the base seed and forget the generators drawn so far."""
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._step: int | None = None

    def set_step(self, step: int) -> None:
        """Reseed the mask generators from ``(seed, rank, step)`` (:class:`medfm.engines.StepSeedHandler` calls this
        as each iteration starts), so a resumed run draws the masks of the uninterrupted one."""
        self._step = int(step)
        self._generators.clear()

    def generator(self, device: torch.device | str | None) -> torch.Generator:
        """The mask generator on ``device`` (None: the CPU), seeded on first use."""
        dev = torch.device(device if device is not None else "cpu")
        if str(dev) not in self._generators:
            self._generators[str(dev)] = rank_generator(self.seed, dev, self._step)
        return self._generators[str(dev)]
