"""The named functions bundle configs call instead of inline lambdas, and the multi-GPU wiring."""

from __future__ import annotations

import pytest
import torch
from ignite.metrics import Accuracy
from monai.data import MetaTensor

from medfm.engines.distributed import ddp, ddp_device_ids, init_distributed, local_device
from medfm.utils.bundle import DEMO_SIZES, class_scores_and_labels, copy_key, demo_size, image_meta

from ..bundles.helpers import one_process_group_env


def test_class_scores_and_labels_feed_accuracy_like_a_hand_count():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = [{"pred": s, "label": y} for s, y in zip(scores, onehot)]
    s, y = class_scores_and_labels(out)
    assert s.shape == (4, 2) and y.tolist() == [0, 0, 0, 1]
    acc = Accuracy()
    acc.update((s, y))
    # by hand: predicted classes 0, 1, 0, 1 against 0, 0, 0, 1 -> 3 of 4 right
    assert acc.compute() == pytest.approx(0.75)


def test_image_meta_takes_each_case_image_metadata():
    batch = [{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"case{i}.nii.gz"})} for i in range(3)]
    assert [m["filename_or_obj"] for m in image_meta(batch)] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]


def test_local_device_without_cuda_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")


def test_local_device_on_cuda_reads_local_rank_and_names_a_missing_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == torch.device("cuda:3")
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        local_device()


def test_ddp_device_ids_name_the_cuda_device_only():
    assert ddp_device_ids("cpu") is None
    assert ddp_device_ids("cuda:1") == [torch.device("cuda:1")]


def test_init_distributed_joins_a_gloo_group_once(tmp_path, monkeypatch):
    import torch.distributed as dist

    one_process_group_env(monkeypatch)
    try:
        init_distributed("cpu")
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        group = dist.group.WORLD
        init_distributed("cpu")  # a second call keeps the group
        assert dist.group.WORLD is group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_wraps_the_module_as_distributed_data_parallel_built_by_hand(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    one_process_group_env(monkeypatch)
    try:
        init_distributed("cpu")
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 2)
        net = ddp(module, find_unused_parameters=True)
        hand = DistributedDataParallel(torch.nn.Linear(3, 2), device_ids=None, find_unused_parameters=True)
        assert isinstance(net, DistributedDataParallel) and net.module is module
        assert (net.device_ids, net.find_unused_parameters) == (hand.device_ids, hand.find_unused_parameters)
        assert ddp(torch.nn.Linear(3, 2)).find_unused_parameters is False
        with pytest.raises(ValueError, match="Identity has no parameters or buffers"):
            ddp(torch.nn.Identity())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_copy_key_keeps_the_source_and_names_a_missing_one():
    items = [{"image": "a.png", "mask": "a_mask.png"}, {"image": "b.png", "mask": "b_mask.png"}]
    out = copy_key(items, "mask", "label")
    assert out == [{"image": "a.png", "mask": "a_mask.png", "label": "a_mask.png"},
                   {"image": "b.png", "mask": "b_mask.png", "label": "b_mask.png"}]  # fmt: skip
    assert "label" not in items[0]  # the input is left alone
    with pytest.raises(ValueError, match="item 1 has no 'mask'"):
        copy_key([items[0], {"image": "c.png"}], "mask", "label")


def test_demo_size_is_a_fresh_config_copy_and_names_an_unknown_bundle():
    size = demo_size("midol_multimodal")
    assert size["depths"] == [2, 2] and isinstance(size["num_heads"], list)  # as a JSON config writes it
    size["depths"].append(2)
    assert DEMO_SIZES["midol_multimodal"]["depths"] == (2, 2)
    assert demo_size("fratmae_petct") == {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "mlp_dim": 192}
    with pytest.raises(ValueError, match="no demo size for bundle 'nope'"):
        demo_size("nope")
