"""tools/panfm_collapse.py: its measures against hand computations, and a two-step run on a tiny cohort."""

from __future__ import annotations

import math

import pytest
import torch

from . import load_tool



@pytest.fixture(scope="module")
def module():
    return load_tool("panfm_collapse")


def test_subject_information_and_cosine(module):
    same = torch.full((3, 4), 0.25)
    assert module.subject_information(same) == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.eye(4)  # four subjects, each sure of its own prototype: H(mean) = log 4, H(rows) = 0
    assert module.subject_information(one_hot) == pytest.approx(math.log(4), rel=1e-6)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pairs = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]  # (0, 1), (0, 2), (1, 2)
    assert module.mean_offdiag_cosine(x) == pytest.approx(sum(pairs) / 3, rel=1e-6)
    # KoLeo: after normalisation every row's nearest other row is at distance sqrt(2) -> -log sqrt(2)
    points = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert float(module.koleo(points)) == pytest.approx(-0.5 * math.log(2), rel=1e-5)


@pytest.mark.slow
def test_two_steps_print_every_column(module, tmp_path, capsys):
    args = ["--data", str(tmp_path / "data"), "--subjects", "16", "--steps", "2", "--freeze-last-layer", "1"]
    assert module.main([*args, "--koleo", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "mean cosine between subjects of the teacher's CLS" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 11 for r in rows)
    assert all(0.0 <= float(r[4]) <= math.log(256) + 1e-3 for r in rows)  # H_t within [0, log out_dim]
    assert float(rows[0][10]) > 0  # the student moved
