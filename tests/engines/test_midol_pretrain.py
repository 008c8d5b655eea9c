import copy
import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from torch import nn

from medfm.engines import MIDoLPretrainIteration, MIDoLPretrainPrepareBatch, cosine_schedule, loss_terms
from medfm.losses import MIDoLLoss
from medfm.networks.nets.midol import MIDoLSelfDistill

from ..losses.test_routing import _naive_floored_sinkhorn

KEYS = ("global_0", "global_1", "local_0", "local_1")


def _model(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return MIDoLSelfDistill(backbone, 6, num_experts=3, top_k=1, out_dim=16, hidden_dim=8)


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.rand(3, *((12, 12) if k.startswith("global") else (6, 6)), generator=g) for k in KEYS}
        for _ in range(n)
    ]


def _optimizer(model):
    decay = [p for n, p in model.student.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.student.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )


def _trainer(model, data=None, **kw):
    opt = _optimizer(model)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(data or _data(), batch_size=2),
        network=model,
        optimizer=opt,
        loss_function=MIDoLLoss(out_dim=16),
        prepare_batch=MIDoLPretrainPrepareBatch(KEYS),
        iteration_update=MIDoLPretrainIteration(**kw),
    )
    return trainer, opt


def test_two_iterations_through_supervised_trainer():
    model = _model()
    student0 = copy.deepcopy(model.student.state_dict())
    trainer, opt = _trainer(model)  # 2 iterations; last layer frozen for one epoch by default
    logged = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(loss_terms(e.state.output)))
    trainer.run()
    assert trainer.state.iteration == 2 and len(logged) == 2
    for terms in logged:
        assert {"loss", "cst", "route", "momentum", "weight_decay", "lr", "teacher_temp"} <= set(terms)
        assert all(isinstance(v, float) and math.isfinite(v) for v in terms.values())
        assert sum(terms[f"expert_{e}"] for e in range(3)) == pytest.approx(1.0)
        assert terms["loss"] == pytest.approx(terms["cst"] + terms["route"], rel=1e-5)
        assert sum(terms[f"target_{e}"] for e in range(3)) == pytest.approx(1.0)
        assert sum(terms[f"target_mass_{e}"] for e in range(3)) == pytest.approx(1.0)
    # cosine over 2 steps: step 1 is half way (closed form end - (end - start) * (1 + cos(pi / 2)) / 2)
    assert logged[0]["momentum"] == pytest.approx(0.996) and logged[1]["momentum"] == pytest.approx(0.998)
    assert logged[0]["weight_decay"] == pytest.approx(0.04) and logged[1]["weight_decay"] == pytest.approx(0.22)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.22) and opt.param_groups[1]["weight_decay"] == 0.0
    state = model.student.state_dict()
    torch.testing.assert_close(state["head.last_layer.last_v"], student0["head.last_layer.last_v"], rtol=0, atol=0)
    assert not torch.equal(state["backbone.0.weight"], student0["backbone.0.weight"])
    assert not torch.equal(state["head.moe.gate.weight"], student0["head.moe.gate.weight"])
    assert all(p.grad is None for p in model.teacher.parameters())


def test_last_layer_trains_when_not_frozen():
    model = _model()
    v0 = model.student.head.last_layer.last_v.detach().clone()
    trainer, _ = _trainer(model, freeze_last_layer_steps=0)
    trainer.run()
    assert not torch.equal(model.student.head.last_layer.last_v, v0)


def test_teacher_moves_only_by_ema():
    model = _model()
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer, _ = _trainer(model, data=_data(2), total_steps=10)  # one iteration
    trainer.run()
    m = cosine_schedule(0, 10, 0.996, 1.0)
    assert m == pytest.approx(0.996)
    student = model.student.state_dict()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, m * teacher0[k] + (1 - m) * student[k])
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())


def test_prepare_batch_list_key_and_errors():
    batch = {"crops": [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)]}
    crops, label, args, kwargs = MIDoLPretrainPrepareBatch(list_key="crops")(batch)
    assert len(crops) == 3 and label is None and args == () and kwargs == {}
    torch.testing.assert_close(crops[2], batch["crops"][2])
    with pytest.raises(KeyError, match="local_1"):
        MIDoLPretrainPrepareBatch(KEYS)({k: torch.rand(2, 3, 4, 4) for k in KEYS[:3]})
    bad = {k: torch.rand(2, 3, 4, 4) for k in KEYS}
    bad["local_0"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="local_0"):
        MIDoLPretrainPrepareBatch(KEYS)(bad)
    with pytest.raises(ValueError, match="batch sizes"):
        MIDoLPretrainPrepareBatch(list_key="c")({"c": [torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4)]})


@pytest.mark.parametrize(
    "kw", [{"num_global": 0}, {"momentum_start": 1.5}, {"grad_clip_norm": 0.0}, {"teacher_temp": (0.0, 0.04)}]
)
def test_ill_arg(kw):
    with pytest.raises(ValueError):
        MIDoLPretrainIteration(**kw)


def test_bf16_step_runs():
    model = _model()
    trainer, _ = _trainer(model, data=_data(2), bf16=True)
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


def test_target_shares_are_the_sinkhorn_targets_top_expert_and_mass():
    # 2 global crops of 4 images, 3 experts; the targets by the floored float64 loops of the reference
    g = torch.Generator().manual_seed(3)
    router = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)]
    router[1][:, 2] += 5.0  # every image of crop 1 prefers expert 2
    shares = MIDoLPretrainIteration.target_shares(MIDoLLoss(out_dim=4), router, 0.04)
    q = [_naive_floored_sinkhorn(r.numpy(), 0.04, 0.05, 3) for r in router]
    top = [0, 0, 0]
    for crop in q:
        for row in crop:
            top[int(row.argmax())] += 1
    mass = sum(crop.sum(0) for crop in q)
    for e in range(3):
        assert shares[f"target_{e}"] == pytest.approx(top[e] / 8)
        assert shares[f"target_mass_{e}"] == pytest.approx(mass[e] / mass.sum(), abs=1e-5)
    assert MIDoLPretrainIteration.target_shares(nn.MSELoss(), router, 0.04) == {}
