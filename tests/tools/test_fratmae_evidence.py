"""tools/fratmae_evidence.py: its statistics against independent computations, and one tiny end-to-end run."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from . import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("fratmae_evidence")


def test_paired_ci_is_the_student_t_interval(tool) -> None:
    d = [0.3, -0.1, 0.5, 0.2]
    mean, lo, hi = tool.paired_ci(d)
    ref = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and (lo, hi) == pytest.approx(ref, abs=1e-3)


def test_retrieval_accuracy_and_chance_by_enumeration(tool) -> None:
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((5, 5))
    groups = ["a", "b", "a", "c", "c"]
    for k in (1, 2):
        acc, chance = tool.retrieval(sim, groups, k)
        hits = [any(groups[j] == groups[i] for j in np.argsort(-sim[i])[:k]) for i in range(5)]
        assert acc == pytest.approx(np.mean(hits))
        # chance: every ranking of the 5 images equally likely, enumerated
        perms = list(itertools.permutations(range(5)))
        expect = np.mean([np.mean([any(groups[j] == groups[i] for j in p[:k]) for p in perms]) for i in range(5)])
        assert chance == pytest.approx(expect)
    assert tool.retrieval(np.eye(4), ["a", "b", "c", "d"], 1) == (1.0, 0.25)


@pytest.mark.slow
def test_tiny_run_writes_every_arm_and_seed(tool, tmp_path, capsys) -> None:
    argv = ["--work", str(tmp_path), "--train-cases", "4", "--test-cases", "5", "--grid", "32", "24", "48",
            "--spacing", "15", "20", "40", "--seeds", "0", "1", "--epochs", "1", "--batch-size", "2", "--crops", "2",
            "--curve-points", "1"]  # fmt: skip
    assert tool.main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["results"]) == set(tool.ARMS) and len(res["cases"]) == 5
    for arm, per_seed in res["results"].items():
        assert set(per_seed) == {"0", "1"}
        for r in per_seed.values():
            assert r["steps"] == 2 and len(r["pet_mse"]) == 5 and all(np.isfinite(r["pet_mse"]))
            assert all(c > 0 for c in r["pet_mse_clean"]) and r["noise_floor"] > 0
            assert ("similarity" in r) == (arm != "MAE")
            if arm != "MAE":
                assert np.asarray(r["similarity"]).shape == (5, 5)
    out = capsys.readouterr().out
    assert "minus MAE" in out and "same prompt, top-1" in out and "visible-PET mean" in out
