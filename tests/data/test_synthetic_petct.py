"""Tests of the synthetic whole-body PET/CT generator, checked against independent image measurements."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.data.autopet import build_autopet_datalist
from medfm.data.synthetic_petct import ORGAN_LABELS, ensure_demo_petct, generate_synthetic_petct
from medfm.transforms.prompt import build_prompt

SHAPE, SPACING = (48, 32, 96), (10.0, 10.0, 20.0)  # the default field of view at half resolution
N_CASES = 10
REPO = Path(__file__).resolve().parents[2]


def _load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _erode(mask: np.ndarray) -> np.ndarray:
    """6-neighbour erosion written independently of the generator (padding with False)."""
    p = np.pad(mask, 1, constant_values=False)
    out = p[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            out &= np.roll(p, shift, axis)[1:-1, 1:-1, 1:-1]
    return out


def _components(mask: np.ndarray) -> np.ndarray:
    """6-connected component labels by iterated max-propagation of voxel indices (0 = background)."""
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(lab, 1)
        new = lab.copy()
        for axis in range(3):
            for shift in (-1, 1):
                new = np.maximum(new, np.roll(p, shift, axis)[1:-1, 1:-1, 1:-1])
        new *= mask
        if np.array_equal(new, lab):
            return lab
        lab = new


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("petct")
    cases = generate_synthetic_petct(str(root), N_CASES, shape=SHAPE, spacing=SPACING, seed=0, write_organs=True)
    with open(root / "metadata.csv", newline="") as f:
        meta = {r["case"]: r for r in csv.DictReader(f)}
    data = {}
    for c in cases:
        d = {k: _load(str(root / sub / f"{c}{suffix}.nii.gz")) for k, sub, suffix in
             (("ct", "imagesTr", "_0000"), ("pet", "imagesTr", "_0001"), ("label", "labelsTr", ""),
              ("organs", "organsTr", ""))}  # fmt: skip
        d["meta"] = meta[c]
        data[c] = d
    return {"root": root, "cases": cases, "data": data}


def _mean(d: dict, key: str, organ: str) -> float:
    mask = (d["organs"] == ORGAN_LABELS[organ]) & (d["label"] == 0)
    assert mask.sum() > 0, organ
    return float(d[key][mask].mean())


def test_layout_grid_and_datalist(demo: dict) -> None:
    root = demo["root"]
    assert demo["cases"] == [f"demo_{i:03d}" for i in range(N_CASES)]
    with open(root / "metadata.csv", newline="") as f:
        assert next(csv.reader(f)) == ["case", "tracer", "diagnosis", "age", "sex", "stage"]
    expected = np.diag([*SPACING, 1.0])
    for c in demo["cases"]:
        imgs = [nib.load(str(root / p)) for p in (f"imagesTr/{c}_0000.nii.gz", f"imagesTr/{c}_0001.nii.gz",
                                                 f"labelsTr/{c}.nii.gz")]  # fmt: skip
        assert [i.shape for i in imgs] == [SHAPE] * 3
        for img in imgs:
            np.testing.assert_allclose(img.affine[:3, :3], expected[:3, :3])
            np.testing.assert_allclose(img.affine, imgs[0].affine)
        assert nib.aff2axcodes(imgs[0].affine) == ("R", "A", "S")
        assert [i.get_data_dtype() for i in imgs] == [np.int16, np.float32, np.uint8]
    dl = build_autopet_datalist(str(root), require_labels=True)
    assert [d["case"] for d in dl] == demo["cases"]
    for d in dl:
        m = demo["data"][d["case"]]["meta"]
        assert d["prompt"] == build_prompt(m["tracer"], m["diagnosis"], m["age"], m["sex"])
        assert d["stage"] == int(m["stage"]) and d["ct"].endswith(f"{d['case']}_0000.nii.gz")


def test_metadata_rules(demo: dict) -> None:
    metas = [d["meta"] for d in demo["data"].values()]
    assert {m["diagnosis"] for m in metas} == {"melanoma", "lymphoma", "lung cancer", "prostate cancer", "negative"}
    for m in metas:
        assert (m["tracer"] == "PSMA") == (m["diagnosis"] == "prostate cancer")
        assert m["tracer"] in ("FDG", "PSMA") and m["sex"] in ("M", "F") and 20 <= int(m["age"]) <= 85
        if m["tracer"] == "PSMA":
            assert m["sex"] == "M"


def test_tissue_values_are_plausible(demo: dict) -> None:
    for c, d in demo["data"].items():
        assert _mean(d, "ct", "lung") < -500, c
        assert -150 < _mean(d, "ct", "fat") < -50, c
        assert 20 < _mean(d, "ct", "soft_tissue") < 60, c
        assert _mean(d, "ct", "bone") > 300, c
        far_air = _erode(_erode(_erode(d["organs"] == 0)))  # beyond the reach of the PET smoothing
        assert d["ct"][far_air].mean() < -980 and np.all(d["pet"][far_air] == 0), c
        assert d["pet"].min() >= 0 and d["ct"].min() >= -1024
        brain, liver = _mean(d, "pet", "brain"), _mean(d, "pet", "liver")
        assert _mean(d, "pet", "bladder") > max(5.0, liver), c  # 10-30 before smoothing
        if d["meta"]["tracer"] == "FDG":
            assert brain > 6 and brain > 2 * liver and 1.5 < liver < 3, c
            assert 0.6 < _mean(d, "pet", "soft_tissue") < 1.3, c
        else:
            assert brain < liver and _mean(d, "pet", "kidney") > 3 * liver, c
            assert _mean(d, "pet", "salivary_gland") > liver, c


def test_pet_noise_is_proportional_to_signal(demo: dict) -> None:
    d = next(d for d in demo["data"].values() if d["meta"]["tracer"] == "FDG")
    ratios, sds = [], []
    for organ in ("brain", "liver", "soft_tissue"):
        inner = _erode(_erode(d["organs"] == ORGAN_LABELS[organ])) & (d["label"] == 0)
        vals = d["pet"][inner]
        ratios.append(vals.std() / vals.mean())
        sds.append(vals.std())
    assert max(ratios) / min(ratios) < 1.5 and 0.03 < min(ratios) and max(ratios) < 0.3
    assert sds[0] > 3 * sds[2]  # brain (SUV ~9) is noisier in absolute terms than muscle (SUV ~1)


def test_lesions_inside_body_and_hot(demo: dict) -> None:
    n_positive = 0
    for c, d in demo["data"].items():
        lesion = d["label"] > 0
        if d["meta"]["diagnosis"] == "negative":
            assert not lesion.any() and d["meta"]["stage"] == "0", c
            continue
        n_positive += 1
        assert lesion.any(), c
        assert 1 <= len(np.unique(_components(lesion))) - 1 <= 4, c
        body = d["ct"] > -950  # air is -1000 HU, lungs -800 HU
        assert np.all(_erode(body)[lesion]), c
        assert d["pet"][lesion].min() > _mean(d, "pet", "liver"), c
    assert n_positive == N_CASES - 2


def test_stage_matches_lesions_and_lung_base(demo: dict) -> None:
    stages = set()
    for c, d in demo["data"].items():
        lungish = (d["ct"] > -920) & (d["ct"] < -650)
        base = int(np.flatnonzero(lungish.sum(axis=(0, 1)) >= 5)[0])  # lowest lung slice = diaphragm level
        assert np.all((d["organs"][..., :base] != ORGAN_LABELS["lung"])), c
        assert not np.any(d["organs"][..., base:] == ORGAN_LABELS["liver"]), c
        comps = _components(d["label"] > 0)
        sides = set()
        for k in np.unique(comps[comps > 0]):
            z = np.nonzero(comps == k)[2]
            assert (z >= base).all() or (z < base).all(), f"{c}: a lesion crosses the diaphragm"
            sides.add(bool(z[0] >= base))
        assert int(d["meta"]["stage"]) == int(len(sides) == 2), c
        stages.add(len(sides) == 2)
    assert stages == {True, False}


def test_default_grid_is_whole_body(tmp_path: Path) -> None:
    generate_synthetic_petct(str(tmp_path), num_cases=2, seed=5)
    for c in ("demo_000", "demo_001"):
        img = nib.load(str(tmp_path / "imagesTr" / f"{c}_0000.nii.gz"))
        sx, sy, sz = np.diag(img.affine)[:3]
        body = np.asarray(img.dataobj) > -500
        z = np.flatnonzero(body.any(axis=(0, 1)))
        assert 1500 <= (z[-1] - z[0] + 1) * sz <= 1920 and 0 < z[0] and z[-1] < body.shape[2] - 1
        x = np.flatnonzero(body.any(axis=(1, 2)))
        assert 320 <= (x[-1] - x[0] + 1) * sx <= 470
        head = np.flatnonzero(body[..., z[-1] - 5].any(axis=1))  # 5 cm below the vertex
        assert (head[-1] - head[0] + 1) * sx < 200


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    small = {"shape": (32, 24, 64), "spacing": (15.0, 14.0, 30.0)}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_synthetic_petct(str(tmp_path / name), num_cases=2, seed=seed, **small)
    for f in ("imagesTr/demo_001_0000.nii.gz", "imagesTr/demo_001_0001.nii.gz", "labelsTr/demo_001.nii.gz"):
        np.testing.assert_array_equal(_load(str(tmp_path / "a" / f)), _load(str(tmp_path / "b" / f)))
    assert (tmp_path / "a" / "metadata.csv").read_text() == (tmp_path / "b" / "metadata.csv").read_text()
    for f in ("imagesTr/demo_001_0000.nii.gz", "imagesTr/demo_001_0001.nii.gz"):
        assert not np.array_equal(_load(str(tmp_path / "a" / f)), _load(str(tmp_path / "c" / f)))


def test_refuses_to_overwrite_and_validates_arguments(tmp_path: Path) -> None:
    small = {"shape": (16, 12, 32), "spacing": (30.0, 28.0, 60.0)}
    generate_synthetic_petct(str(tmp_path), num_cases=1, **small)
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "metadata.csv"))):
        generate_synthetic_petct(str(tmp_path), num_cases=1, **small)
    generate_synthetic_petct(str(tmp_path), num_cases=1, overwrite=True, **small)
    with pytest.raises(ValueError, match="num_cases"):
        generate_synthetic_petct(str(tmp_path / "x"), num_cases=0)
    with pytest.raises(ValueError, match="spacing"):
        generate_synthetic_petct(str(tmp_path / "x"), spacing=(1.0, 0.0, 1.0))


def test_ensure_demo_petct_three_behaviours(tmp_path: Path) -> None:
    small = {"shape": (16, 12, 32), "spacing": (30.0, 28.0, 60.0)}
    new = tmp_path / "new"
    assert ensure_demo_petct(str(new), num_cases=3, **small) == str(new)
    assert len(list((new / "imagesTr").glob("*_0001.nii.gz"))) == 3
    # an existing dataset is returned untouched, even a real-looking one without metadata
    real = tmp_path / "real"
    (real / "imagesTr").mkdir(parents=True)
    for ch in ("0000", "0001"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(real / "imagesTr" / f"p1_{ch}.nii"))
    before = sorted(os.listdir(real)), sorted(os.listdir(real / "imagesTr"))
    assert ensure_demo_petct(str(real), num_cases=3, **small) == str(real)
    assert (sorted(os.listdir(real)), sorted(os.listdir(real / "imagesTr"))) == before
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*holds no PET/CT cases; refusing"):
        ensure_demo_petct(str(empty), **small)
    assert os.listdir(empty / "imagesTr") == []


def test_cli_fratmae(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cli"
    argv = ["fratmae", "--out", str(out), "--num-cases", "2", "--seed", "3", "--shape", "16", "12", "32",
            "--spacing", "30", "28", "60"]  # fmt: skip
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Wrote 2 synthetic PET/CT cases" in printed and "demo_001" in printed
    assert len(build_autopet_datalist(str(out), require_labels=True)) == 2
    with pytest.raises(SystemExit):  # second run would overwrite
        module.main(argv)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ~_erode(~mask)


HOSTS = {"lymph_node", "lung", "liver", "spleen", "bone", "fat", "soft_tissue"}
SITES = {  # where each diagnosis may put lesions
    "lymphoma": {"lymph_node", "spleen", "bone"},
    "melanoma": {"fat", "lymph_node", "lung", "liver"},
    "lung cancer": {"lung", "lymph_node", "bone", "liver"},
    "prostate cancer": {"soft_tissue", "lymph_node", "bone"},
}


def test_lesions_sit_in_one_ct_visible_host_by_diagnosis(demo: dict) -> None:
    names = {v: k for k, v in ORGAN_LABELS.items()}
    seen = {}
    for c, d in demo["data"].items():
        comps = _components(d["label"] > 0)
        hosts = set()
        for k in np.unique(comps[comps > 0]):
            codes = np.unique(d["organs"][comps == k])
            hosts |= {names[int(x)] for x in codes}
        assert hosts <= SITES.get(d["meta"]["diagnosis"], set()), (c, d["meta"]["diagnosis"], hosts)
        seen.setdefault(d["meta"]["diagnosis"], set()).update(hosts)
    assert "lung" in seen["lung cancer"] and "lymph_node" in seen["lymphoma"]


def test_lesions_are_hot_in_pet_and_at_most_faint_in_ct(demo: dict) -> None:
    n = 0
    for c, d in demo["data"].items():
        comps = _components(d["label"] > 0)
        for k in np.unique(comps[comps > 0]):
            lesion = comps == k
            host = int(np.bincount(d["organs"][lesion]).argmax())
            ref = (d["organs"] == host) & (d["label"] == 0)
            ct_host, ct_lesion = float(d["ct"][ref].mean()), float(d["ct"][lesion].mean())
            # CT contrast: a small fraction of the host's distance from soft tissue (40 HU), plus noise
            assert abs(ct_lesion - ct_host) <= 0.15 * abs(ct_host - 40) + 30, (c, host, ct_lesion, ct_host)
            assert d["pet"][lesion].mean() > 2 * float(np.median(d["pet"][ref])), (c, host)
            n += 1
    assert n >= 8


def test_lymph_nodes_are_soft_tissue_in_fat(demo: dict) -> None:
    for c, d in demo["data"].items():
        node = d["organs"] == ORGAN_LABELS["lymph_node"]
        assert node.sum() >= 10, c
        shell = _dilate(node) & ~node & (d["organs"] != 0)
        assert 20 < d["ct"][node & (d["label"] == 0)].mean() < 60, c
        assert d["ct"][shell].mean() < -20, c  # mostly fat around the nodes
        if d["meta"]["diagnosis"] == "negative":
            assert d["pet"][node].mean() < 2.0, c  # normal nodes are not hot


def test_bone_density_falls_with_age(tmp_path: Path) -> None:
    small = {"shape": (32, 24, 64), "spacing": (15.0, 14.0, 30.0)}
    generate_synthetic_petct(str(tmp_path), num_cases=40, seed=11, write_organs=True, **small)
    with open(tmp_path / "metadata.csv", newline="") as f:
        ages = {r["case"]: int(r["age"]) for r in csv.DictReader(f)}
    hu = []
    for c in ages:
        ct, organs = (_load(str(tmp_path / p)) for p in (f"imagesTr/{c}_0000.nii.gz", f"organsTr/{c}.nii.gz"))
        hu.append(ct[organs == ORGAN_LABELS["bone"]].mean())
    assert np.corrcoef(list(ages.values()), hu)[0, 1] < -0.3


def test_noise_free_cases_are_the_same_cases_without_noise(tmp_path: Path) -> None:
    small = {"shape": (32, 24, 64), "spacing": (15.0, 14.0, 30.0)}
    generate_synthetic_petct(str(tmp_path / "noisy"), num_cases=2, seed=4, **small)
    generate_synthetic_petct(str(tmp_path / "clean"), num_cases=2, seed=4, noise=False, **small)
    assert (tmp_path / "noisy" / "metadata.csv").read_text() == (tmp_path / "clean" / "metadata.csv").read_text()
    for c in ("demo_000", "demo_001"):
        noisy, clean = ({k: _load(str(tmp_path / v / p)) for k, p in (("ct", f"imagesTr/{c}_0000.nii.gz"),
                        ("pet", f"imagesTr/{c}_0001.nii.gz"), ("label", f"labelsTr/{c}.nii.gz"))}
                        for v in ("noisy", "clean"))  # fmt: skip
        np.testing.assert_array_equal(noisy["label"], clean["label"])
        inside = (clean["ct"] > -1000) & (clean["ct"] < 3000)  # away from the int16 clipping
        assert 10 < np.std(noisy["ct"][inside].astype(float) - clean["ct"][inside]) < 14  # 12 HU noise
        hot = clean["pet"] > 1.0
        rel = noisy["pet"][hot] / clean["pet"][hot] - 1
        assert abs(rel.mean()) < 0.01 and 0.07 < rel.std() < 0.16  # 8-15% multiplicative noise
