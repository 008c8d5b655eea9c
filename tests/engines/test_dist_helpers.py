"""medfm.utils.dist: rank, world size, unwrapping and rank-seeded generators outside and inside a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medfm.engines import end_distributed
from medfm.utils.dist import get_rank, get_world_size, in_process_group, is_distributed, rank_generator, unwrap
from medfm.utils.seeding import derive_seed


def _draw(g: torch.Generator) -> torch.Tensor:
    return torch.rand(5, generator=g)


def test_outside_a_process_group_every_helper_is_rank_0_of_1():
    assert not in_process_group() and get_rank() == 0 and get_world_size() == 1 and not is_distributed()
    assert torch.equal(_draw(rank_generator(7)), _draw(torch.Generator().manual_seed(7)))
    assert torch.equal(_draw(rank_generator(7, step=3)), _draw(torch.Generator().manual_seed(derive_seed(7, 0, 3))))
    assert not torch.equal(_draw(rank_generator(7, step=3)), _draw(rank_generator(7, step=4)))


def test_inside_a_one_rank_group_and_unwrapping_ddp(tmp_path):
    net = nn.Linear(3, 2)
    assert unwrap(net) is net
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        assert in_process_group() and get_rank() == 0 and get_world_size() == 1 and not is_distributed()
        ddp = DistributedDataParallel(net)
        assert unwrap(ddp) is net
    finally:
        end_distributed(ddp)  # releases DDP's reducer before the group goes
    assert not in_process_group()
