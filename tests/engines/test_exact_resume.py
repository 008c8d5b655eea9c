"""Exact resumption: a run stopped after a checkpoint and resumed ends with the weights of the run never stopped.

Each bundle's pre-training (and one fine-tuning config) runs in-process at tiny demo sizes on CPU three times:
uninterrupted; stopped right after the checkpoint of iteration ``k`` (in the middle of an epoch); and a fresh
workflow resuming from that checkpoint. The final states must be equal bit for bit.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from ignite.engine import Events

from ..bundles.helpers import config_list, run_cli, save_untrained, workflow

pytestmark = pytest.mark.slow  # end-to-end runs through the bundle configs


def _final_state(bundle: str, names: list[str], out: str, stop_at: int | None = None, **override) -> dict:
    """Run ``names`` of ``bundle`` with a checkpoint every iteration; return the final state of every module in its
    checkpoint (model, and loss or discriminator where there is one).
    ``stop_at`` ends the run right after that iteration's checkpoint, as a kill would."""
    wf = workflow(bundle, names, output_dir=out, save_interval=1, save_epoch_level=False, **override)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    if stop_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    wf.run()
    objs = wf.parser.get_parsed_content("train#checkpoint_objects")
    state = {}
    for name, obj in objs.items():  # the model, and a discriminator or a loss with centre buffers where there is one
        if isinstance(obj, torch.nn.Module):
            state.update({f"{name}.{k}": v.detach().clone() for k, v in obj.state_dict().items()})
    state["iteration"] = torch.tensor(trainer.state.iteration)
    wf.finalize()
    return state


def _assert_resume_exact(
    tmp_path, bundle: str, names: list[str], stop_at: int, files: tuple[str, ...] = (), ref: dict | None = None,
    **override,
) -> None:
    """``ref``: the uninterrupted run's final state when it was computed already (then ``files`` must be empty)."""
    if ref is None:
        ref = _final_state(bundle, names, str(tmp_path / "ref"), **override)
    elif files:
        raise ValueError(f"files {files} are compared with the reference run's own folder: pass no ref")
    out = str(tmp_path / "run")
    part = _final_state(bundle, names, out, stop_at=stop_at, **override)
    assert int(part["iteration"]) == stop_at < int(ref["iteration"])
    assert os.path.isfile(os.path.join(out, "models", f"checkpoint_iter={stop_at}.pt"))
    resumed = _final_state(bundle, names, out, **override)
    assert resumed.keys() == ref.keys()
    diff = {k: float((resumed[k].double() - ref[k].double()).abs().max())
            for k in ref if not torch.equal(resumed[k], ref[k])}  # fmt: skip
    assert not diff, f"resumed run differs from the uninterrupted one: {dict(list(diff.items())[:5])}"
    for name in files:  # weights written along the way, e.g. the best model by validation
        a, b = (torch.load(os.path.join(d, "models", name), weights_only=True) for d in (tmp_path / "ref", out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def fratmae_ref(tmp_path_factory, data_root, demo_data) -> dict:
    """The final state of the uninterrupted FratMAE demo pre-training (3 epochs, a checkpoint every iteration) that
    both FratMAE tests compare with, run once: it depends on the configs and the data, not on the output folder."""
    torch.manual_seed(0)
    return _final_state("fratmae_petct", ["train.json", "demo.json"], str(tmp_path_factory.mktemp("fratmae_ref")),
                        **_fratmae_common(data_root, demo_data))  # fmt: skip


def _fratmae_common(data_root, demo_data) -> dict:
    return dict(dataset_dir=demo_data("fratmae_petct"), epochs=3, cache_dir=str(data_root / "petct_cache"))


def test_killed_fratmae_run_resumes_exactly_with_other_worker_count(tmp_path, data_root, demo_data, fratmae_ref):
    """A real process killed with SIGKILL right after its checkpoint of iteration 3 (the middle of epoch 2), restarted
    through the CLI with two data-loader workers, ends with the weights of an uninterrupted run with none."""
    common = _fratmae_common(data_root, demo_data)
    data, ref = common["dataset_dir"], fratmae_ref
    # an override file whose extra handler kills the process after the checkpoint of iteration 3 is written
    kill = {"train#trainer#train_handlers": "$list(@train#handlers) + [type('Kill', (), {'attach': lambda self, e: "
            "e.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=3), lambda _: "
            f"os.kill(os.getpid(), {int(signal.SIGKILL)}))}})()]"}  # fmt: skip
    kill_file = tmp_path / "kill.json"
    kill_file.write_text(json.dumps(kill))
    out = str(tmp_path / "run")
    args = ["--dataset_dir", data, "--output_dir", out, "--epochs", "3", "--cache_dir", common["cache_dir"],
            "--save_interval", "1", "--save_epoch_level", "False"]  # fmt: skip
    files = config_list("fratmae_petct", "train.json", "demo.json")
    first = run_cli(["run", "training", "--config_file", files[:-1] + f",'{kill_file}']", *args], cwd=str(tmp_path))
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(out, "models"))) == ["checkpoint_iter=2.pt", "checkpoint_iter=3.pt"]
    second = run_cli(["run", "training", "--config_file", files, *args, "--num_workers", "2"], cwd=str(tmp_path))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "checkpoint_iter=3.pt" in second.stdout + second.stderr and "resuming from" in second.stdout + second.stderr
    # the restart trained the 3 iterations left on top of the checkpoint, up to the end of epoch 3 (2 per epoch)
    last = torch.load(os.path.join(out, "models", "checkpoint_iter=6.pt"), weights_only=True)
    assert last["trainer"]["iteration"] == 6 and last["trainer"]["epoch_length"] == 2
    final = torch.load(os.path.join(out, "models", "model.pt"), weights_only=True)
    model = {k[len("model."):]: v for k, v in ref.items() if k.startswith("model.")}
    assert final.keys() == model.keys()
    assert all(torch.equal(final[k], model[k]) for k in model), "resumed weights differ from the uninterrupted run's"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_data")


def test_fratmae_pretraining_resumes_exactly(tmp_path, data_root, demo_data, fratmae_ref):
    # 4 cases, batch 2: 2 iterations per epoch; stopped at iteration 3, the middle of epoch 2
    _assert_resume_exact(tmp_path, "fratmae_petct", ["train.json", "demo.json"], 3, ref=fratmae_ref,
                         **_fratmae_common(data_root, demo_data))  # fmt: skip


def test_spad_vit_pretraining_resumes_exactly(tmp_path, data_root, demo_data):
    data = demo_data("spad_vit")
    # the frozen tokenizer only has to be the same in every run: untrained weights of the demo size
    tok = save_untrained("spad_vit", ["train.json", "demo.json"], "tokenizer_def", tmp_path / "tokenizer.pt",
                         dataset_dir=data, output_dir=str(tmp_path / "probe"))  # fmt: skip
    # 12 demo images, batch 2: 6 iterations per epoch; stopped at iteration 4 of 6
    _assert_resume_exact(tmp_path, "spad_vit", ["train.json", "demo.json"], 4, dataset_dir=data, max_steps=6,
                         tokenizer_ckpt=tok, cache_dir=str(data_root / "spad_cache"))


def test_spad_vt_tokenizer_training_resumes_exactly(tmp_path, data_root, demo_data):
    data = demo_data("spad_vit")
    # 6 iterations per epoch; stopped at iteration 4 of 6 (generator and discriminator, both optimizers, the GAN gate)
    names = ["train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"]
    _assert_resume_exact(tmp_path, "spad_vit", names, 4, dataset_dir=data, max_steps=6,
                         cache_dir=str(data_root / "spad_tok_cache"))


def test_panfm_pretraining_resumes_exactly(tmp_path, data_root, demo_data):
    data = demo_data("panfm_panorgan")
    # 48 demo subjects, batch 8: 6 iterations per epoch; stopped at iteration 4 of 6
    _assert_resume_exact(tmp_path, "panfm_panorgan", ["train.json", "demo.json"], 4, dataset_dir=data, max_steps=6,
                         cache_dir=str(data_root / "panfm_cache"))


def test_midol_pretraining_resumes_exactly(tmp_path, data_root, demo_data):
    data = demo_data("midol_multimodal")
    # 40 demo images, batch 8: 5 iterations per epoch; stopped at iteration 7, the middle of epoch 2
    _assert_resume_exact(tmp_path, "midol_multimodal", ["train.json", "demo.json"], 7, dataset_dir=data, epochs=2,
                         cache_dir=str(data_root / "midol_cache"))


def test_midol_classification_finetuning_resumes_exactly(tmp_path, data_root, demo_data):
    data = demo_data("midol_multimodal")
    # the pre-trained weights only have to be the same in every run: untrained pre-training weights of the demo size
    pre = save_untrained("midol_multimodal", ["train.json", "demo.json"], "network_def", tmp_path / "pretrained.pt",
                         dataset_dir=data, output_dir=str(tmp_path / "p"))  # fmt: skip
    # 28 labelled training images, batch 8: 4 iterations per epoch (the last one of 4 images); stopped at iteration 6,
    # the middle of epoch 2; validation and the best-model file after each epoch (the best score is in the checkpoint)
    names = ["finetune_seg.json", "finetune_cls.json", "demo_seg.json", "demo_cls.json"]
    _assert_resume_exact(tmp_path, "midol_multimodal", names, 6, ("model.pt",),
                         dataset_dir=data, epochs=2, val_interval=1, pretrained_checkpoint=pre)
