import copy
import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from medfm.engines import (
    AtomicCheckpointSaver,
    ResumeFromCheckpoint,
    SpadInputPrepareBatch,
    SpadTokenizerIteration,
    loss_terms,
)
from medfm.losses import SpadVTLoss
from medfm.networks.nets import SpadPatchDiscriminator, SpadVT


def _parts():
    net = SpadVT(channels=(8, 16, 32), num_codes=64, code_dim=32)
    disc = SpadPatchDiscriminator(channels=(8, 16), norm_groups=8)
    return net, disc


def _data(n=2, depth=1, aniso_d=5):
    return [{"image": torch.rand(3, depth, 32, 32), "aniso_d": aniso_d} for _ in range(n)]


def _trainer(net, disc, iteration=None, data=None, max_epochs=1, handlers=None, **it_kwargs):
    if iteration is None:
        iteration = SpadTokenizerIteration(disc, torch.optim.AdamW(disc.parameters(), lr=1e-3), **it_kwargs)
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data or _data(), batch_size=2),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        loss_function=SpadVTLoss(),
        prepare_batch=SpadInputPrepareBatch(),
        iteration_update=iteration,
        train_handlers=handlers,
        decollate=False,
    )


def test_prepare_batch_scales_and_reads_one_aniso_level():
    pb = SpadInputPrepareBatch()
    img = torch.rand(2, 3, 4, 8, 8)
    x, target, args, kwargs = pb({"image": img, "aniso_d": torch.tensor([2, 2])})
    assert torch.allclose(x, 2 * img - 1) and target is x and args == ()
    assert kwargs == {"aniso_d": 2} and isinstance(kwargs["aniso_d"], int)
    assert torch.equal(SpadInputPrepareBatch(scale_to_tokenizer=False)({"image": img, "aniso_d": [1, 1]})[0], img)
    assert SpadInputPrepareBatch(aniso_key=None)({"image": torch.rand(2, 3, 1, 8, 8)})[3] == {"aniso_d": 5}
    with pytest.raises(ValueError, match="mixes aniso_d values \\[1, 2\\]"):
        pb({"image": img, "aniso_d": torch.tensor([1, 2])})
    with pytest.raises(KeyError, match="aniso_d"):
        pb({"image": img})
    with pytest.raises(ValueError, match="\\(N, C, D, H, W\\)"):
        pb({"image": torch.rand(2, 3, 8, 8), "aniso_d": [5, 5]})
    with pytest.raises(ValueError, match="in \\[0, 5\\]"):
        pb({"image": img, "aniso_d": [9, 9]})


def _run_one(state, **it_kwargs):
    """One iteration from the given gate state; returns its terms, the discriminator as it was before the
    iteration and the generator output."""
    net, disc = _parts()
    it = SpadTokenizerIteration(disc, torch.optim.AdamW(disc.parameters(), lr=1e-3), **it_kwargs)
    if state is not None:
        it.load_state_dict(state)
    before = copy.deepcopy(disc)
    trainer = _trainer(net, disc, it)
    trainer.run()
    return trainer.state.output, before, it


@pytest.mark.parametrize(
    "state, enabled",
    [
        (None, False),  # the last disc loss starts at +inf: never on in the first iteration
        ({"disc_loss_ema": 0.5, "last_disc_loss": 0.0}, False),  # EMA above the gate
        ({"disc_loss_ema": 0.0, "last_disc_loss": 0.5}, False),  # max(EMA, last) is what is gated
        ({"disc_loss_ema": 0.01, "last_disc_loss": 0.02}, True),
    ],
)
def test_gan_term_is_gated_by_the_discriminator_loss(state, enabled):
    out, disc_before, it = _run_one(state, disc_loss_ema_init=0.0)
    t = out["terms"]
    base = t["rec"] + 0.03 * t["usage"] + 1.0 * t["entropy"]
    assert t["gan_enabled"] == float(enabled)
    if enabled:
        # the GAN term is -mean D(x_rec) with the discriminator of before the iteration, weighted by 3e-3
        expected_gan = -disc_before(out["pred"], 5).mean().item()
        assert t["gan"] == pytest.approx(expected_gan, rel=1e-4, abs=1e-6)
        assert t["gan"] != 0.0
        assert t["loss"] == pytest.approx(base + 3e-3 * t["gan"], rel=1e-5)
    else:
        assert t["gan"] == 0.0
        assert t["loss"] == pytest.approx(base, rel=1e-5)
    # the discriminator step's hinge loss, from separate forward passes of real and fake
    real, fake = disc_before(out["image"], 5), disc_before(out["pred"], 5)
    expected_d = 0.5 * ((1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean()).item()
    assert t["disc_loss"] == pytest.approx(expected_d, rel=1e-4)
    # the gate state moved by one EMA step of the logged discriminator loss
    ema0 = 0.0 if state is None else state["disc_loss_ema"]
    assert it.disc_loss_ema == pytest.approx(0.9 * ema0 + 0.1 * t["disc_loss"])
    assert it.last_disc_loss == t["disc_loss"] == pytest.approx(t["disc_loss"])
    assert t["disc_loss_ema"] == it.disc_loss_ema


def test_each_step_updates_only_its_own_network():
    net, disc = _parts()
    it = SpadTokenizerIteration(disc, torch.optim.AdamW(disc.parameters(), lr=1e-2))
    it.load_state_dict({"disc_loss_ema": 0.0, "last_disc_loss": 0.0})  # GAN term on: D is in the G graph
    snaps = {}

    def snap(name):
        def handler(engine):
            snaps[name] = (
                [p.detach().clone() for p in net.parameters()],
                [p.detach().clone() for p in disc.parameters()],
            )
            snaps[name + "_dgrads"] = [p.grad for p in disc.parameters()]

        return handler

    trainer = _trainer(net, disc, it)
    trainer.add_event_handler(Events.ITERATION_STARTED, snap("start"))
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, snap("g_backward"))
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, snap("g_step"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, snap("end"))
    trainer.run()
    assert trainer.state.output["terms"]["gan_enabled"] == 1.0

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    assert all(g is None for g in snaps["g_backward_dgrads"])  # no gradient reached D in the generator step
    assert same(snaps["start"][1], snaps["g_step"][1])  # D unchanged by the generator step
    assert not same(snaps["start"][0], snaps["g_step"][0])  # ... which did move G
    assert same(snaps["g_step"][0], snaps["end"][0])  # G unchanged by the discriminator step
    assert not same(snaps["g_step"][1], snaps["end"][1])  # ... which did move D
    assert all(p.requires_grad for p in disc.parameters())  # the freeze is undone


def test_two_iterations_through_supervised_trainer():
    net, disc = _parts()
    data = _data(4, depth=4, aniso_d=2)
    trainer = _trainer(net, disc, data=data, grad_clip_norm=1.0, d_grad_clip_norm=1.0)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(loss_terms(e.state.output)))
    trainer.run()
    assert trainer.state.iteration == 2 and len(seen) == 2
    keys = {"loss", "rec", "perceptual", "usage", "entropy", "gan", "gan_enabled", "disc_loss", "disc_loss_ema",
            "lr", "d_lr"}  # fmt: skip
    for t in seen:
        assert set(t) == keys and all(math.isfinite(v) for v in t.values())
        assert -math.log(64) - 1e-4 <= t["usage"] <= 0.0 and 0.0 <= t["entropy"] <= math.log(64) + 1e-4
    assert seen[1]["disc_loss_ema"] == pytest.approx(0.9 * seen[0]["disc_loss_ema"] + 0.1 * seen[1]["disc_loss"])
    assert seen[0]["disc_loss_ema"] == pytest.approx(0.9 * 0.1 + 0.1 * seen[0]["disc_loss"])
    out = trainer.state.output
    assert out["pred"].shape == out["image"].shape == (2, 3, 4, 32, 32)


def test_bf16_iteration_on_cpu():
    # one iteration only: this torch build's CPU bf16 conv3d weight gradient (oneDNN) is nondeterministic and
    # now and then non-finite for small depth-2 inputs, so a second iteration's numbers are not testable here;
    # the first iteration's terms come from forward passes before any update
    net, disc = _parts()
    it = SpadTokenizerIteration(disc, torch.optim.AdamW(disc.parameters(), lr=1e-3), bf16=True)
    it.load_state_dict({"disc_loss_ema": 0.0, "last_disc_loss": 0.0})
    trainer = _trainer(net, disc, it, data=_data(2, depth=4, aniso_d=2))
    trainer.run()
    t = trainer.state.output["terms"]
    assert all(math.isfinite(v) for v in t.values()) and t["gan_enabled"] == 1.0
    assert t["loss"] == pytest.approx(t["rec"] + 0.03 * t["usage"] + t["entropy"] + 3e-3 * t["gan"], rel=1e-4)
    assert trainer.state.output["pred"].dtype == torch.bfloat16


def test_gate_state_is_saved_and_resumed_with_the_checkpoint(tmp_path):
    net, disc = _parts()
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    it = SpadTokenizerIteration(disc, d_opt)
    trainer = _trainer(net, disc, it, data=_data(2), max_epochs=2)
    save = {"model": net, "optimizer": trainer.optimizer, "discriminator": disc, "d_optimizer": d_opt, "gan_gate": it}
    AtomicCheckpointSaver(str(tmp_path), save, save_interval=2, epoch_level=False).attach(trainer)
    trainer.run()
    saved = it.state_dict()
    assert math.isfinite(saved["last_disc_loss"]) and saved["disc_loss_ema"] != 0.1

    net2, disc2 = _parts()
    d_opt2 = torch.optim.AdamW(disc2.parameters(), lr=1e-3)
    it2 = SpadTokenizerIteration(disc2, d_opt2)
    trainer2 = _trainer(net2, disc2, it2, data=_data(2), max_epochs=3)
    load = {
        "model": net2,
        "optimizer": trainer2.optimizer,
        "discriminator": disc2,
        "d_optimizer": d_opt2,
        "gan_gate": it2,
    }
    ResumeFromCheckpoint(str(tmp_path), load).attach(trainer2)
    at_start = {}

    def record(engine):
        at_start.setdefault("gate", it2.state_dict())
        at_start.setdefault("disc", copy.deepcopy(disc2.state_dict()))

    trainer2.add_event_handler(Events.ITERATION_STARTED, record)
    trainer2.run()
    assert at_start["gate"] == saved
    assert all(torch.equal(a, at_start["disc"][k]) for k, a in disc.state_dict().items())
    assert trainer2.state.iteration == 3


def test_ill_arguments():
    _, disc = _parts()
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="disc_loss_momentum"):
        SpadTokenizerIteration(disc, opt, disc_loss_momentum=1.0)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        SpadTokenizerIteration(disc, opt, grad_clip_norm=0.0)
    with pytest.raises(KeyError, match="last_disc_loss"):
        SpadTokenizerIteration(disc, opt).load_state_dict({"disc_loss_ema": 0.1})
