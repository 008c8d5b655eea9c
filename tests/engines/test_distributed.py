from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, ValidationHandler

from medfm.engines import (
    AtomicCheckpointSaver,
    BestModelSaver,
    ResumeFromCheckpoint,
    SamplerEpochHandler,
    ServedModelSaver,
    handlers_for_rank,
)


def test_rank_zero_keeps_all_handlers_other_ranks_the_state_changing_ones():
    every_rank = (CheckpointLoader, LrScheduleHandler, ResumeFromCheckpoint, SamplerEpochHandler, ValidationHandler,
                  ServedModelSaver)  # fmt: skip
    rank_zero = (StatsHandler, TensorBoardStatsHandler, BestModelSaver, AtomicCheckpointSaver)
    handlers = [object.__new__(c) for pair in zip(every_rank, rank_zero + rank_zero[:2]) for c in pair]
    assert handlers_for_rank(handlers, rank=0) == handlers
    # weights loaded after DDP's initial sync must reach every rank, schedules must agree, and validation must run
    # on every rank (ignite's metrics all-reduce); logging and writing files stay on rank 0
    assert handlers_for_rank(handlers, rank=1) == [h for h in handlers if isinstance(h, every_rank)]
    assert [type(h) for h in handlers_for_rank(handlers, rank=1)] == list(every_rank)
