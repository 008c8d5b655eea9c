"""tools/config_repetition.py against a hand count on a two-file bundle."""

from __future__ import annotations

import json

from . import load_tool

repetition = load_tool("config_repetition")


def _write(folder, name: str, config: dict) -> None:
    (folder / name).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def test_copied_runs_against_a_hand_count(tmp_path):
    configs = tmp_path / "b" / "configs"
    configs.mkdir(parents=True)
    shared = {f"k{i}": i for i in range(6)}  # six meaningful lines, identical in both files
    _write(configs, "a.json", {"only_a": 1, **shared, "only_a2": [1, 2]})
    _write(configs, "b.json", {**shared, "other": {"x": 1}})
    _write(configs, "c.json", {"k0": 0, "k1": 1, "k2": 2, "k3": 3, "z": 9})  # a run of 4: below 5
    r = repetition.bundle_repetition(tmp_path / "b", run=5)
    # a.json: "only_a", k0..k5, "only_a2": [ (the list's "1," and "2" lines are meaningful) -> 6 of 10 copied
    # b.json: k0..k5, "other": {, "x": 1 -> 6 of 8; c.json: its 4 shared lines are a run shorter than 5 -> 0 of 5
    assert r["per_file"] == {"a.json": [6, 10], "b.json": [6, 8], "c.json": [0, 5]}
    assert (r["copied"], r["meaningful"], r["fraction"]) == (12, 23, round(12 / 23, 4))
    assert repetition.bundle_repetition(tmp_path / "b", run=7)["copied"] == 0


def test_every_bundle_is_measured():
    assert repetition.main([]) == 0
