"""The parts of exact resumption: seeds derived from positions, mid-epoch sampler start, per-sample transform seeds
(independent of the data-loader worker), per-iteration global seeds, zero gradients restored on resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, RandGaussianNoised
from torch.utils.data import DataLoader

from medfm.data import GroupBatchSampler, SeededDataset, SeededSample, shuffle_batch_sampler
from medfm.engines import (
    BestModelSaver,
    FratMAEPretrainPrepareBatch,
    ResumeFromCheckpoint,
    RunState,
    SamplerEpochHandler,
    StepSeedHandler,
)
from medfm.engines.checkpoint import atomic_torch_save
from medfm.utils.seeding import derive_seed


def test_derive_seed_depends_on_every_key_and_refuses_negatives():
    seeds = {derive_seed(s, e, i) for s in range(3) for e in range(3) for i in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    with pytest.raises(ValueError, match="-1"):
        derive_seed(0, -1)


def test_set_start_skips_the_batches_already_trained_on_and_lasts_one_epoch():
    s = shuffle_batch_sampler(10, 2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(3)
    assert list(s) == full[3:]  # the resumed pass: the rest of the epoch, in the same order
    s.set_epoch(3)
    assert len(list(s)) == 5  # the next epoch starts at its first batch
    with pytest.raises(ValueError, match="start"):
        s.set_start(5)


def test_one_group_sampler_is_a_shuffle_of_every_item_each_epoch():
    s = shuffle_batch_sampler(9, 2, drop_last=True, seed=0)
    for epoch in (1, 2):
        s.set_epoch(epoch)
        batches = list(s)
        flat = [i for b in batches for i in b]
        assert len(batches) == 4 and all(len(b) == 2 for b in batches) and len(set(flat)) == 8
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert first != list(s)


def test_seeded_samples_carry_seeds_from_seed_epoch_and_index():
    s = GroupBatchSampler([0, 1, 0, 1, 0, 1], 2, seed=5, seed_samples=True)
    s.set_epoch(4)
    items = [x for b in s for x in b]
    assert sorted(x.index for x in items) == list(range(6))
    assert all(isinstance(x, SeededSample) and x.seed == derive_seed(5, 4, x.index) and x.draw is None for x in items)


class _Items:
    """A MONAI-style dataset: ``transform`` applied to item ``i`` = ``{"x": zeros + i}``."""

    def __init__(self, n: int, transform):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform({"x": torch.zeros(1, 4) + i})


def _noise():
    return Compose([RandGaussianNoised("x", prob=1.0, std=0.05)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sample_augmentation_does_not_depend_on_worker_or_order(num_workers):
    sampler = shuffle_batch_sampler(8, 2, seed=1, seed_samples=True)
    sampler.set_epoch(1)
    loader = DataLoader(SeededDataset(_Items(8, _noise())), batch_sampler=sampler, num_workers=num_workers)
    got = {int(x[0, 0].round()): x for batch in loader for x in batch["x"]}  # noise << 1: rounding gives the index
    ds = SeededDataset(_Items(8, _noise()))
    torch.manual_seed(123)
    np.random.seed(7)
    for i in reversed(range(8)):  # another order, another process, other global generator states
        expected = ds[SeededSample(i, derive_seed(1, 1, i))]["x"]
        assert torch.equal(got[i], expected), i
    other_epoch = ds[SeededSample(0, derive_seed(1, 2, 0))]["x"]
    assert not torch.equal(other_epoch, ds[SeededSample(0, derive_seed(1, 1, 0))]["x"])


def test_seeded_dataset_leaves_the_callers_global_generators_alone():
    ds = SeededDataset(_Items(2, _noise()))
    torch.manual_seed(0)
    np.random.seed(0)
    ds[SeededSample(1, 99)]
    a, b = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    assert torch.equal(a, torch.rand(3)) and np.array_equal(b, np.random.rand(3))


def test_sampler_epoch_handler_starts_a_resumed_epoch_where_the_checkpoint_was():
    sampler = shuffle_batch_sampler(8, 2, seed=0)  # 4 batches per epoch
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.iteration, b)))
    SamplerEpochHandler(sampler).attach(engine)
    engine.run(torch.utils.data.DataLoader(range(8), batch_sampler=sampler, collate_fn=list), max_epochs=3)
    ref = [b for _, b in seen]
    seen.clear()
    engine = Engine(lambda e, b: seen.append((e.state.iteration, b)))
    SamplerEpochHandler(sampler).attach(engine)
    engine.load_state_dict({"iteration": 6, "epoch_length": 4, "max_epochs": 3})
    engine.run(torch.utils.data.DataLoader(range(8), batch_sampler=sampler, collate_fn=list))
    assert [i for i, _ in seen] == list(range(7, 13)) and [b for _, b in seen] == ref[6:]


def test_sampler_epoch_handler_refuses_a_changed_epoch_length():
    sampler = shuffle_batch_sampler(8, 2, seed=0)
    engine = Engine(lambda e, b: None)
    SamplerEpochHandler(sampler).attach(engine)
    engine.load_state_dict({"iteration": 6, "epoch_length": 3, "max_epochs": 3})  # written with 3 batches per epoch
    with pytest.raises(ValueError, match="epoch_length"):
        engine.run(torch.utils.data.DataLoader(range(8), batch_sampler=sampler, collate_fn=list))


def test_step_seed_handler_makes_each_iteration_draw_by_its_number():
    prep = FratMAEPretrainPrepareBatch(patch_size=2, seed=4, text_key=None)

    def draws(start: int) -> list:
        engine = Engine(lambda e, b: (torch.rand(2), prep.generator("cpu").initial_seed()))
        StepSeedHandler(4, [prep]).attach(engine)
        out = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.append(e.state.output))
        if start:
            engine.load_state_dict({"iteration": start, "epoch_length": 5, "max_epochs": 2})
        engine.run(range(5), max_epochs=2)
        return out

    full, resumed = draws(0), draws(7)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(full[7:], resumed))
    assert full[0][1] == derive_seed(4, 0, 1) and not torch.equal(full[0][0], full[1][0])
    with pytest.raises(TypeError, match="set_step"):
        StepSeedHandler(0, [object()])


def test_resume_gives_zero_gradients_to_parameters_with_optimizer_state(tmp_path):
    net = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "idle": torch.nn.Linear(2, 1)})
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net["idle"](torch.ones(1, 2)).sum().backward()  # "idle" was used once: it has state and a zeroed gradient since
    opt.step()
    atomic_torch_save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                       "trainer": {"epoch_length": 2, "iteration": 1, "max_epochs": 2}},
                      str(tmp_path / "checkpoint_iter=1.pt"))  # fmt: skip
    fresh = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "idle": torch.nn.Linear(2, 1)})
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    ResumeFromCheckpoint(str(tmp_path), {"model": fresh, "optimizer": fresh_opt}).attach(engine)
    engine.run(range(2), max_epochs=2)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in fresh["idle"].parameters())
    assert all(p.grad is None for p in fresh["used"].parameters())  # no state: stays skipped, as in the first run


def test_best_model_saver_keeps_its_best_score_across_a_resume(tmp_path):
    net = torch.nn.Linear(1, 1)
    evaluator = Engine(lambda e, b: None)
    first = BestModelSaver(str(tmp_path), net, "auc")
    evaluator.state.metrics = {"auc": 0.8}
    first(evaluator)
    assert first.state_dict() == {"best": 0.8}
    (tmp_path / "model.pt").unlink()
    resumed = BestModelSaver(str(tmp_path), net, "auc")
    resumed.load_state_dict(first.state_dict())
    evaluator.state.metrics = {"auc": 0.7}  # worse than the best before the restart: nothing written
    resumed(evaluator)
    assert not (tmp_path / "model.pt").exists()
    with pytest.raises(ValueError, match="best"):
        resumed.load_state_dict({})


def test_run_state_attaches_resume_seeding_sampler_and_every_schedule_in_order(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scheds = [torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda i: 0.5) for _ in range(2)]
    sampler = shuffle_batch_sampler(6, 2, seed=1)
    prep = FratMAEPretrainPrepareBatch(patch_size=2, seed=4, text_key=None)
    state = RunState(str(tmp_path), {"model": net, "optimizer": opt}, sampler, scheds, seed=4, seed_targets=[prep])
    assert [type(h).__name__ for h in state.handlers] == [
        "ResumeFromCheckpoint",
        "StepSeedHandler",
        "SamplerEpochHandler",
        "LrScheduleHandler",
        "LrScheduleHandler",
    ]
    assert state.resume.enabled and state.step_seed.targets == [prep] and state.sampler_epoch.sampler is sampler
    lrs, epochs = [], []
    engine = Engine(lambda e, b: (lrs.append(opt.param_groups[0]["lr"]), epochs.append(sampler.epoch)))
    state.attach(engine)
    engine.run(DataLoader(range(6), batch_sampler=sampler, collate_fn=list), max_epochs=2)
    # both schedulers step once per iteration (after it); the sampler is told each epoch; the prepare_batch reseeded
    assert lrs == [0.25**i for i in range(6)] and epochs == [1] * 3 + [2] * 3
    assert prep.generator("cpu").initial_seed() == derive_seed(4, 0, 6)
    assert not RunState(str(tmp_path), {}, sampler, scheds[0], seed=0, resume=False).resume.enabled
    with pytest.raises(ValueError, match="at least one"):
        RunState(str(tmp_path), {}, sampler, [], seed=0)
    with pytest.raises(TypeError, match="set_epoch"):
        RunState(str(tmp_path), {}, object(), scheds[0], seed=0)
