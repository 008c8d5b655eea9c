"""What each process of a distributed run attaches, and the wiring every bundle's multi-GPU overlay calls.

A multi-GPU overlay (``multi_gpu_train.json``) merged over a training config under ``torchrun`` sets::

    "device": "$medfm.engines.distributed.local_device()",
    "network": {"_target_": "medfm.engines.distributed.ddp", "module": <the single-process network>,
                "find_unused_parameters": ...},
    "initialize": ["$medfm.engines.distributed.init_distributed(@device)", ...],
    "finalize": ["$medfm.engines.end_distributed(@network)"]

and hands the samplers :func:`medfm.utils.dist.get_world_size` / :func:`medfm.utils.dist.get_rank`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.handlers import CheckpointLoader, LrScheduleHandler, ValidationHandler
from torch.nn.parallel import DistributedDataParallel

from medfm.utils.dist import get_rank, in_process_group

from .best_model import ServedModelSaver
from .checkpoint import ResumeFromCheckpoint
from .run_state import RunState
from .sampler_epoch import SamplerEpochHandler
from .step_seed import StepSeedHandler

__all__ = [
    "EVERY_RANK_HANDLERS",
    "ddp",
    "ddp_device_ids",
    "end_distributed",
    "handlers_for_rank",
    "init_distributed",
    "local_device",
]

# Handlers that change the training state (or what each process samples): every process must run them. Everything
# else (progress bar, TensorBoard, checkpoint saving) writes output and runs on rank 0 only. CheckpointLoader loads
# weights when the trainer starts, after DistributedDataParallel has synchronised the ranks (MONAI Label's /train
# inserts one), so every rank must load them itself.
# Validation runs on every rank too (ignite's metrics all-reduce over the ranks, so an evaluation on rank 0 alone would
# wait forever): ValidationHandler, and ServedModelSaver, which validates and writes on rank 0 alone.
EVERY_RANK_HANDLERS: tuple[type, ...] = (
    ResumeFromCheckpoint,
    RunState,
    LrScheduleHandler,
    SamplerEpochHandler,
    StepSeedHandler,
    CheckpointLoader,
    ValidationHandler,
    ServedModelSaver,
)


def handlers_for_rank(handlers: Sequence[Any], rank: int | None = None) -> list[Any]:
    """All ``handlers`` on rank 0; on other ranks only the state-changing ones (:data:`EVERY_RANK_HANDLERS`).

    Args:
        handlers: a bundle's ``train#handlers``.
        rank: process rank; defaults to the initialised process group's rank (0 without one).
    """
    if rank is None:
        rank = get_rank()
    if rank == 0:
        return list(handlers)
    return [h for h in handlers if isinstance(h, EVERY_RANK_HANDLERS)]


def end_distributed(network: Any = None) -> None:
    """End a distributed run (the multi-GPU configs' ``finalize``): wait for every rank, release
    DistributedDataParallel's reducer, destroy the default process group. Does nothing without one.

    Releasing the reducer first keeps the process from hanging at exit. Gloo's worker threads free each
    finished collective, and freeing a tensor subclass (MONAI's ``MetaTensor``: the validation metrics
    all-gather them) needs the GIL. The group's destructor joins those threads. torch frees the group
    without the GIL when its last owner is a Python ``ProcessGroup`` handle, but with the GIL held when
    its last owner is DDP's reducer (collected with the module after ``finalize``). If a worker is freeing
    a collective at that moment, the two wait on each other forever (about 1 in 20 two-process CPU runs).
    So the reducer, and the logger that holds it, go while the group is still registered: the group's
    last owner is then a Python handle (the one kept here, or the module's ``process_group``).

    Args:
        network: the run's network; a ``DistributedDataParallel`` has its reducer and logger released
            (it cannot train after this).
    """
    if not in_process_group():
        return
    group = dist.group.WORLD  # a Python handle: the last one to go frees the group with the GIL released
    dist.barrier()  # no rank tears down while another still communicates
    if isinstance(network, DistributedDataParallel):
        network.logger = None  # the logger holds the reducer
        network.reducer = None  # the reducer holds the group
    dist.destroy_process_group()
    del group


def local_device() -> torch.device:
    """This process's device under ``torchrun``: CUDA device ``LOCAL_RANK`` when CUDA is available, else the CPU.

    Raises:
        ValueError: CUDA is available and ``LOCAL_RANK`` is not set (the run was not started by ``torchrun``).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("LOCAL_RANK is not set: start a multi-GPU config with torchrun.")
    return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")


def init_distributed(device: torch.device | str) -> None:
    """Join the default process group (NCCL on CUDA, Gloo on the CPU) unless joined already, and make ``device``
    this process's CUDA device.

    Args:
        device: this process's device (:func:`local_device`).
    """
    device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def ddp_device_ids(device: torch.device | str) -> list[torch.device] | None:
    """``DistributedDataParallel``'s ``device_ids`` for this process: ``[device]`` on CUDA, ``None`` on the CPU.

    Args:
        device: this process's device.
    """
    device = torch.device(device)
    return [device] if device.type == "cuda" else None


def ddp(module: torch.nn.Module, find_unused_parameters: bool = False) -> DistributedDataParallel:
    """``module`` wrapped in ``DistributedDataParallel`` on the device it is on (:func:`ddp_device_ids` of it).

    Args:
        module: the single-process network, moved to this process's device already.
        find_unused_parameters: let DDP tolerate parameters without a gradient in an iteration.

    Raises:
        ValueError: ``module`` has neither parameters nor buffers to tell its device.
    """
    tensor = next(module.parameters(), None)
    tensor = tensor if tensor is not None else next(module.buffers(), None)
    if tensor is None:
        raise ValueError(f"{type(module).__name__} has no parameters or buffers: nothing for DistributedDataParallel.")
    return DistributedDataParallel(
        module, device_ids=ddp_device_ids(tensor.device), find_unused_parameters=find_unused_parameters
    )
