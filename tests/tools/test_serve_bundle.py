"""tools/serve_bundle.py: the folder MONAI Label serves, and its train.json run without MONAI Label."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medfm.data import export_petct_studies, generate_synthetic_petct
from medfm.utils import SERVED, build_served_bundle, merged_config

from ..bundles.helpers import REPO, captured_logs

B = os.path.join(REPO, "bundles", "fratmae_petct")


def _demo_weights(bundle: str, path) -> dict:
    spec = SERVED[os.path.basename(bundle)]["segmentation"]
    config = merged_config([os.path.join(bundle, "configs", f) for f in spec.inference_files(demo=True)])
    torch.manual_seed(0)
    state = ConfigParser(config).get_parsed_content("network_def").state_dict()
    torch.save(state, path)
    return state


def _read_config(name: str) -> dict:
    with open(os.path.join(B, "configs", name)) as f:
        return json.load(f)


def _lookup(config: dict, path: str):
    node = config
    for part in path.split("#"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    state = _demo_weights(B, root / "w.pt")
    out = build_served_bundle(B, root / "w.pt", root / "served", demo=True)
    return root, out, state


def test_served_folder_holds_what_monailabel_reads(served):
    _, out, state = served
    for f in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "configs/logging.conf",
              "configs/multi_gpu_train.json", "models/model.pt", "docs/README.md", "LICENSE"):  # fmt: skip
        assert (out / f).is_file(), f
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    inference = json.loads((out / "configs" / "inference.json").read_text())
    base, demo, serve = (_read_config(f) for f in ("inference.json", "demo_inference.json", "serve_inference.json"))
    # MONAI's merge rules, written out: a later file wins, "a#b" sets a nested entry, "+a#b" appends to a list
    for key, value in serve.items():
        if key.startswith("+"):
            before = _lookup(base, key[1:])
            assert _lookup(inference, key[1:]) == before + value, key
        else:
            assert _lookup(inference, key) == value, key
    for key, value in demo.items():
        if not any(k.lstrip("+") == key or k.lstrip("+").startswith(key + "#") or key.startswith(k.lstrip("+") + "#")
                   for k in serve):  # fmt: skip
            assert _lookup(inference, key) == value, key  # demo values the serve overlay leaves alone
    overlaid = {k.lstrip("+").split("#")[0] for k in [*demo, *serve]}
    for key in set(base) - overlaid:
        assert inference[key] == base[key], key  # untouched entries of the task's inference.json
    train = json.loads((out / "configs" / "train.json").read_text())
    # what MONAI Label overrides or loads exists in the served train.json
    assert train["network"] == "$@network_def.to(@device)" and train["resume"] is False
    for path in ("train#dataset#data", "train#trainer#max_epochs", "train#handlers", "validate#dataset#data"):
        node = train
        for part in path.split("#"):
            node = node[part]
    assert train["epochs"] == "@train#trainer#max_epochs" and "run" in train
    assert train["network_def"]["size"] == "$medfm.utils.bundle.demo_size('fratmae_petct')"  # the demo network


def test_bad_requests_are_refused_clearly(served, tmp_path):
    root, out, _ = served
    with pytest.raises(FileExistsError, match="already exists"):
        build_served_bundle(B, root / "w.pt", out, demo=True)
    with pytest.raises(ValueError, match=r"w.pt does not fit the served network_def: it matches \d+ of \d+ tensors"):
        build_served_bundle(B, root / "w.pt", tmp_path / "full")  # demo weights, full-size network
    # refused weights leave an existing served bundle as it was, even with overwrite
    before = (out / "models" / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="does not fit"):
        build_served_bundle(B, root / "w.pt", out, overwrite=True)
    assert (out / "models" / "model.pt").read_bytes() == before
    # fitting weights replace it, and nothing of the build is left beside it
    new = {k: v + 1 for k, v in torch.load(root / "w.pt", weights_only=True).items()}
    torch.save(new, tmp_path / "w2.pt")
    build_served_bundle(B, tmp_path / "w2.pt", tmp_path / "served", demo=True)
    build_served_bundle(B, root / "w.pt", tmp_path / "served", demo=True, overwrite=True)
    saved = torch.load(tmp_path / "served" / "models" / "model.pt", weights_only=True)
    original = torch.load(root / "w.pt", weights_only=True)
    assert all(torch.equal(saved[k], original[k]) and not torch.equal(saved[k], new[k]) for k in new)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(ValueError, match="has no served task"):
        build_served_bundle(os.path.join(REPO, "bundles", "panfm_panorgan"), root / "w.pt", tmp_path / "p")
    with pytest.raises(ValueError, match="serves \\['segmentation'\\], not 'staging'"):
        build_served_bundle(B, root / "w.pt", tmp_path / "s", task="staging")
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pt does not exist"):
        build_served_bundle(B, tmp_path / "missing.pt", tmp_path / "m", demo=True)


def _replaced(served: float, epoch: float) -> bool:
    """Whether models/model.pt must be replaced: the served weights only get better (replaced exactly when the epoch
    beat them on validation); an undefined score (NaN: no validation case with a lesion) is no validation, and then
    the final weights are served."""
    if math.isnan(epoch):
        return True
    return math.isnan(served) or epoch > served


def _served_and_epoch_scores(log: str) -> tuple[float, float]:
    """Validation Dice of the served weights (the validation before training) and of the first epoch, from the
    evaluator's two "Epoch[1] Metrics" lines in a run's log."""
    scores = re.findall(r"Epoch\[1\] Metrics -- val_mean_dice: ([-\w.]+)", log)
    assert len(scores) == 2, log[-3000:]
    return float(scores[0]), float(scores[1])


@pytest.mark.slow
def test_served_train_config_runs_without_monailabel(served, tmp_path):
    """The served train.json run on a studies folder (what MONAI Label does in-process, less its checkpoint loader):
    one labelled study trains, the other validates, and the best model replaces models/model.pt."""
    root, out, state = served
    generate_synthetic_petct(str(tmp_path / "ds"), num_cases=2, shape=(24, 20, 40), spacing=(4.0, 4.0, 4.0), seed=2)
    export_petct_studies(str(tmp_path / "ds"), str(tmp_path / "studies"))
    # in this process, as ``python -m monai.bundle run --config_file <served>/configs/train.json`` would run it
    wf = ConfigWorkflow(config_file=str(out / "configs" / "train.json"), meta_file=str(out / "configs" /
                        "metadata.json"), logging_file=False, run_id="run", dataset_dir=str(tmp_path / "studies"),
                        val_fraction=0.5, val_interval=1, **{"train#trainer#max_epochs": 1})  # fmt: skip
    with captured_logs("monai.handlers.StatsHandler") as log:
        wf.initialize()
        wf.run()
        wf.finalize()
    split = json.loads((out / "runs" / "serve_train" / "split.json").read_text())
    assert len(split["train"]) == 1 and len(split["val"]) == 1
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    assert saved.keys() == state.keys()
    served, epoch = _served_and_epoch_scores("\n".join(log))
    assert any(not torch.equal(saved[k], state[k]) for k in state) == _replaced(served, epoch), (served, epoch)


# an input of the demo network's size for each served segmentation network
DEMO_INPUTS = {"fratmae_petct": (1, 2, 32, 32, 32), "spad_vit": (1, 3, 32, 64, 64), "midol_multimodal": (1, 3, 64, 64)}


@pytest.mark.parametrize("bundle", sorted(SERVED))
def test_served_train_configs_fit_monailabel_and_multi_gpu(bundle, tmp_path):
    """MONAI Label's ``BundleTrainTask`` reads ``train#handlers`` from the served train.json as written (before
    macros and references resolve) and calls ``.get("_target_")`` on every entry to look for a checkpoint loader, so
    every entry must be a handler written out as a dict (a ``%`` or ``@`` string fails /train with an HTTP 500).
    DistributedDataParallel stops at the second step when a parameter got no gradient in the first, unless
    ``find_unused_parameters`` is on: the served multi-GPU /train must turn it on where the segmentation network
    leaves parameters unused (SPAD-ViT's segmenter does not use the encoder's final norm)."""
    path = os.path.join(REPO, "bundles", bundle)
    _demo_weights(path, tmp_path / "w.pt")
    out = build_served_bundle(path, tmp_path / "w.pt", tmp_path / "served", demo=True)
    handlers = json.loads((out / "configs" / "train.json").read_text(encoding="utf-8"))["train"]["handlers"]
    assert handlers and all(isinstance(h, dict) and "_target_" in h for h in handlers), handlers
    network = ConfigParser(json.loads((out / "configs" / "inference.json").read_text())).get_parsed_content(
        "network_def"
    )
    pred = network(torch.randn(DEMO_INPUTS[bundle]))  # in training a deeply supervised network gives a list
    sum(o.float().sum() for o in (pred if isinstance(pred, list) else [pred])).backward()
    unused = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    merged = ConfigParser()  # as torchrun with --config_file "[train.json, multi_gpu_train.json]" merges them
    merged.read_config([str(out / "configs" / "train.json"), str(out / "configs" / "multi_gpu_train.json")])
    assert merged["network"]["_target_"] == "medfm.engines.distributed.ddp"
    if unused:
        assert merged["network"]["find_unused_parameters"] is True, unused
