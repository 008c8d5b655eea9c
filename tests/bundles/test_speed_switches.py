"""The pre-training configs' ``compile`` and ``grad_checkpointing`` switches: the same training as eager.

Each bundle's ``train.json`` + ``demo.json`` runs two iterations in-process, once plain and once with activation
checkpointing (bit-equal weights expected: drop-path draws are replayed) and once with checkpointing and
``torch.compile`` (backend ``eager``: TorchDynamo's graph capture; equal within float tolerance). AOTAutograd
(``aot_eager``) passed the same test for all four bundles by hand, and inductor (the default, minutes of C++ build
on CPU) for Pan-FM's demo: largest weight difference to eager 1.1e-5 after two iterations.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from medfm.utils import speed_switches

from .helpers import save_untrained, workflow

pytestmark = pytest.mark.slow  # end-to-end runs through the bundle configs

BUNDLES = ["fratmae_petct", "spad_vit", "panfm_panorgan", "midol_multimodal"]


def _train_two_steps(bundle: str, data: str, tmp, name: str, **switches) -> dict[str, torch.Tensor]:
    extra = {}
    if bundle == "spad_vit":  # MIM pre-training starts from a tokenizer: untrained weights serve here
        extra["tokenizer_ckpt"] = save_untrained("spad_vit", ["train.json", "demo.json"], "tokenizer_def",
                                                 tmp / "tokenizer.pt")  # fmt: skip
    wf = workflow(bundle, ["train.json", "demo.json"], dataset_dir=data, output_dir=str(tmp / name),
                  cache_dir=str(tmp / "cache"), num_workers=0, **extra, **switches)  # fmt: skip
    wf.initialize()
    trainer = wf.trainer
    trainer.state.max_epochs = 1
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda engine: engine.terminate())
    trainer.run()
    net = wf.parser.get_parsed_content("network")
    wf.finalize()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_switches_train_as_eager(bundle, tmp_path, demo_data):
    data = demo_data(bundle)
    eager = _train_two_steps(bundle, data, tmp_path, "eager")
    ckpt = _train_two_steps(bundle, data, tmp_path, "ckpt", grad_checkpointing=True)
    both = _train_two_steps(bundle, data, tmp_path, "both", grad_checkpointing=True, compile="eager")
    assert eager.keys() == ckpt.keys() == both.keys()
    moved = [k for k in eager if eager[k].is_floating_point()]
    for k in moved:
        assert torch.equal(eager[k], ckpt[k]), f"{bundle}: {k} differs with activation checkpointing"
        assert torch.allclose(eager[k], both[k], rtol=1e-4, atol=1e-5), f"{bundle}: {k} differs when compiled"


def test_speed_switches_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        speed_switches(torch.nn.Linear(2, 2), grad_checkpointing=True)
    with pytest.raises(ValueError, match="compile must be"):
        speed_switches(torch.nn.Linear(2, 2), compile=3)
    net = speed_switches(torch.nn.Linear(2, 2), compile="eager")
    assert list(net.state_dict()) == ["weight", "bias"]  # compiled in place: the checkpoint keys do not change
