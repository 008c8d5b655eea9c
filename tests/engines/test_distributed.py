import gc
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, ValidationHandler

from medfm.engines import (
    AtomicCheckpointSaver,
    BestModelSaver,
    ResumeFromCheckpoint,
    RunState,
    SamplerEpochHandler,
    ServedModelSaver,
    end_distributed,
    handlers_for_rank,
)


def test_rank_zero_keeps_all_handlers_other_ranks_the_state_changing_ones():
    every_rank = (CheckpointLoader, LrScheduleHandler, ResumeFromCheckpoint, SamplerEpochHandler, ValidationHandler,
                  ServedModelSaver, RunState)  # fmt: skip
    rank_zero = (StatsHandler, TensorBoardStatsHandler, BestModelSaver, AtomicCheckpointSaver)
    handlers = [object.__new__(c) for pair in zip(every_rank, rank_zero + rank_zero[:3]) for c in pair]
    assert handlers_for_rank(handlers, rank=0) == handlers
    # weights loaded after DDP's initial sync must reach every rank, schedules must agree, and validation must run
    # on every rank (ignite's metrics all-reduce); logging and writing files stay on rank 0
    assert handlers_for_rank(handlers, rank=1) == [h for h in handlers if isinstance(h, every_rank)]
    assert [type(h) for h in handlers_for_rank(handlers, rank=1)] == list(every_rank)


def _gloo_threads() -> int:
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n == "pt_gloo_runloop" for n in names)


def _end_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    net(torch.randn(3, 4)).sum().backward()
    gathered = [MetaTensor(torch.zeros(2)) for _ in range(2)]  # a tensor subclass, as the metrics all-gather
    dist.all_gather(gathered, MetaTensor(torch.full((2,), float(rank))))
    threads_before = _gloo_threads()
    del gathered
    end_distributed(net)
    state = {"reducer": net.reducer is None, "logger": net.logger is None, "initialized": dist.is_initialized(),
             "before": threads_before}  # fmt: skip
    del net
    gc.collect()
    state["after"] = _gloo_threads()  # the group is freed once its last owner goes, not kept alive
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(state, f)


def test_end_distributed_releases_the_reducer_and_frees_the_group(tmp_path):
    end_distributed(torch.nn.Linear(2, 2))  # without a process group: nothing to do, no error
    mp.start_processes(_end_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")  # both exit
    for rank in range(2):
        state = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert state["reducer"] and state["logger"] and not state["initialized"]
        assert state["before"] > 0 and state["after"] == 0, state
