"""tools/midol_routing.py: its silhouette against a brute-force loop, and the tool end to end at the smallest scale
(the numbers themselves are the tool's output)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import cosine, euclidean

from medfm.data import MODALITIES

from . import load_tool


def _load():
    return load_tool("midol_routing")


def _brute_silhouette(x, labels, dist) -> float:
    scores = []
    for i in range(len(x)):
        same = [dist(x[i], x[j]) for j in range(len(x)) if j != i and labels[j] == labels[i]]
        if not same:
            scores.append(0.0)
            continue
        a = sum(same) / len(same)
        b = min(
            np.mean([dist(x[i], x[j]) for j in range(len(x)) if labels[j] == other])
            for other in set(labels) - {labels[i]}
        )
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


@pytest.mark.parametrize("metric, dist", [("cosine", cosine), ("euclidean", euclidean)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_silhouette_matches_brute_force(metric, dist, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(23, 5)) + 0.5
    labels = list(rng.choice(["a", "b", "c", "d"], size=23))
    labels[0] = "e"  # a singleton cluster scores 0
    got = _load().silhouette(x, labels, metric=metric)
    assert got == pytest.approx(_brute_silhouette(x, labels, dist), abs=1e-10)
    assert -1.0 <= got <= 1.0


def test_silhouette_extremes_and_errors():
    sil = _load().silhouette
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert sil(x, [0, 0, 1, 1]) == pytest.approx(1.0)  # cosine: each cluster is one direction
    assert sil(x, [0, 1, 0, 1]) < 0
    with pytest.raises(ValueError):
        sil(x, [0, 0, 0, 0])
    with pytest.raises(ValueError):
        sil(x, [0, 1, 2])


def test_routing_purity():
    purity = _load().routing_purity(
        np.array([0, 0, 1, 2, 2, 2, 0, 0]), ["a", "a", "a", "b", "b", "b", "c", "c"], ["a", "b", "c"]
    )
    assert purity["purity"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 1.0})
    assert purity["mean_purity"] == pytest.approx((2 / 3 + 2) / 3)
    assert purity["experts_used"] == 3 and purity["dominant_experts"] == 2


def test_expert_balance_and_interval():
    module = _load()
    # 10 images over 4 experts: counts 5, 3, 2, 0 -> the smallest share is 0; over 3 experts: 2 / 10
    assert module.expert_balance(np.array([0] * 5 + [1] * 3 + [2] * 2), 4) == 0.0
    assert module.expert_balance(np.array([0] * 5 + [1] * 3 + [2] * 2), 3) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        module.expert_balance(np.array([0, 3]), 3)
    mean, lo, hi = module.interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5) and mean - lo == hi - mean


def _cells(row: str) -> list[float]:
    return [float(c) for c in row.split("|")[2:4]]


@pytest.mark.slow
def test_routing_tables_cover_every_modality_and_both_variants(tmp_path, capsys):
    module = _load()
    args = ["--seeds", "0", "--steps", "2", "--per-modality", "4", "--batch-size", "8", "--out-dir", str(tmp_path)]
    assert module.main(args) == 0
    out = capsys.readouterr().out
    assert out.count(module.START) == 1 and out.count(module.END) == 1
    block = out[out.index(module.START) : out.index(module.END)]
    assert "| modality | routing | no_routing |" in block
    assert "| experts | routing | no_routing |" in block
    assert "| measure | routing | no_routing |" in block
    assert "route_weight = 0" in block  # the no_routing variant really turns the loss off
    rows = {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| ")}
    for name in (*MODALITIES, "mean"):
        assert all(0.0 < p <= 1.0 for p in _cells(rows[name])), rows[name]
    for gate in ("teacher", "student"):
        used, dominant = _cells(rows[f"{gate}: top-1 of any image"]), _cells(rows[f"{gate}: most used by a modality"])
        assert all(float(n).is_integer() and 1 <= n for n in used + dominant), (used, dominant)
        assert all(d <= min(u, len(MODALITIES)) for u, d in zip(used, dominant)), (used, dominant)
        assert all(0.0 < p <= 1.0 for p in _cells(rows[f"{gate} purity"])), rows[f"{gate} purity"]
        assert all(0.0 <= b <= 0.2 for b in _cells(rows[f"{gate} balance"])), rows[f"{gate} balance"]  # 5 experts
    assert all(-1.0 <= s <= 1.0 for s in _cells(rows["silhouette"])), rows["silhouette"]
    for variant in ("routing", "no_routing"):
        assert (tmp_path / f"{variant}_seed0" / "pretrain" / "models" / "model.pt").is_file()


def test_write_docs_needs_the_markers(tmp_path, monkeypatch):
    module = _load()
    docs = tmp_path / "README.md"
    docs.write_text("# no block here\n", encoding="utf-8")
    monkeypatch.setattr(module, "DOCS", docs)
    with pytest.raises(SystemExit, match="routing:start"):
        module.main(["--write-docs", "--seeds", "0", "--steps", "1", "--out-dir", str(tmp_path)])


def test_training_balance_from_logged_terms():
    # 3 experts, 12 logged steps: the smallest share per step, averaged over the first and the last 10 steps
    curve = []
    for step in range(12):
        low = step / 100
        curve.append({**{f"expert_{e}": v for e, v in enumerate([low, 0.5, 0.5 - low])},
                      **{f"target_{e}": v for e, v in enumerate([0.0, 0.5, 0.5])},
                      **{f"target_mass_{e}": 1 / 3 for e in range(3)}})  # fmt: skip
    out = _load().training_balance(curve, 3)
    assert out["teacher_first"] == pytest.approx(np.mean(np.arange(10) / 100))
    assert out["teacher_last"] == pytest.approx(np.mean(np.arange(2, 12) / 100))
    assert out["target_first"] == out["target_last"] == 0.0
    assert out["target_mass_last"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        _load().training_balance([], 3)


def test_overrides_parse_json_values_else_strings():
    module = _load()
    got = module.parse_overrides(["loss_def#iterations=50", "momentum_start=0.99", "flag=true", "name=abc", "a=b=c"])
    assert got == {"loss_def#iterations": 50, "momentum_start": 0.99, "flag": True, "name": "abc", "a": "b=c"}
    assert isinstance(got["loss_def#iterations"], int)
    for bad in ("no_equals", "=1"):
        with pytest.raises(ValueError, match="ID=VALUE"):
            module.parse_overrides([bad])


@pytest.mark.slow
def test_overrides_reach_the_run_and_variants_select(tmp_path, capsys):
    # converged Sinkhorn (50 iterations at r_T / 1): every expert gets 1/E of the targets' mass in every step, where
    # the shipped 3 iterations at r_T / 0.04 leave 0.09 (README "Routing purity")
    module = _load()
    args = ["--seeds", "0", "--steps", "2", "--per-modality", "4", "--batch-size", "8", "--out-dir", str(tmp_path),
            "--variants", "routing", "--set", "loss_def#iterations=50", "--set", "loss_def#route_teacher_temp=1.0"]
    assert module.main(args) == 0
    block = capsys.readouterr().out
    assert "| measure | routing |" in block and "no_routing" not in block.split("Variants:")[1]
    rows = {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| ")}
    for when in ("first", "last"):
        assert abs(float(rows[f"target mass, {when} 10 steps"].split("|")[2]) - 0.2) < 2e-3
    assert not (tmp_path / "no_routing_seed0").exists()
    saved = json.loads((tmp_path / "routing_seed0" / "result.json").read_text())  # every step's terms, kept
    assert saved["steps_done"] == len(saved["curve"]) == 2
    mass = [sum(t[f"target_mass_{e}"] for e in range(5)) for t in saved["curve"]]
    assert all(abs(m - 1.0) < 1e-3 for m in mass)
