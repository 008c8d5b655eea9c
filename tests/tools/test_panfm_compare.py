"""tools/panfm_compare.py end to end at the smallest scale (the numbers themselves are the tool's output)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from medfm.data import ORGANS

TOOL = Path(__file__).resolve().parents[2] / "tools" / "panfm_compare.py"


@pytest.mark.slow
def test_compare_tables_cover_every_organ_mode_and_condition(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("panfm_compare", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--seeds", "0", "--steps", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(module.START) == 1 and out.count(module.END) == 1
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for organ in ORGANS:
        shares = [float(c) for c in rows[organ].split("|")[2:4]]
        assert all(0.0 < s <= 1.0 for s in shares), rows[organ]
    for cond in ("all organs", "without adipose", "random missing 60%"):
        assert cond in rows
    assert "| organ | random | sgm |" in out
    assert (tmp_path / "sgm_seed0" / "robustness" / "robustness_auroc.csv").is_file()
