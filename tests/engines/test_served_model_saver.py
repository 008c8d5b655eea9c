import copy

import torch
from ignite.engine import Events
from ignite.metrics import MeanSquaredError
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import from_engine
from torch import nn
from torch.utils.data import DataLoader

from medfm.engines import ServedModelSaver


def _items(w: torch.Tensor, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 2, generator=g)
    return [{"image": x, "label": (x @ w)[None]} for x in xs]


def _run(tmp_path, val_items: list[dict]):
    """Train a linear map toward w_train while validating against w_val, starting at w_val: validation only
    gets worse, so the best validation is the first."""
    w_train, w_val = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 1.0])
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(w_val[None])
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=4,
        train_data_loader=DataLoader(_items(w_train, 8, 0), batch_size=4),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=nn.MSELoss(),
    )
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(val_items, batch_size=2),
        network=net,
        key_val_metric={"mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
    )
    seen = []
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: seen.append((e.state.metrics["mse"], copy.deepcopy(net.state_dict())))
    )
    torch.save({"weight": torch.full((1, 2), 7.0)}, tmp_path / "model.pt")  # a marker: the served file before
    ServedModelSaver(evaluator, net, str(tmp_path), "mse", higher_is_better=False).attach(trainer)
    trainer.run()
    return net, seen, torch.load(tmp_path / "model.pt", weights_only=True)


def test_without_validation_data_the_final_weights_are_saved(tmp_path):
    net, seen, saved = _run(tmp_path, [])
    assert seen == []
    torch.testing.assert_close(saved["weight"], net.weight.detach())


def test_with_validation_data_training_that_never_beats_the_served_weights_leaves_the_file(tmp_path):
    net, seen, saved = _run(tmp_path, _items(torch.tensor([-1.0, 1.0]), 4, 1))
    assert len(seen) == 5  # the served (starting) weights, then one validation per epoch
    assert min(range(5), key=lambda i: seen[i][0]) == 0  # validation only gets worse as training moves away
    torch.testing.assert_close(saved["weight"], torch.full((1, 2), 7.0))  # not replaced by worse weights


def test_with_validation_data_a_better_epoch_replaces_the_served_weights(tmp_path):
    """Served weights far from w_val: training toward w_val improves on them, and the best epoch is written."""
    w = torch.tensor([2.0, -1.0])
    net, seen, saved = _run(tmp_path, _items(w, 4, 1))
    best = min(range(1, 5), key=lambda i: seen[i][0])
    assert seen[best][0] < seen[0][0]
    torch.testing.assert_close(saved["weight"], seen[best][1]["weight"])


def test_an_undefined_score_writes_nothing_and_does_not_block_a_later_one(tmp_path):
    """NaN (e.g. Dice on validation cases without a lesion) is no score: nothing is written for it, and a later
    defined score is still saved (NaN compares False with everything)."""
    from types import SimpleNamespace

    from medfm.engines import BestModelSaver

    net = nn.Linear(2, 1, bias=False)
    saver = BestModelSaver(str(tmp_path), net, "dice")
    saver(SimpleNamespace(state=SimpleNamespace(metrics={"dice": float("nan")})))
    assert not (tmp_path / "model.pt").exists() and saver.best is None
    saver(SimpleNamespace(state=SimpleNamespace(metrics={"dice": 0.25})))
    assert saver.best == 0.25 and (tmp_path / "model.pt").exists()
