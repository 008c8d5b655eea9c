import os

import pytest
import torch

from medfm.engines import atomic_torch_save, latest_checkpoint


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # a failure in the middle of writing


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint_iter=4.pt"
    atomic_torch_save({"w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3), "x": _Unpicklable()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_iter=4.pt"]


def test_latest_checkpoint_orders_by_iteration_not_name(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for it in (8, 12, 100):
        atomic_torch_save({}, str(tmp_path / f"checkpoint_iter={it}.pt"))
    (tmp_path / ".tmp_abc.pt").write_bytes(b"partial")  # a write cut off by a kill is never picked
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_iter=100.pt")
