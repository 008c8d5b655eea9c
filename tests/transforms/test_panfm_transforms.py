"""Tests of Pan-FM's organ loading and missing-organ protocol (medfm.transforms.panfm)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import list_data_collate
from monai.transforms import Compose

from medfm.data import ORGANS, read_subject_table
from medfm.transforms import DropOrgansd, LoadOrgansd

# target shapes (D, H, W) per organ, all different and tiny
SHAPES = {o: (4 + i, 5, 3 + (i % 3)) for i, o in enumerate(ORGANS)}
FILE_SHAPES = {o: (6 + i, 7, 5) for i, o in enumerate(ORGANS)}


def _save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _volume(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 30.0, shape).astype(np.float32)


@pytest.fixture
def table(tmp_path: Path) -> dict:
    """Two subjects: ``s1`` with brain, heart and kidney, ``s2`` with liver only; labels ``(1, 0)``, ``(0, 1)``."""
    present = {"s1": ("brain", "heart", "kidney"), "s2": ("liver",)}
    arrays, rows = {}, []
    for n, (sid, organs) in enumerate(present.items()):
        row = {"subject": sid, **{o: "" for o in ORGANS}, "cardiac": str(1 - n), "renal": str(n)}
        for organ in organs:
            arrays[sid, organ] = _volume(FILE_SHAPES[organ], seed=10 * n + ORGANS.index(organ))
            _save(tmp_path / "organs" / f"{sid}_{organ}.nii.gz", arrays[sid, organ], spacing=(0.8, 1.1, 2.5))
            row[organ] = f"organs/{sid}_{organ}.nii.gz"
        rows.append(row)
    with open(tmp_path / "subjects.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    items = read_subject_table(str(tmp_path / "subjects.csv"), label_names=["cardiac", "renal"])
    return {"items": items, "arrays": arrays, "present": present, "root": tmp_path}


def _percentile_scaled(x: np.ndarray, lo_q: float = 0.5, hi_q: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(x, [lo_q, hi_q])
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def test_load_shapes_zeros_present_labels(table: dict):
    out = [LoadOrgansd(organ_shapes=SHAPES)(item) for item in table["items"]]
    for d, (sid, organs) in zip(out, table["present"].items()):
        assert d["subject"] == sid
        assert d["present"].dtype == torch.bool and d["present"].tolist() == [o in organs for o in ORGANS]
        for organ in ORGANS:
            img = d[f"image_{organ}"]
            assert type(img) is torch.Tensor and img.dtype == torch.float32 and img.shape == (1, *SHAPES[organ])
            if organ in organs:
                assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.1
            else:
                assert not img.any() and d[organ] == ""  # zeros; None path made collatable
    assert out[0]["labels"].dtype == torch.float32 and out[0]["labels"].tolist() == [1.0, 0.0]
    assert out[1]["labels"].tolist() == [0.0, 1.0]
    batch = list_data_collate(out)
    assert batch["present"].shape == (2, len(ORGANS)) and batch["labels"].shape == (2, 2)
    for organ in ORGANS:
        assert batch[f"image_{organ}"].shape == (2, 1, *SHAPES[organ])


def test_load_percentile_and_resize_match_independent_computation(table: dict):
    arr = table["arrays"]["s1", "heart"]
    same = dict(SHAPES, heart=FILE_SHAPES["heart"])  # no resize: the scaling alone
    got = LoadOrgansd(organ_shapes=same)(table["items"][0])["image_heart"][0].numpy()
    np.testing.assert_allclose(got, _percentile_scaled(arr), atol=1e-5)
    assert np.isclose((got == 1).mean(), 0.005, atol=0.004) and np.isclose((got == 0).mean(), 0.005, atol=0.004)
    resized = LoadOrgansd(organ_shapes=SHAPES)(table["items"][0])["image_heart"]
    ref = F.interpolate(torch.from_numpy(_percentile_scaled(arr)).float()[None, None], size=SHAPES["heart"],
                        mode="trilinear", align_corners=False)[0]  # fmt: skip
    torch.testing.assert_close(resized, ref, atol=1e-5, rtol=0)


def test_load_zscore(table: dict):
    shapes = dict(SHAPES, brain=FILE_SHAPES["brain"])
    img = LoadOrgansd(organ_shapes=shapes, intensity="zscore")(table["items"][0])["image_brain"].double()
    arr = table["arrays"]["s1", "brain"].astype(np.float64)
    np.testing.assert_allclose(img[0].numpy(), (arr - arr.mean()) / arr.std(), atol=1e-4)


def test_load_present_flag_false_skips_a_given_path(table: dict):
    item = dict(table["items"][0], present=[o != "heart" and o in ("brain", "kidney") for o in ORGANS])
    d = LoadOrgansd(organ_shapes=SHAPES)(item)
    assert not d["image_heart"].any() and d["present"].tolist() == [o in ("brain", "kidney") for o in ORGANS]
    with pytest.raises(ValueError, match="'s2': brain is marked present but has no file path"):
        LoadOrgansd(organ_shapes=SHAPES)(dict(table["items"][1], present=[True] * len(ORGANS)))


@pytest.mark.parametrize("problem", ["nan", "inf", "corrupt", "two_channels", "missing"])
def test_load_errors_name_subject_organ_file(table: dict, problem: str):
    path = Path(table["items"][0]["kidney"])
    if problem in ("nan", "inf"):
        arr = table["arrays"]["s1", "kidney"].copy()
        arr[1, 2, 3] = np.nan if problem == "nan" else np.inf
        _save(path, arr)
    elif problem == "corrupt":
        path.write_bytes(path.read_bytes()[:60])
    elif problem == "two_channels":
        _save(path, np.zeros((*FILE_SHAPES["kidney"], 1, 2), np.float32))
    else:
        path.unlink()
    error = FileNotFoundError if problem == "missing" else ValueError
    with pytest.raises(error) as err:
        LoadOrgansd(organ_shapes=SHAPES)(table["items"][0])
    for text in ("'s1'", "kidney", str(path)):
        assert text in str(err.value)
    if problem in ("nan", "inf"):
        assert "1 non-finite" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"organ_shapes": {o: SHAPES[o] for o in ORGANS[:-1]}}, "organ_shapes\\['pancreas'\\]"),
        ({"organ_shapes": dict(SHAPES, heart=(4, 4))}, "organ_shapes\\['heart'\\]"),
        ({"organ_shapes": SHAPES, "intensity": "minmax"}, "intensity must be one of"),
        ({"organ_shapes": SHAPES, "lower": 50, "upper": 10}, "lower < upper"),
        ({"organ_shapes": SHAPES, "organs": ("brain", "brain")}, "distinct"),
    ],
)
def test_load_ill_arg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoadOrgansd(**kwargs)


# ------------------------------------------------------------------------------------------- DropOrgansd
def _items(n: int, seed: int = 0, all_present: bool = False) -> list[dict]:
    """``n`` in-memory subjects with random (non-empty) presence and images of ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        present = np.ones(len(ORGANS), bool) if all_present else rng.random(len(ORGANS)) < 0.6
        present[rng.integers(len(ORGANS))] = True
        images = {f"image_{o}": torch.full((1, 2, 2, 2), float(p)) for o, p in zip(ORGANS, present)}
        out.append({"subject": f"sub_{i:04d}", "present": torch.from_numpy(present), **images})
    return out


def _check_consistent(before: dict, after: dict) -> None:
    """``present`` lost exactly ``dropped``; dropped images are zero, the others untouched."""
    lost = before["present"] & ~after["present"]
    assert [o for o, x in zip(ORGANS, lost) if x] == after["dropped"]
    assert not (after["present"] & ~before["present"]).any()
    for o, x in zip(ORGANS, lost):
        expected = torch.zeros(1, 2, 2, 2) if x else before[f"image_{o}"]
        assert torch.equal(after[f"image_{o}"], expected)


def test_leave_out():
    items = _items(60) + [
        {"subject": "only_heart", "present": torch.tensor([o == "heart" for o in ORGANS]),
         **{f"image_{o}": torch.full((1, 2, 2, 2), float(o == "heart")) for o in ORGANS}},
    ]  # fmt: skip
    drop = DropOrgansd(mode="leave_out", organ="heart")
    heart = ORGANS.index("heart")
    for item in items[:-1]:
        out = drop(item)
        _check_consistent(item, out)
        assert not out["present"][heart] and out["dropped"] == (["heart"] if item["present"][heart] else [])
    kept = drop(items[-1])  # a subject's only organ is kept ...
    assert kept["present"][heart] and kept["dropped"] == []
    gone = DropOrgansd(mode="leave_out", organ="heart", keep_at_least_one=False)(items[-1])  # ... unless asked
    assert not gone["present"].any() and gone["dropped"] == ["heart"]


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6])
def test_random_drop_rate(rate: float):
    items = _items(600, all_present=True)
    drop = DropOrgansd(mode="random", rate=rate, seed=1)
    outs = [drop(item) for item in items]
    dropped = sum(len(o["dropped"]) for o in outs) / (len(items) * len(ORGANS))
    assert abs(dropped - rate) < 0.03
    per_organ = np.mean([[o in out["dropped"] for o in ORGANS] for out in outs], axis=0)
    assert np.all(np.abs(per_organ - rate) < 0.08)  # independent of the organ
    for item, out in zip(items[:50], outs[:50]):
        _check_consistent(item, out)


def test_random_drop_never_empties_a_subject_and_keeps_inputs():
    items = _items(300, seed=2)
    snapshot = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in it.items()} for it in items]
    outs = [DropOrgansd(mode="random", rate=0.95)(item) for item in items]
    assert all(out["present"].sum() >= 1 for out in outs)
    assert np.mean([out["present"].sum() == 1 for out in outs]) > 0.8  # rate 0.95: mostly the last one kept
    for item, before, out in zip(items, snapshot, outs):
        _check_consistent(before, out)
        for k, v in before.items():  # no in-place change of the input (cached items stay intact)
            assert torch.equal(item[k], v) if isinstance(v, torch.Tensor) else item[k] == v
    singles = [dict(it, present=torch.arange(len(ORGANS)) == i % len(ORGANS)) for i, it in enumerate(items[:14])]
    assert all(DropOrgansd(mode="random", rate=1.0)(it)["dropped"] == [] for it in singles)
    empty = DropOrgansd(mode="random", rate=1.0, keep_at_least_one=False)(items[0])
    assert not empty["present"].any()


def test_random_drop_is_deterministic_per_subject():
    items = _items(200, seed=3)
    first = [DropOrgansd(mode="random", rate=0.4, seed=7)(it)["dropped"] for it in items]
    again = [DropOrgansd(mode="random", rate=0.4, seed=7)(it)["dropped"] for it in reversed(items)][::-1]
    other = [DropOrgansd(mode="random", rate=0.4, seed=8)(it)["dropped"] for it in items]
    assert first == again and first != other
    # the draw of an organ depends only on (seed, subject): with every organ present, the drops of a subject
    # with fewer organs are the same organs, restricted to those it has
    drop, checked = DropOrgansd(mode="random", rate=0.4, seed=7), 0
    for it, dropped in zip(items, first):
        full = set(drop(dict(it, present=torch.ones(len(ORGANS), dtype=torch.bool)))["dropped"])
        has = {o for o, p in zip(ORGANS, it["present"]) if p}
        if has - full:  # keep-at-least-one did not intervene
            assert set(dropped) == full & has
            checked += 1
    assert checked > 150


@pytest.mark.slow
def test_random_drop_is_the_same_in_another_process():
    """Drops do not depend on Python's per-process string hash (PYTHONHASHSEED) or any global RNG."""
    code = (
        "import torch; from medfm.transforms import DropOrgansd; d = DropOrgansd(mode='random', rate=0.5, seed=3); "
        "print([d({'subject': f's{i}', 'present': torch.ones(7, dtype=torch.bool), "
        "**{f'image_{o}': torch.ones(1) for o in d.organs}})['dropped'] for i in range(20)])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, encoding="utf-8")
    assert res.returncode == 0, res.stderr
    torch.manual_seed(99)
    np.random.seed(99)
    drop = DropOrgansd(mode="random", rate=0.5, seed=3)
    images = {f"image_{o}": torch.ones(1) for o in ORGANS}
    here = [drop({"subject": f"s{i}", "present": torch.ones(7, dtype=torch.bool), **images}) for i in range(20)]
    assert res.stdout.strip() == str([d["dropped"] for d in here])


def test_drop_none_and_pipeline_collates(table: dict):
    item = _items(1)[0]
    out = DropOrgansd()(item)
    assert out["dropped"] == [] and torch.equal(out["present"], item["present"])
    pipeline = Compose(
        [LoadOrgansd(organ_shapes=SHAPES), DropOrgansd(mode="leave_out", organ="brain", dropped_key=None)]
    )
    batch = list_data_collate([pipeline(it) for it in table["items"]])
    assert "dropped" not in batch and not batch["present"][:, ORGANS.index("brain")].any()
    assert not batch["image_brain"].any() and batch["image_heart"][0].any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "leave_out"}, "needs organ"),
        ({"mode": "leave_out", "organ": "lung"}, "needs organ"),
        ({"mode": "random", "organ": "heart"}, "only used with mode='leave_out'"),
        ({"mode": "random", "rate": 1.5}, "rate must be in"),
        ({"mode": "sometimes"}, "mode must be one of"),
    ],
)
def test_drop_ill_arg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropOrgansd(**kwargs)


def test_drop_needs_present_mask():
    with pytest.raises(ValueError, match="'x': no 'present' mask"):
        DropOrgansd(mode="random", rate=0.5)({"subject": "x"})
