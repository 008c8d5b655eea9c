from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler

from medfm.engines import EVERY_RANK_HANDLERS, ResumeFromCheckpoint, SamplerEpochHandler, handlers_for_rank


def test_rank_zero_keeps_all_handlers_other_ranks_the_state_changing_ones():
    handlers = [object.__new__(c) for c in (CheckpointLoader, StatsHandler, LrScheduleHandler, ResumeFromCheckpoint,
                                            SamplerEpochHandler)]  # fmt: skip
    assert handlers_for_rank(handlers, rank=0) == handlers
    kept = handlers_for_rank(handlers, rank=1)
    # every loader and schedule runs everywhere (weights loaded after DDP's initial sync must reach every rank);
    # logging and saving stay on rank 0
    assert kept == [h for h in handlers if not isinstance(h, StatsHandler)]
    assert CheckpointLoader in EVERY_RANK_HANDLERS
