"""Atomic, resumable training checkpoints."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from ..utils.dist import unwrap
from ..utils.files import atomic_path

__all__ = ["AtomicCheckpointSaver", "ResumeFromCheckpoint", "atomic_torch_save", "latest_checkpoint"]

logger = logging.getLogger(__name__)
_CKPT_RE = re.compile(r"checkpoint_iter=(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The training checkpoint with the highest iteration in ``ckpt_dir``, or None if there is none."""
    found = []
    for p in glob.glob(os.path.join(ckpt_dir, "checkpoint_iter=*.pt")):
        m = _CKPT_RE.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _state(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


class AtomicCheckpointSaver:
    """Write ``checkpoint_iter=<n>.pt`` (every entry of ``save_dict`` as a state dict) every
    ``save_interval`` epochs (or iterations), keep the newest ``n_saved``, and write the model weights alone
    to ``final_filename`` when training completes. Every write is atomic (temporary file + rename).

    The engine it is attached to is saved as ``trainer`` (epoch and iteration), so
    :class:`ResumeFromCheckpoint` with the same entries resumes the run where it stopped.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: ``{"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer, …}``.
        save_interval: epochs (or iterations, with ``epoch_level=False``) between checkpoints.
        epoch_level: count ``save_interval`` in epochs.
        n_saved: checkpoints to keep.
        final_filename: file for the final model weights (``save_dict["model"]`` state dict only); None skips.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        epoch_level: bool = True,
        n_saved: int = 2,
        final_filename: str | None = "model.pt",
    ) -> None:
        if save_interval < 1 or n_saved < 1:
            raise ValueError(f"save_interval and n_saved must be positive, got {save_interval} and {n_saved}.")
        if final_filename is not None and "model" not in save_dict:
            raise ValueError("save_dict needs a 'model' entry to write the final weights.")
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.epoch_level = epoch_level
        self.n_saved = n_saved
        self.final_filename = final_filename

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.save_interval), self.save)
        if self.final_filename is not None:
            engine.add_event_handler(Events.COMPLETED, self.save_final)

    def save(self, engine: Engine) -> str:
        path = os.path.join(self.save_dir, f"checkpoint_iter={engine.state.iteration}.pt")
        atomic_torch_save({k: _state(v) for k, v in self.save_dict.items()}, path)
        kept = sorted(glob.glob(os.path.join(self.save_dir, "checkpoint_iter=*.pt")), key=_iteration_of)
        for old in kept[: -self.n_saved]:
            os.remove(old)
        logger.info("saved checkpoint %s", path)
        return path

    def save_final(self, engine: Engine) -> None:
        model = unwrap(self.save_dict["model"])
        atomic_torch_save(model.state_dict(), os.path.join(self.save_dir, str(self.final_filename)))


def _iteration_of(path: str) -> int:
    m = _CKPT_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else -1


class ResumeFromCheckpoint:
    """At start, load the newest ``checkpoint_iter=<n>.pt`` of ``ckpt_dir`` (if any) into ``load_dict`` and
    the engine itself (epoch, iteration), so a stopped run continues from its last checkpoint.

    Loading goes through MONAI's ``CheckpointLoader`` (``torch.load(weights_only=True)``); a run whose
    checkpoint is already past ``max_epochs`` is refused there with a clear error.

    After loading, every parameter that has optimizer state gets a zero gradient. In the run that wrote the
    checkpoint such a parameter holds a gradient tensor (zeroed, not None, by ``zero_grad(set_to_none=False)``,
    MONAI's trainer default), so the optimizer keeps stepping it (momentum, weight decay) in iterations that do not
    use it, e.g. FratMAE's decoder of the unmasked modality; a fresh process would hold None there and skip those
    steps.

    Args:
        ckpt_dir: folder searched with :func:`latest_checkpoint`.
        load_dict: ``{"model": net, "optimizer": opt, "lr_scheduler": sched, …}`` as given to the saver.
        map_location: passed to ``torch.load``.
        enabled: False never resumes (a fresh run even when checkpoints exist).
    """

    def __init__(
        self, ckpt_dir: str, load_dict: Mapping[str, Any], map_location: Any = None, enabled: bool = True
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.enabled = enabled
        self.loaded_path: str | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            logger.info("resuming is off: training starts from scratch")
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("no checkpoint in %s: training starts from scratch", self.ckpt_dir)
            return
        self.loaded_path = path
        logger.info("resuming from %s", path)
        loader = CheckpointLoader(
            load_path=path, load_dict={**self.load_dict, "trainer": engine}, map_location=self.map_location
        )
        loader.attach(engine)
        engine.add_event_handler(Events.STARTED, self._restore_zero_grads)

    def _restore_zero_grads(self, engine: Engine) -> None:
        for obj in self.load_dict.values():
            if not isinstance(obj, torch.optim.Optimizer):
                continue
            for group in obj.param_groups:
                for p in group["params"]:
                    if p.grad is None and obj.state.get(p):
                        p.grad = torch.zeros_like(p)
