"""Batch inference of every bundle over folders with damaged files among good ones: a prediction for every good
input, each input that cannot be processed in ``failed.csv`` with the reason, and a failed run (non-zero exit).

Runs ``inference.json`` + ``demo_inference.json`` in-process (``ConfigWorkflow``) with untrained demo-size weights;
one run goes through the ``python -m monai.bundle`` command line for its exit status.
"""

from __future__ import annotations

import csv
import glob
import os

import pytest

from medfm.data import (
    generate_synthetic_midol,
    generate_synthetic_panfm,
    generate_synthetic_petct,
    generate_synthetic_spad,
)
from medfm.engines import FailedItemsError

from .. import bad_files
from ..tools import load_tool
from .helpers import config_list, error_text, run_cli, save_untrained, workflow

pytestmark = pytest.mark.slow  # runs the bundles or the tool end to end

INFER = ["inference.json", "demo_inference.json"]
check_data = load_tool("check_data")
PANFM_SHAPES = {"brain": [16, 16, 16], "heart": [16, 16, 8], "adipose": [16, 16, 8], "liver": [16, 16, 8],
                "kidney": [8, 8, 8], "spleen": [8, 8, 8], "pancreas": [16, 8, 8]}  # fmt: skip


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return lambda b: save_untrained(b, INFER, "network_def", root / f"{b}.pt")


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for s in (".nii.gz", ".nii", ".png", ".dcm"):
        if name.endswith(s):
            return name[: -len(s)]
    return name


# each bundle: write good data (+ damage when `bad` is given); return {input id: path or case id}, and how an
# input's prediction is found


def _spad(data: str, bad: dict | None) -> dict[str, str]:
    generate_synthetic_spad(data, num_2d=2, num_3d=2, size_2d=48, size_3d=32, seed=0)
    images = os.path.join(data, "images")
    if bad is not None:
        good3d = sorted(glob.glob(os.path.join(images, "*.nii.gz")))[0]
        good2d = sorted(glob.glob(os.path.join(images, "*.png")))[0]
        bad.update(bad_files.volumes(images, good3d, prefix="bad_"))
        bad.update(bad_files.images_2d(images, good2d))
        dicom = bad_files.good_dicom(os.path.join(images, "mr_dicom.dcm"))
        if dicom:
            bad["good_dicom"] = dicom
    return {_stem(p): p for p in glob.glob(os.path.join(images, "*"))}


def _midol(data: str, bad: dict | None) -> dict[str, str]:
    generate_synthetic_midol(data, per_modality=2, size=32, seed=0)
    folder = os.path.join(data, "dermoscopy")
    if bad is not None:
        good = sorted(glob.glob(os.path.join(folder, "*.png")))[0]
        bad.update(bad_files.images_2d(folder, good))
        dicom = bad_files.good_dicom(os.path.join(folder, "dicom_good.dcm"))
        if dicom:
            bad["good_dicom"] = dicom
        bad["volume"] = bad_files.nifti(os.path.join(folder, "volume.nii.gz"), bad_files.np.ones((4, 4, 4), "f4"))
    return {_stem(p): p for p in glob.glob(os.path.join(folder, "*"))}


def _petct(data: str, bad: dict | None) -> dict[str, str]:
    n = 2 + (5 if bad is not None else 0)
    generate_synthetic_petct(data, num_cases=n, shape=(24, 16, 48), spacing=(10.0, 10.0, 20.0), seed=4)
    cases = sorted(os.path.basename(p)[: -len("_0001.nii.gz")] for p in glob.glob(f"{data}/imagesTr/*_0001.nii.gz"))
    if bad is not None:
        tmp = os.path.join(data, "damaged")
        good_pet = f"{data}/imagesTr/{cases[0]}_0001.nii.gz"
        kinds = bad_files.volumes(tmp, good_pet)
        for case, (kind, path) in zip(cases[2:], kinds.items()):
            os.replace(path, f"{data}/imagesTr/{case}_0001.nii.gz")
            bad[kind] = case
    return {c: c for c in cases}


def _panfm(data: str, bad: dict | None) -> dict[str, str]:
    n = 2 + (5 if bad is not None else 0)
    generate_synthetic_panfm(data, num_subjects=n, seed=0, organ_shapes=PANFM_SHAPES)
    with open(os.path.join(data, "subjects.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    if bad is not None:
        tmp = os.path.join(data, "damaged")
        first = next(v for v in rows[0].values() if v.endswith(".nii.gz"))
        kinds = bad_files.volumes(tmp, os.path.join(data, first))
        for row, (kind, path) in zip(rows[2:], kinds.items()):
            organ_file = next(v for v in row.values() if v.endswith(".nii.gz"))
            os.replace(path, os.path.join(data, organ_file))
            bad[kind] = row["subject"]
    return {r["subject"]: r["subject"] for r in rows}


BUNDLES = {"spad_vit": _spad, "midol_multimodal": _midol, "fratmae_petct": _petct, "panfm_panorgan": _panfm}


def _predicted(bundle: str, out: str) -> set[str]:
    """Input ids with a written prediction."""
    if bundle == "panfm_panorgan":
        path = os.path.join(out, "probabilities.csv")
        return {r["subject"] for r in csv.DictReader(open(path))} if os.path.isfile(path) else set()
    suffix = "_0001_seg.nii.gz" if bundle == "fratmae_petct" else "_seg"
    return {os.path.basename(p).split(suffix)[0] for p in glob.glob(os.path.join(out, "*_seg.*"))}


def _failed(out: str) -> list[dict[str, str]]:
    with open(os.path.join(out, "failed.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _row_id(bundle: str, row: dict[str, str], ids: dict[str, str]) -> str:
    """The input a failed.csv row names (its file column holds the input's path, or its case / subject id)."""
    hits = [k for k, v in ids.items() if (v in row["file"] if os.sep in v else f" {v};" in row["file"] + ";")]
    assert len(hits) == 1, (row, hits)
    return hits[0]


def _infer(bundle: str, data: str, out: str, ckpt: str) -> BaseException | None:
    wf = workflow(bundle, INFER, workflow_type="infer", dataset_dir=data, output_dir=out, ckpt_path=ckpt)
    wf.initialize()
    try:
        wf.run()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    finally:
        wf.finalize()
    return None


def _check_accounting(bundle: str, ids: dict[str, str], out: str, error: BaseException | None) -> tuple[set, dict]:
    """Every input has a prediction or a failed.csv row (not both); a failure makes the run raise."""
    predicted = _predicted(bundle, out)
    failed = {_row_id(bundle, r, ids): r["reason"] for r in _failed(out)}
    assert set(ids) == predicted | set(failed), ("silently skipped", set(ids) - predicted - set(failed))
    assert not predicted & set(failed), predicted & set(failed)
    assert all(reason.strip() for reason in failed.values())
    if failed:
        assert error is not None and isinstance(_cause(error, FailedItemsError), FailedItemsError), error_text(error)
        assert f"{len(failed)} of {len(ids)} inputs could not be processed" in str(_cause(error, FailedItemsError))
    else:
        assert error is None, error_text(error)
    return predicted, failed


def _cause(e: BaseException | None, kind: type) -> BaseException | None:
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    return e


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_one_bad_file_among_good_ones(bundle, tmp_path, weights):
    """One truncated file: predictions for every other input, failed.csv with that one, and the run fails."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    ids = BUNDLES[bundle](data, None)
    victim = sorted(ids)[0]
    target = ids[victim]
    if bundle == "fratmae_petct":
        target = f"{data}/imagesTr/{victim}_0001.nii.gz"
    elif bundle == "panfm_panorgan":
        row = next(r for r in csv.DictReader(open(os.path.join(data, "subjects.csv"))) if r["subject"] == victim)
        target = os.path.join(data, next(v for v in row.values() if v.endswith(".nii.gz")))
    bad_files.truncate(target, target)
    error = _infer(bundle, data, out, weights(bundle))
    predicted, failed = _check_accounting(bundle, ids, out, error)
    assert set(failed) == {victim}, failed
    assert predicted == set(ids) - {victim}
    assert os.path.basename(target) in _failed(out)[0]["file"] + _failed(out)[0]["reason"]


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_fuzz_inference_names_or_predicts_every_file(bundle, tmp_path, weights):
    """Damaged and degenerate files among good ones: each input gets a prediction or a named failure, never an
    unnamed traceback that stops the run, never a silent skip; files that cannot be read or hold NaN fail."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    bad: dict[str, str] = {}
    ids = BUNDLES[bundle](data, bad)
    error = _infer(bundle, data, out, weights(bundle))
    _, failed = _check_accounting(bundle, ids, out, error)
    by_path = {v: k for k, v in ids.items()}
    must_fail = {"truncated_gzip", "nan", "tiny", "truncated_png", "text_png", "dicom_truncated"}
    if bundle == "panfm_panorgan":
        must_fail.discard("tiny")  # resized to the organ's input shape: any size is taken (the check tool flags it)
    for kind in must_fail & set(bad):
        assert by_path.get(bad[kind], bad[kind]) in failed, (kind, failed)
    if "tiny_png" in bad and bundle == "midol_multimodal":  # refused up front, with the minimum in the message
        assert "smaller than a 2 x 2 image" in failed[by_path[bad["tiny_png"]]], failed
    for kind in {"good_dicom", "rgb_png"} & set(bad):  # valid inputs: an MR DICOM slice, an 8-bit RGB image
        assert by_path[bad[kind]] not in failed, failed[by_path[bad[kind]]]
    # the dataset check, run before, names every input the inference could not read
    report = check_data.check_dataset(bundle, data, check_data.main.__globals__["argparse"].Namespace(
        workers=2, images_subdir=None, labels_subdir=None, modalities=None, masks_subdir=None, patch_size=None,
        num_classes=None), progress=False)  # fmt: skip
    assert not report["ok"]
    reported = " ".join(p["file"] for p in report["problems"])
    for kind in must_fail & set(bad):
        assert (bad[kind] if os.sep in bad[kind] else f"{bad[kind]}_") in reported, (kind, report["problems"])


def test_cli_exits_non_zero_after_writing_the_good_predictions(tmp_path, weights):
    """``python -m monai.bundle run`` over a folder with one unreadable file: exit status 1, the others written."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    ids = _midol(data, None)
    with open(os.path.join(data, "dermoscopy", "broken.png"), "w") as f:
        f.write("not a png")
    res = run_cli(["run", "--config_file", config_list("midol_multimodal", *INFER), "--dataset_dir", data,
                   "--output_dir", out, "--ckpt_path", weights("midol_multimodal")], cwd=str(tmp_path))  # fmt: skip
    assert res.returncode != 0
    assert _predicted("midol_multimodal", out) == set(ids)
    rows = _failed(out)
    assert [os.path.basename(r["file"]) for r in rows] == ["broken.png"]
    log = res.stdout + res.stderr
    assert "broken.png" in log and "1 of 3 inputs could not be processed" in log, log[-3000:]


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_training_stops_at_a_bad_file_and_names_it(bundle, tmp_path):
    """Pre-training preprocessing (``train#preprocessing`` of train.json + demo.json) on a truncated file: the
    error names the file (fail-fast, nothing skipped)."""
    data = str(tmp_path / "data")
    ids = BUNDLES[bundle](data, None)
    wf = workflow(bundle, ["train.json", "demo.json"], dataset_dir=data, output_dir=str(tmp_path / "out"))
    item = wf.parser.get_parsed_content("train#datalist")[0]
    paths = [v for v in item.values() if isinstance(v, str) and v.endswith((".nii.gz", ".png"))]
    target = item.get("pet") or item.get("image") or paths[0]  # an image the pre-training reads
    bad_files.truncate(target, target)
    with pytest.raises(Exception) as e:
        wf.parser.get_parsed_content("train#preprocessing")(item)
    text = error_text(e.value)
    assert any(f"{target}: " in line or f"{target} cannot be read" in line for line in text.splitlines()), text[-2000:]
    assert ids  # the data existed


def test_clean_folder_writes_a_header_only_failed_csv(tmp_path, weights):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    ids = _midol(data, None)
    assert _infer("midol_multimodal", data, out, weights("midol_multimodal")) is None
    assert _predicted("midol_multimodal", out) == set(ids)
    assert open(os.path.join(out, "failed.csv"), encoding="utf-8").read().splitlines() == ["file,reason"]
