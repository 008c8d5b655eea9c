"""The teacher-student skeleton on a tiny linear teacher/student, independent of Pan-FM and M-IDoL: step order,
schedules, clipping and the EMA update against their closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medfm.engines import TeacherStudentIteration
from medfm.networks.blocks.ema import EMATeacherPair

CALLS: list = []


class Pair(EMATeacherPair):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Linear(3, 2)
        self.init_teacher()
        with torch.no_grad():
            for p in self.teacher.parameters():
                p.add_(0.5)  # teacher != student, so the loss has a gradient and the EMA moves the teacher

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.student(x)}

    @torch.no_grad()
    def forward_teacher(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.teacher(x)}

    def update_teacher(self, momentum: float) -> None:
        CALLS.append("ema")
        super().update_teacher(momentum)


class Loss:
    def forward_terms(self, student, teacher, teacher_temp):
        CALLS.append("loss")
        mse = ((student["out"] - teacher["out"] / teacher_temp) ** 2).mean()
        return {"loss": 2.0 * mse, "mse": mse}


class Toy(TeacherStudentIteration):
    def unpack(self, engine, batch, model):
        return {"x": batch[0]}

    def forward_teacher(self, model, inputs):
        CALLS.append("teacher")
        return model.forward_teacher(inputs["x"])

    def after_teacher(self, inputs, teacher):
        CALLS.append("after_teacher")

    def forward_student(self, engine, model, inputs, teacher):
        CALLS.append("student")
        return engine.network(inputs["x"])

    def before_clip(self, engine, model):
        CALLS.append("before_clip")

    def extra_terms(self, engine, inputs, teacher, sched):
        return {"batch": float(inputs["x"].shape[0])}

    def outputs(self, inputs, student, teacher):
        return {Keys.IMAGE: inputs["x"], Keys.LABEL: None, Keys.PRED: student["out"].detach(), "extra": 1}


class LoggedSGD(torch.optim.SGD):
    def zero_grad(self, set_to_none: bool = True) -> None:
        CALLS.append("zero_grad")
        super().zero_grad(set_to_none)

    def step(self, closure=None):
        CALLS.append("step")
        return super().step(closure)


def _run(iteration, data, lr=0.1):
    model = Pair()
    start = copy.deepcopy(model)
    optimizer = LoggedSGD(model.student.parameters(), lr=lr)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=model,
        optimizer=optimizer, loss_function=Loss(), iteration_update=iteration, decollate=False,
    )  # fmt: skip
    for event in ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"):
        trainer.add_event_handler(getattr(IterationEvents, event), lambda _e, name=event: CALLS.append(name))
    trainer.run()
    return model, start, trainer


def _batches(n, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(b, 3, generator=g), "label": torch.zeros(b)} for _ in range(n)]


def test_step_order():
    CALLS.clear()
    _run(Toy(0.9, (0.04, 0.07), 2, total_steps=5, weight_decay=None, grad_clip_norm=1.0), _batches(1))
    assert CALLS == [
        "teacher", "after_teacher", "zero_grad", "student", "FORWARD_COMPLETED", "loss", "LOSS_COMPLETED",
        "BACKWARD_COMPLETED", "before_clip", "step", "ema", "MODEL_COMPLETED",
    ]  # fmt: skip


def _expected_step(student, teacher, x, lr, momentum, teacher_temp):
    """One plain SGD step of the student on the loss, then the EMA, written out."""
    s = [p.detach().clone().requires_grad_(True) for p in student.parameters()]
    t = [p.detach().clone() for p in teacher.parameters()]
    loss = 2.0 * ((x @ s[0].T + s[1] - (x @ t[0].T + t[1]) / teacher_temp) ** 2).mean()
    grads = torch.autograd.grad(loss, s)
    s_new = [p.detach() - lr * g for p, g in zip(s, grads)]
    t_new = [momentum * tp + (1 - momentum) * sp for tp, sp in zip(t, s_new)]
    return s_new, t_new, float(loss.detach())


def test_two_steps_equal_the_closed_form_of_sgd_then_ema_with_the_schedules():
    total, warmup, m0, temps, lr = 4, 2, 0.9, (0.04, 0.07), 0.1
    data = _batches(2)
    it = Toy(m0, temps, warmup, total_steps=total, weight_decay=None, grad_clip_norm=None)
    model, start, trainer = _run(it, data, lr=lr)
    student, teacher = start.student, start.teacher
    for step, batch in enumerate(data):
        momentum = 1.0 - (1.0 - m0) * (math.cos(math.pi * step / total) + 1) / 2  # DINO's cosine to 1
        temp = temps[0] + (temps[1] - temps[0]) * step / warmup  # linear warm-up
        s_new, t_new, loss = _expected_step(student, teacher, batch["image"], lr, momentum, temp)
        with torch.no_grad():
            for p, v in zip(student.parameters(), s_new):
                p.copy_(v)
            for p, v in zip(teacher.parameters(), t_new):
                p.copy_(v)
    for got, want in zip([*model.student.parameters(), *model.teacher.parameters()],
                         [*student.parameters(), *teacher.parameters()]):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    terms = trainer.state.output["terms"]
    assert terms["momentum"] == pytest.approx(momentum) and terms["teacher_temp"] == pytest.approx(temp)
    assert terms["loss"] == pytest.approx(loss, rel=1e-5) and terms["mse"] == pytest.approx(loss / 2, rel=1e-5)
    assert terms["lr"] == lr and terms["batch"] == 4.0 and "weight_decay" not in terms
    out = trainer.state.output
    assert out[Keys.LOSS].requires_grad is False and out["extra"] == 1 and out[Keys.LABEL] is None


def test_weight_decay_schedule_and_clipping_reach_the_optimizer():
    norms = []

    total = 3
    it = Toy(0.99, (0.04, 0.04), 0, total_steps=total, weight_decay=(0.04, 0.4), grad_clip_norm=1e-3)
    model = Pair()
    optimizer = LoggedSGD(model.student.parameters(), lr=0.1, weight_decay=0.01)
    orig_step = optimizer.step

    def step(closure=None):
        norms.append(float(torch.cat([p.grad.flatten() for p in model.student.parameters()]).norm()))
        norms.append(optimizer.param_groups[0]["weight_decay"])
        return orig_step(closure)

    optimizer.step = step
    SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(2), network=model, optimizer=optimizer,
        loss_function=Loss(), iteration_update=it, decollate=False,
    ).run()  # fmt: skip
    grad0, wd0, grad1, wd1 = norms
    assert grad0 <= 1e-3 * (1 + 1e-4) and grad1 <= 1e-3 * (1 + 1e-4)
    assert wd0 == pytest.approx(0.04)
    assert wd1 == pytest.approx(0.4 - (0.4 - 0.04) * (math.cos(math.pi / total) + 1) / 2)


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum_start": 1.5},
        {"teacher_temp": (0.0, 0.04)},
        {"warmup_teacher_temp_steps": -1},
        {"total_steps": 0},
        {"weight_decay": (0.04, -1.0)},
        {"grad_clip_norm": 0.0},
    ],
)
def test_ill_arg(kw):
    args = {"momentum_start": 0.99, "teacher_temp": (0.04, 0.07), "warmup_teacher_temp_steps": 0} | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        Toy(**args)


def test_a_step_without_tensors_is_refused():
    class Empty(Toy):
        def unpack(self, engine, batch, model):
            return {"x": None}

    with pytest.raises(ValueError, match="no tensor"):
        _run(Empty(0.9, (0.04, 0.04), 0), _batches(1))


def test_every_engines_module_is_exported_by_the_package():
    import importlib
    import pkgutil

    import medfm.engines as engines

    for info in pkgutil.iter_modules(engines.__path__):
        names = getattr(importlib.import_module(f"medfm.engines.{info.name}"), "__all__", [])
        assert set(names) <= set(engines.__all__), info.name


def test_bf16_autocasts_the_two_forwards_and_nothing_else():
    seen = {}

    class Watch(Toy):
        def forward_teacher(self, model, inputs):
            seen["teacher"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            return super().forward_teacher(model, inputs)

        def after_teacher(self, inputs, teacher):
            seen["after_teacher"] = torch.is_autocast_enabled("cpu")

        def forward_student(self, engine, model, inputs, teacher):
            seen["student"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            return super().forward_student(engine, model, inputs, teacher)

        def before_clip(self, engine, model):
            seen["before_clip"] = torch.is_autocast_enabled("cpu")

    class WatchLoss(Loss):
        def forward_terms(self, student, teacher, teacher_temp):
            seen["loss"] = torch.is_autocast_enabled("cpu")
            return super().forward_terms(student, teacher, teacher_temp)

    for bf16 in (True, False):
        model = Pair()
        SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=_batches(1), network=model,
            optimizer=torch.optim.SGD(model.student.parameters(), lr=0.1), loss_function=WatchLoss(),
            iteration_update=Watch(0.9, (0.04, 0.04), 0, bf16=bf16), decollate=False,
        ).run()  # fmt: skip
        assert seen == {"teacher": bf16, "after_teacher": False, "student": bf16, "before_clip": False, "loss": False}
