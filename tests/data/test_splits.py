import json
import os

import pytest

from medfm.data import finetune_splits


def _items(n: int) -> list[dict]:
    return [{"case": f"c{i:02d}", "image": f"/d/c{i:02d}.nii.gz"} for i in range(n)]


def test_validation_cases_do_not_depend_on_the_label_fraction_and_the_record_names_them(tmp_path):
    items = _items(20)
    record = str(tmp_path / "out" / "split.json")  # its folder does not exist yet
    splits = {f: finetune_splits(items, 0.2, f, seed=3, record_file=record) for f in (0.2, 0.4, 1.0)}
    vals = {f: [d["case"] for d in s["val"]] for f, s in splits.items()}
    assert len(vals[1.0]) == 4 and vals[0.2] == vals[0.4] == vals[1.0]
    for f, s in splits.items():
        train = [d["case"] for d in s["train"]]
        assert len(train) == round(16 * f) and not set(train) & set(vals[f])
        assert train == sorted(train)  # input order kept
    rest = [d["case"] for d in splits[1.0]["train"]]
    assert set(rest) | set(vals[1.0]) == {d["case"] for d in items}
    written = json.loads(open(record).read())  # the last call's split
    assert written == {"seed": 3, "val_fraction": 0.2, "label_fraction": 1.0, "train": rest, "val": vals[1.0]}
    assert os.listdir(tmp_path / "out") == ["split.json"]  # no temporary file left beside it


def test_a_bad_label_fraction_is_refused():
    with pytest.raises(ValueError, match="label fraction must be in"):
        finetune_splits(_items(5), 0.2, 0.0, seed=0)
