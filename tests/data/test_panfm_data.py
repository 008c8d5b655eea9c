"""Tests of Pan-FM subject tables and the synthetic pan-organ cohort, checked against independent computations."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.data import (
    DEFAULT_ORGAN_SHAPES,
    DEFAULT_ORGAN_SPACINGS,
    ORGANS,
    PANFM_DEMO_LABELS,
    ensure_demo_panfm,
    generate_synthetic_panfm,
    label_names_from_table,
    read_subject_table,
)

HALF_SHAPES = {o: tuple(max(n // 2, 8) for n in s) for o, s in DEFAULT_ORGAN_SHAPES.items()}
TINY_SHAPES = {o: (6, 6, 5) for o in ORGANS}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _auroc(score: np.ndarray, label: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank sum with mid-ranks for ties."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for value in np.unique(score):  # mid-ranks
        tie = score == value
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = label.sum(), (~label).sum()
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_auroc_helper_matches_pair_count():
    rng = np.random.default_rng(3)
    score, label = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4
    pairs = [(p > n) + 0.5 * (p == n) for p in score[label] for n in score[~label]]
    assert _auroc(score, label) == pytest.approx(np.mean(pairs))


def _percentile_mean(vol: np.ndarray) -> float:
    """Mean of the volume after the 0.5-99.5 percentile scaling the network's loader applies."""
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return float(np.clip((vol - lo) / (hi - lo), 0, 1).mean())


# ------------------------------------------------------------------------------------------------ tables
def _touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "a_brain": _touch(tmp_path / "img" / "a_brain.nii.gz"),
        "a_heart": _touch(tmp_path / "img" / "a_heart.nii.gz"),
        "b_liver": _touch(tmp_path / "elsewhere" / "b_liver.nii.gz"),
    }


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_read_csv_relative_absolute_paths_and_labels(tmp_path: Path, files: dict[str, str]):
    header = ["subject", *ORGANS, "extra", "cardiac", "metabolic"]
    row_a = ["a", "img/a_brain.nii.gz", "img/a_heart.nii.gz", "", "", "", "", "", "x", "1", "0"]
    row_b = ["b", "", "", "", files["b_liver"], "", "", "", "y", "0.0", "1.0"]
    table = _write_csv(tmp_path / "subjects.csv", header, [row_a, row_b])
    items = read_subject_table(table, label_names=["metabolic", "cardiac"])
    assert [i["subject"] for i in items] == ["a", "b"]
    assert items[0]["brain"] == files["a_brain"] and items[0]["heart"] == files["a_heart"]
    assert items[0]["liver"] is None and items[1]["liver"] == files["b_liver"]
    assert items[0]["present"] == [True, True, False, False, False, False, False]
    assert items[1]["present"] == [o == "liver" for o in ORGANS]
    assert items[0]["labels"] == [0.0, 1.0] and items[1]["labels"] == [1.0, 0.0]  # in label_names order
    assert "labels" not in read_subject_table(table)[0]
    assert label_names_from_table(table) == ["extra", "cardiac", "metabolic"]
    assert read_subject_table(str(tmp_path), label_names=["cardiac"])[1]["labels"] == [0.0]  # directory form
    assert len(read_subject_table(table, label_names=["metabolic", "cardiac"], num_labels=2)) == 2
    with pytest.raises(ValueError, match=r"subjects\.csv: 3 label columns .* num_labels=4"):
        read_subject_table(table, label_names=label_names_from_table(table), num_labels=4)


def test_read_json_with_base_dir(tmp_path: Path, files: dict[str, str]):
    entries = [
        {"subject": "a", "brain": "a_brain.nii.gz", "heart": "a_heart.nii.gz", "liver": None, "renal": 1},
        {"subject": "b", "liver": files["b_liver"], "renal": False},
    ]
    table = tmp_path / "meta" / "subjects.json"
    table.parent.mkdir()
    table.write_text(json.dumps(entries))
    items = read_subject_table(str(table), label_names=["renal"], base_dir=str(tmp_path / "img"))
    assert items[0]["brain"] == files["a_brain"] and items[0]["kidney"] is None
    assert items[1]["present"] == [o == "liver" for o in ORGANS]
    assert [i["labels"] for i in items] == [[1.0], [0.0]]
    assert label_names_from_table(str(table)) == ["renal"]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([["a", "img/a_brain.nii.gz", "", "1"], ["b", "", "", "0"]], ["'b'", "names no organ"]),
        ([["a", "img/a_brain.nii.gz", "img/nope.nii.gz", "1"]], ["'a'", "heart", "nope.nii.gz", "does not exist"]),
        ([["a", "img/a_brain.nii.gz", "", "1"], ["a", "", "img/a_heart.nii.gz", "0"]], ["'a'", "listed twice"]),
        ([["a", "img/a_brain.nii.gz", "", ""]], ["'a'", "no value for label 'cardiac'"]),
        ([["a", "img/a_brain.nii.gz", "", "2"]], ["'a'", "must be 0 or 1"]),
        ([], ["empty subject table"]),
    ],
    ids=["no_organ", "missing_file", "duplicate", "missing_label", "bad_label", "empty"],
)
def test_table_errors_name_file_and_subject(tmp_path: Path, files: dict[str, str], rows, expected):
    header = ["subject", "brain", "heart", "cardiac"]
    table = _write_csv(tmp_path / "subjects.csv", header, rows)
    with pytest.raises(ValueError) as err:
        read_subject_table(table, organs=("brain", "heart"), label_names=["cardiac"])
    for text in [table, *expected]:
        assert text in str(err.value)


def test_table_other_errors(tmp_path: Path, files: dict[str, str]):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json: empty subject table"):
        read_subject_table(str(tmp_path / "empty.json"))
    table = _write_csv(tmp_path / "t.csv", ["subject", "brain"], [["a", "img/a_brain.nii.gz"]])
    with pytest.raises(ValueError, match=r"no column \['heart'"):
        read_subject_table(table)  # a CSV must have every organ column
    with pytest.raises(ValueError, match=r"no column \['cardiac'\]"):
        read_subject_table(table, organs=("brain",), label_names=["cardiac"])
    with pytest.raises(ValueError, match="must not repeat"):
        read_subject_table(table, organs=("brain",), label_names=["brain"])
    with pytest.raises(FileNotFoundError):
        read_subject_table(str(tmp_path / "nope.csv"))


# --------------------------------------------------------------------------------------------- generator
@pytest.fixture(scope="module")
def demo(demo_data) -> Path:
    """The session's Pan-FM demo (``conftest.demo_data``: :func:`generate_synthetic_panfm` with its defaults, seed
    0), read only."""
    return Path(demo_data("panfm_panorgan"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A larger cohort at half resolution for the statistics of missingness and label signal."""
    root = tmp_path_factory.mktemp("panfm") / "cohort"
    generate_synthetic_panfm(str(root), num_subjects=240, seed=1, organ_shapes=HALF_SHAPES)
    rows = _rows(root / "subjects.csv")
    attrs = {r["subject"]: r for r in _rows(root / "attributes.csv")}
    feature = {
        o: np.array([_percentile_mean(np.asarray(nib.load(root / r[o]).dataobj)) if r[o] else np.nan for r in rows])
        for o in ORGANS
    }
    return {
        "present": np.array([[bool(r[o]) for o in ORGANS] for r in rows]),
        "labels": {k: np.array([int(r[k]) for r in rows]) for k in PANFM_DEMO_LABELS},
        "age": np.array([float(attrs[r["subject"]]["age"]) for r in rows]),
        "bmi": np.array([float(attrs[r["subject"]]["bmi"]) for r in rows]),
        "feature": feature,
    }


def test_demo_files_shapes_spacings(demo: Path):
    rows = _rows(demo / "subjects.csv")
    assert list(rows[0]) == ["subject", *ORGANS, *PANFM_DEMO_LABELS]  # attributes are not in the main table
    assert list(_rows(demo / "attributes.csv")[0]) == ["subject", "age", "sex", "bmi"]
    assert len(rows) == 48
    spacings = {}
    for organ in ORGANS:
        for r in [r for r in rows if r[organ]][:3]:
            img = nib.load(demo / r[organ])
            assert img.shape == DEFAULT_ORGAN_SHAPES[organ] and img.get_data_dtype() == np.float32
            spacings[organ] = tuple(np.round(np.linalg.norm(img.affine[:3, :3], axis=0), 4))
            assert spacings[organ] == pytest.approx(DEFAULT_ORGAN_SPACINGS[organ])
            assert np.isfinite(np.asarray(img.dataobj)).all()
    assert len(set(spacings.values())) == len(ORGANS)
    assert len({DEFAULT_ORGAN_SHAPES[o] for o in ORGANS}) == len(ORGANS)
    counts = [sum(bool(r[o]) for o in ORGANS) for r in rows]
    assert min(counts) == 1 and counts.count(1) >= 1 and counts.count(len(ORGANS)) >= 1
    for k in PANFM_DEMO_LABELS:
        assert 0.2 <= np.mean([int(r[k]) for r in rows]) <= 0.6
    items = read_subject_table(str(demo), label_names=PANFM_DEMO_LABELS)  # the reader accepts the demo
    assert [sum(i["present"]) for i in items] == counts


def test_demo_images_are_smooth_structure_plus_noise(demo: Path):
    rows = _rows(demo / "subjects.csv")
    for organ in ORGANS:
        vol = np.asarray(nib.load(demo / next(r[organ] for r in rows if r[organ])).dataobj, dtype=np.float64)
        a, b = vol[:-1].ravel(), vol[1:].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.6, organ  # neighbours agree: smooth structure, not white noise
        assert np.std(a - b) > 0.01, organ  # ... but noisy
        assert np.percentile(vol, 99) - np.percentile(vol, 1) > 0.3, organ  # with contrast


def test_generator_is_deterministic_and_refuses_overwrite(tmp_path: Path):
    a, b, c = (tmp_path / n for n in "abc")
    assert generate_synthetic_panfm(str(a), 6, seed=5, organ_shapes=TINY_SHAPES) == str(a / "subjects.csv")
    generate_synthetic_panfm(str(b), 6, seed=5, organ_shapes=TINY_SHAPES)
    generate_synthetic_panfm(str(c), 6, seed=6, organ_shapes=TINY_SHAPES)
    assert (a / "subjects.csv").read_text() == (b / "subjects.csv").read_text()
    row = _rows(a / "subjects.csv")[0]
    organ = next(o for o in ORGANS if row[o])
    va, vb = (np.asarray(nib.load(d / row[organ]).dataobj) for d in (a, b))
    assert np.array_equal(va, vb) and va.shape == TINY_SHAPES[organ]
    assert (a / "attributes.csv").read_text() != (c / "attributes.csv").read_text()
    with pytest.raises(FileExistsError, match="subjects.csv"):
        generate_synthetic_panfm(str(a), 6, seed=5, organ_shapes=TINY_SHAPES)
    generate_synthetic_panfm(str(a), 6, seed=6, organ_shapes=TINY_SHAPES, overwrite=True)
    assert (a / "attributes.csv").read_text() == (c / "attributes.csv").read_text()


def test_organ_variation_blends_each_image_with_the_organ_template(tmp_path: Path):
    """``organ_variation``: factor 0 gives every subject the same image of the organ, factor 1 the default cohort,
    and 0.5 the midpoint of the two, voxel by voxel (up to the 1/4096 rounding of each); the other organs, the
    labels and the missingness stay as they are."""
    dirs = {v: tmp_path / f"v{v}" for v in (None, 0.0, 0.5)}
    for v, d in dirs.items():
        generate_synthetic_panfm(str(d), 8, seed=2, organ_shapes=TINY_SHAPES,
                                 organ_variation=None if v is None else {"liver": v, "heart": 1.0})  # fmt: skip
    tables = {v: (d / "subjects.csv").read_text() for v, d in dirs.items()}
    assert tables[0.0] == tables[None] == tables[0.5]
    rows = _rows(dirs[None] / "subjects.csv")

    def image(v, organ, r):
        return np.asarray(nib.load(dirs[v] / r[organ]).dataobj, dtype=np.float64)

    livers = [r for r in rows if r["liver"]]
    assert len(livers) >= 2
    first = image(0.0, "liver", livers[0])
    for r in livers:
        assert np.array_equal(image(0.0, "liver", r), first)  # the template, for every subject
        mid = (image(0.0, "liver", r) + image(None, "liver", r)) / 2
        assert np.abs(image(0.5, "liver", r) - mid).max() <= 1.5 / 4096
    assert not np.array_equal(image(None, "liver", livers[0]), image(None, "liver", livers[1]))
    for organ in ("heart", "brain"):
        for r in [r for r in rows if r[organ]]:
            assert np.array_equal(image(0.5, organ, r), image(None, organ, r)), organ


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"organ_variation": {"lung": 0.5}}, "unknown organ 'lung'"),
        ({"organ_variation": {"liver": 1.5}}, r"organ_variation\['liver'\] must be in \[0, 1\]"),
        ({"num_subjects": 1}, "at least 2"),
        ({"organ_shapes": {"lung": (8, 8, 8)}}, "unknown organ 'lung'"),
        ({"organ_shapes": {"heart": (8, 8)}}, r"organ_shapes\['heart'\]"),
    ],
)
def test_generator_ill_arg(tmp_path: Path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_synthetic_panfm(str(tmp_path / "x"), **kwargs)


def test_ensure_demo_panfm(tmp_path: Path):
    root = tmp_path / "ds"
    assert ensure_demo_panfm(str(root), num_subjects=3, organ_shapes=TINY_SHAPES) == str(root)
    assert len(_rows(root / "subjects.csv")) == 3
    stamp = os.path.getmtime(root / "subjects.csv")
    assert ensure_demo_panfm(str(root), num_subjects=5) == str(root)  # existing dataset: untouched
    assert os.path.getmtime(root / "subjects.csv") == stamp and len(_rows(root / "subjects.csv")) == 3
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="no subjects.csv"):
        ensure_demo_panfm(str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == []


# --------------------------------------------------------------------------------- the generative model
def test_missing_not_at_random(cohort: dict):
    present, age, bmi = cohort["present"], cohort["age"], cohort["bmi"]
    brain, kidney, pancreas = (ORGANS.index(o) for o in ("brain", "kidney", "pancreas"))
    old = age >= 60
    assert old.sum() > 80 and (~old).sum() > 80
    assert (~present[old, brain]).mean() > (~present[~old, brain]).mean() + 0.1
    renal = cohort["labels"]["renal"] == 1
    assert (~present[renal, kidney]).mean() > (~present[~renal, kidney]).mean() + 0.08
    heavy = bmi >= np.median(bmi)
    assert (~present[heavy, pancreas]).mean() > (~present[~heavy, pancreas]).mean() + 0.1
    assert present.any(axis=1).all()


def test_label_prevalence(cohort: dict):
    for k, v in cohort["labels"].items():
        assert 0.2 <= v.mean() <= 0.6, k


@pytest.mark.parametrize("dominant, label", [("adipose", "metabolic"), ("heart", "cardiac")])
def test_dominant_organs_carry_the_strong_signal(cohort: dict, dominant: str, label: str):
    y = cohort["labels"][label]

    def power(organ: str) -> float:  # distance of the AUROC from chance, either direction
        x = cohort["feature"][organ]
        ok = ~np.isnan(x)
        return abs(_auroc(x[ok], y[ok]) - 0.5)

    assert power(dominant) > 0.25
    for weak in ("kidney", "spleen"):
        assert power(dominant) > power(weak) + 0.15, weak


def test_one_organ_tuple_for_every_layer():
    """Data, transforms, network and iteration default to the same tuple object (``medfm.organs``)."""
    import inspect

    from medfm.data.panfm import ORGANS
    from medfm.engines import PanFMPretrainPrepareBatch
    from medfm.networks.nets import PANFM_ORGANS as net_organs
    from medfm.organs import PANFM_ORGANS
    from medfm.transforms.panfm import LoadOrgansd

    assert ORGANS is PANFM_ORGANS and net_organs is PANFM_ORGANS and len(PANFM_ORGANS) == 7
    assert inspect.signature(PanFMPretrainPrepareBatch).parameters["organs"].default is PANFM_ORGANS
    assert inspect.signature(LoadOrgansd).parameters["organs"].default is PANFM_ORGANS
