import copy
import glob
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from medfm.engines import (
    AtomicCheckpointSaver,
    OrganAttentionPlot,
    PanFMPretrainIteration,
    PanFMPretrainPrepareBatch,
    ResumeFromCheckpoint,
    attention_bar_image,
    loss_terms,
)
from medfm.losses import PanFMLoss, momentum_schedule
from medfm.networks.nets import PANFM_ORGANS, PanFMSelfDistill

ORG = ("brain", "heart", "liver")
SHAPES = {"brain": (8, 8, 8), "heart": (16, 8, 8), "liver": (8, 8, 8)}


def _model():
    return PanFMSelfDistill(
        ORG, SHAPES, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, drop_path_rate=0.1,
        out_dim=32, patch_out_dim=24, head_hidden_dim=24, head_bottleneck_dim=8,
    )  # fmt: skip


def _data(n=4, seed=0):
    """Items as the data side writes them: every organ of PANFM_ORGANS, zeros where missing, labels."""
    g = torch.Generator().manual_seed(seed)
    shapes = {o: SHAPES.get(o, (4, 4, 4)) for o in PANFM_ORGANS}
    items = []
    for i in range(n):
        present = torch.rand(len(PANFM_ORGANS), generator=g) < 0.6
        present[PANFM_ORGANS.index("brain") if i % 2 else PANFM_ORGANS.index("liver")] = True
        item = {"present": present, "labels": torch.rand(3, generator=g).round()}
        for j, o in enumerate(PANFM_ORGANS):
            img = torch.rand(1, *shapes[o], generator=g)
            item[f"image_{o}"] = img if present[j] else torch.zeros_like(img)
        items.append(item)
    return items


def _trainer(model, masking="sgm", data=None, max_epochs=1, organs=ORG, **kw):
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data or _data(), batch_size=2),
        network=model,
        optimizer=torch.optim.AdamW(model.student.parameters(), lr=1e-3),
        loss_function=PanFMLoss(32, 24, patch_weight=1.0),
        prepare_batch=PanFMPretrainPrepareBatch(ORG),
        iteration_update=PanFMPretrainIteration(organs, masking=masking, **kw),
        decollate=False,
    )


def test_prepare_batch_selects_columns_and_skips_absent_organs():
    present = torch.zeros(2, 7, dtype=torch.bool)
    present[0, PANFM_ORGANS.index("liver")] = True
    present[1, PANFM_ORGANS.index("brain")] = True
    present[:, PANFM_ORGANS.index("kidney")] = True
    batch = {"present": present, "image_brain": torch.rand(2, 1, 8, 8, 8), "image_liver": torch.rand(2, 1, 8, 8, 8)}
    images, labels, args, kwargs = PanFMPretrainPrepareBatch(ORG)(batch)
    assert set(images) == {"brain", "liver"} and labels is None and args == ()  # heart absent: not read
    assert kwargs["present"].tolist() == [[False, False, True], [True, False, False]]
    assert torch.equal(images["liver"], batch["image_liver"])
    as_lists = dict(batch, present=list(present.t()))  # what collating per-item Python lists gives
    assert torch.equal(PanFMPretrainPrepareBatch(ORG)(as_lists)[3]["present"], kwargs["present"])
    batch["labels"] = torch.tensor([[1, 0], [0, 1]])
    assert PanFMPretrainPrepareBatch(ORG)(batch)[1].dtype == torch.float32
    with pytest.raises(KeyError, match="image_brain"):
        PanFMPretrainPrepareBatch(ORG)({"present": present, "image_liver": batch["image_liver"]})
    with pytest.raises(KeyError, match="present"):
        PanFMPretrainPrepareBatch(ORG)({"image_brain": batch["image_brain"]})
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        PanFMPretrainPrepareBatch(ORG)({"present": present[:, :3]})
    with pytest.raises(ValueError, match="lung"):
        PanFMPretrainPrepareBatch(("brain", "lung"))


@pytest.mark.parametrize("masking", ["random", "sgm", "mix"])
def test_two_iterations_through_supervised_trainer(masking):
    model = _model()
    trainer = _trainer(model, masking)
    seen, snaps = [], {}

    def start(engine):
        snaps["teacher"] = copy.deepcopy(model.teacher.state_dict())

    def backward(engine):
        snaps["teacher_grads"] = [p.grad for p in model.teacher.parameters()]
        snaps["student_grads"] = [p.grad for p in model.student.parameters()]

    def end(engine):
        out = engine.state.output
        seen.append(loss_terms(out))
        m = out["terms"]["momentum"]
        student = dict(model.student.named_parameters())
        for name, p in model.teacher.named_parameters():  # teacher moved by one EMA step, nothing else
            expected = m * snaps["teacher"][name] + (1 - m) * student[name].detach()
            assert torch.allclose(p, expected, atol=1e-6), name
        assert not torch.equal(out["pred"]["student_cls"], out["pred"]["teacher_cls"])
        assert all(g is None for g in snaps["teacher_grads"])
        assert any(g is not None for g in snaps["student_grads"])
        assert not (out["organ_mask"] & ~out["present"]).any()
        assert (out["organ_mask"].sum(1) < out["present"].sum(1)).all()
        assert torch.allclose(out["organ_attention"].sum(1), torch.ones(2), atol=1e-5)
        assert (out["organ_attention"][~out["present"]] == 0).all()

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, backward)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, end)
    trainer.run()
    assert trainer.state.iteration == 2 and len(seen) == 2
    keys = {"loss", "cls", "patch", "teacher_temp", "momentum", "weight_decay", "masked_fraction", "lr"}
    keys |= {f"attn_{o}" for o in ORG}
    for t in seen:
        assert set(t) == keys and all(math.isfinite(v) for v in t.values())
        assert t["loss"] == pytest.approx(t["cls"] + t["patch"], rel=1e-5)
        assert 0.0 <= t["masked_fraction"] < 1.0
        assert sum(t[f"attn_{o}"] for o in ORG) == pytest.approx(1.0, abs=1e-5)
    # total steps = 2 (1 epoch x 2 iterations); teacher-temperature warm-up round(0.3 * 2) = 1 step
    assert [t["momentum"] for t in seen] == pytest.approx([0.992, momentum_schedule(1, 2)])
    assert [t["teacher_temp"] for t in seen] == pytest.approx([0.04, 0.07])
    assert not model.teacher.training


def test_masked_tokens_feed_the_patch_loss():
    model = _model()
    trainer = _trainer(model, "random", ratio_range=(0.5, 0.5), grad_clip_norm=None)
    trainer.run()
    out = trainer.state.output
    masked_organs = int(out["organ_mask"].sum())
    assert masked_organs > 0 and out["terms"]["patch"] > 0
    # masking nothing removes the patch term's signal: ratio 0 -> no masked organ -> patch term 0
    trainer = _trainer(_model(), "random", ratio_range=(0.0, 0.0))
    trainer.run()
    assert trainer.state.output["terms"]["patch"] == 0.0 and trainer.state.output["terms"]["masked_fraction"] == 0


def test_bf16_iteration_on_cpu():
    trainer = _trainer(_model(), "mix", data=_data(2), bf16=True)
    trainer.run()
    t = trainer.state.output["terms"]
    assert all(math.isfinite(v) for v in t.values())


def test_resume_restores_teacher_and_centres(tmp_path):
    model = _model()
    trainer = _trainer(model, "sgm", max_epochs=1)
    save = {"model": model, "optimizer": trainer.optimizer, "loss": trainer.loss_function}
    AtomicCheckpointSaver(str(tmp_path), save, save_interval=2, epoch_level=False).attach(trainer)
    trainer.run()
    saved_teacher = copy.deepcopy(model.teacher.state_dict())
    saved_center = trainer.loss_function.cls_loss.center.clone()
    assert saved_center.abs().sum() > 0

    model2 = _model()
    trainer2 = _trainer(model2, "sgm", max_epochs=2)
    ResumeFromCheckpoint(str(tmp_path), {"model": model2, "optimizer": trainer2.optimizer,
                                         "loss": trainer2.loss_function}).attach(trainer2)  # fmt: skip
    at_start = {}

    def record(engine):
        at_start.setdefault("teacher", copy.deepcopy(model2.teacher.state_dict()))
        at_start.setdefault("center", trainer2.loss_function.cls_loss.center.clone())
        at_start.setdefault("iteration", engine.state.iteration)

    trainer2.add_event_handler(Events.ITERATION_STARTED, record)
    trainer2.run()
    assert at_start["iteration"] == 3
    assert all(torch.equal(v, at_start["teacher"][k]) for k, v in saved_teacher.items())
    assert torch.equal(at_start["center"], saved_center)


def test_attention_plot_handler_writes_running_share(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    trainer = _trainer(model, "sgm", data=_data(6))
    plot = OrganAttentionPlot(str(tmp_path), ORG, every=2)
    shares = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: shares.append(e.state.output["organ_attention"]))
    plot.attach(trainer)
    trainer.run()  # 3 iterations: one plot, at iteration 2, of the mean over iterations 1 and 2
    expected = torch.cat(shares[:2]).double().mean(0)
    assert plot.last_share == pytest.approx(expected.tolist(), abs=1e-6)
    assert plot.running_share() == pytest.approx(shares[2].double().mean(0).tolist(), abs=1e-6)  # new window
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    acc = EventAccumulator(files[0])
    acc.Reload()
    assert acc.Tags()["images"] == ["organ_attention"]
    assert [e.step for e in acc.Images("organ_attention")] == [2]


def test_attention_bar_image_heights():
    img = attention_bar_image([0.5, 0.25, 0.25], ["brain", "heart", "liver"], plot_height=100, bar_width=40)
    assert img.dtype == np.uint8 and img.ndim == 3
    white = (img == 255).all(-1)
    heights = []
    for i in range(3):
        col = 8 + i * 48 + 20  # middle column of bar i (gap 8, bar 40)
        colored = ~white[:, col] & (img[:, col] != 0).any(-1)  # neither background nor text
        heights.append(int(colored[16:116].sum()))
    assert heights[0] == 100 and abs(heights[1] - 50) <= 1 and abs(heights[2] - 50) <= 1
    with pytest.raises(ValueError, match="one label per share"):
        attention_bar_image([0.5], ["a", "b"])


def test_ill_arguments_and_organ_mismatch():
    with pytest.raises(ValueError, match="masking"):
        PanFMPretrainIteration(ORG, masking="attmask")
    with pytest.raises(ValueError, match="ratio_range"):
        PanFMPretrainIteration(ORG, ratio_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="grad_clip_norm"):
        PanFMPretrainIteration(ORG, grad_clip_norm=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        PanFMPretrainIteration(ORG, teacher_temp=(0.0, 0.07))
    trainer = _trainer(_model(), organs=("brain", "liver", "heart"))
    with pytest.raises(ValueError, match="differ from the network"):
        trainer.run()


def test_default_masking_is_the_bundle_default_mix():
    import inspect
    import json
    from pathlib import Path

    train = Path(__file__).resolve().parents[2] / "bundles" / "panfm_panorgan" / "configs" / "train.json"
    bundle_default = json.loads(train.read_text())["masking"]
    assert bundle_default == "mix"
    assert inspect.signature(PanFMPretrainIteration).parameters["masking"].default == bundle_default
    assert PanFMPretrainIteration().masking == bundle_default


def test_patch_centre_follows_every_teacher_token_not_only_the_masked_ones():
    model = _model()
    trainer = _trainer(model, "random", data=_data(2), ratio_range=(0.5, 0.5))
    seen = {}

    def forward_done(engine):  # the teacher is not updated yet: recompute its patch logits of every token
        images, _, _, kw = engine.prepare_batch(engine.state.batch, engine.state.device)
        t = model.forward_teacher(images, kw["present"])
        per_image = [model.teacher.project_patches(t["tokens"][b][t["valid"][b]]).mean(0) for b in range(2)]
        seen["expected"] = 0.1 * (per_image[0] + per_image[1]) / 2  # centre 0 before, momentum 0.9
        seen["masked_only"] = 0.1 * model.teacher_patch_logits(t["tokens"], engine.state.output_masked).mean(0)

    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, forward_done)
    original = model.forward_student

    def forward_student(*args, **kw):
        out = original(*args, **kw)
        trainer.state.output_masked = out["masked"]
        return out

    model.forward_student = forward_student
    trainer.run()
    center = trainer.loss_function.patch_loss.center[0]
    assert int(trainer.state.output["organ_mask"].sum()) > 0
    assert torch.allclose(center, seen["expected"], atol=1e-5)
    assert not torch.allclose(center, seen["masked_only"], atol=1e-4)


def test_weight_decay_follows_the_cosine_schedule_on_decaying_groups_only():
    from medfm.utils import weight_decay_groups

    model = _model()
    trainer = _trainer(model, "random", data=_data(6), max_epochs=1)  # 3 iterations
    trainer.optimizer = torch.optim.AdamW(weight_decay_groups(model.student, 0.04), lr=1e-3, weight_decay=0.04)
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append(([g["weight_decay"] for g in e.optimizer.param_groups], e.state.output["terms"])),
    )
    trainer.run()
    # DINO's cosine: wd(t) = 0.4 - (0.4 - 0.04) * (1 + cos(pi t / T)) / 2, T = 3 steps
    expected = [0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    assert [groups[0] for groups, _ in seen] == pytest.approx(expected)
    assert [terms["weight_decay"] for _, terms in seen] == pytest.approx(expected)
    assert all(groups[1] == 0.0 for groups, _ in seen)  # biases, norms, tokens never decay
    # the schedule switched off: the optimizer's value stays
    trainer = _trainer(_model(), "random", data=_data(4), weight_decay=None)
    trainer.run()
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert "weight_decay" not in trainer.state.output["terms"]


def test_train_config_scales_the_learning_rate_with_the_total_batch(monkeypatch):
    from pathlib import Path

    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[2] / "bundles" / "panfm_panorgan" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    assert parser.get_parsed_content("learning_rate") == pytest.approx(5e-4 * 16 / 256)  # DINO: base * batch / 256
    assert tuple(parser.get_parsed_content("train#iteration#weight_decay")) == (0.04, 0.4)
    import medfm.utils

    monkeypatch.setattr(medfm.utils, "get_world_size", lambda *a, **k: 8)  # what multi_gpu_train.json reads
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    parser["batch_size"] = 32
    assert parser.get_parsed_content("world_size") == 8
    assert parser.get_parsed_content("learning_rate") == pytest.approx(5e-4 * 32 * 8 / 256)
