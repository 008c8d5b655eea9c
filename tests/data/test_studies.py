import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, ConcatItemsd, LoadImaged, ScaleIntensityRanged
from PIL import Image

from medfm.data import (
    SpadHeaderd,
    build_spad_datalist,
    export_petct_studies,
    generate_synthetic_petct,
    generate_synthetic_spad,
    studies_datalist,
    with_spad_headers,
    write_petct_study,
)
from medfm.data.nifti import save_nifti
from medfm.transforms import LoadPETCTd, PETCTChannelsd


@pytest.fixture(scope="module")
def petct(tmp_path_factory):
    root = tmp_path_factory.mktemp("petct")
    generate_synthetic_petct(str(root / "ds"), num_cases=2, shape=(16, 12, 24), spacing=(4.0, 4.0, 4.0), seed=1)
    return root


def test_export_writes_two_channel_studies_and_final_labels(petct, tmp_path):
    cases = export_petct_studies(str(petct / "ds"), str(tmp_path))
    assert cases == ["demo_000", "demo_001"]
    for case in cases:
        img = nib.load(str(tmp_path / f"{case}.nii.gz"))
        pet = nib.load(str(petct / "ds" / "imagesTr" / f"{case}_0001.nii.gz"))
        ct = nib.load(str(petct / "ds" / "imagesTr" / f"{case}_0000.nii.gz"))
        assert img.shape == (*pet.shape, 2)
        np.testing.assert_allclose(img.affine, pet.affine)
        np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], np.asarray(pet.dataobj), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(img.dataobj)[..., 1], np.asarray(ct.dataobj), rtol=1e-6)
        label = nib.load(str(tmp_path / "labels" / "final" / f"{case}.nii.gz"))
        source = nib.load(str(petct / "ds" / "labelsTr" / f"{case}.nii.gz"))
        assert label.get_data_dtype() == source.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(source.dataobj))
        np.testing.assert_allclose(label.affine, pet.affine)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left behind
    with pytest.raises(FileExistsError, match="demo_000.nii.gz already exists"):
        export_petct_studies(str(petct / "ds"), str(tmp_path), cases=["demo_000"])
    with pytest.raises(ValueError, match=r"cases \['nope'\] are not in"):
        export_petct_studies(str(petct / "ds"), str(tmp_path), cases=["nope"])


def test_ct_and_label_on_another_grid_are_resampled_onto_the_pet_grid(petct, tmp_path):
    """A CT and mask stored at half the PET resolution (every second voxel, spacing doubled) come back on the
    PET grid; at the PET voxels that coincide with coarse voxel centres (even indices) interpolation must
    return the coarse values exactly, for the CT (bilinear) and the mask (nearest)."""
    ct = nib.load(str(petct / "ds" / "imagesTr" / "demo_000_0000.nii.gz"))
    coarse_ct, coarse_lab = str(tmp_path / "ct.nii.gz"), str(tmp_path / "lab.nii.gz")
    ct_values = np.asarray(ct.dataobj)[::2, ::2, ::2].astype(np.float32)
    lab_values = np.zeros(ct_values.shape, np.uint8)
    lab_values[1:3, 1:4, 2:6], lab_values[5, 3, 8] = 1, 2  # a lesion block and a one-voxel lesion
    save_nifti(ct_values, ct.affine @ np.diag([2, 2, 2, 1]), coarse_ct)
    save_nifti(lab_values, ct.affine @ np.diag([2, 2, 2, 1]), coarse_lab)
    pet = nib.load(str(petct / "ds" / "imagesTr" / "demo_000_0001.nii.gz"))
    study, label = str(tmp_path / "s.nii.gz"), str(tmp_path / "s_label.nii.gz")
    write_petct_study(pet.get_filename(), coarse_ct, study, label=coarse_lab, label_out=label)
    s, m = nib.load(study), nib.load(label)
    assert s.shape == (*pet.shape, 2) and m.shape == pet.shape
    np.testing.assert_allclose(s.affine, pet.affine)
    np.testing.assert_allclose(m.affine, pet.affine)
    np.testing.assert_allclose(np.asarray(s.dataobj)[::2, ::2, ::2, 1], ct_values, atol=1e-2)  # HU; roundoff only
    np.testing.assert_array_equal(np.asarray(m.dataobj)[::2, ::2, ::2], lab_values)
    assert m.get_data_dtype() == lab_values.dtype
    with pytest.raises(ValueError, match="label and label_out go together"):
        write_petct_study(pet.get_filename(), coarse_ct, study, label=coarse_lab)


def test_channels_transform_matches_the_two_file_pipeline(petct, tmp_path):
    export_petct_studies(str(petct / "ds"), str(tmp_path), cases=["demo_001"])
    load = LoadImaged(["image", "label"], reader="NibabelReader", ensure_channel_first=True, image_only=True)
    d = load({"image": str(tmp_path / "demo_001.nii.gz"), "label": str(tmp_path / "labels/final/demo_001.nii.gz")})
    got = PETCTChannelsd("image", pet_suv_max=20, ct_window=(-1000, 1000), label_key="label")(d)["image"]
    two_files = Compose(
        [
            LoadPETCTd(keys=["ct", "pet"], label_key=None),
            ScaleIntensityRanged("ct", -1000, 1000, 0.0, 1.0, clip=True),
            ScaleIntensityRanged("pet", 0, 20, 0.0, 1.0, clip=True),
            ConcatItemsd(["pet", "ct"], "image"),
        ]
    )
    ds = petct / "ds" / "imagesTr"
    ref = two_files({"ct": str(ds / "demo_001_0000.nii.gz"), "pet": str(ds / "demo_001_0001.nii.gz")})["image"]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.as_tensor(), ref.as_tensor(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.affine, ref.affine)


def test_channels_transform_names_the_file_of_bad_input(petct, tmp_path):
    ct = str(petct / "ds" / "imagesTr" / "demo_000_0000.nii.gz")
    load = LoadImaged("image", ensure_channel_first=True, image_only=True)
    with pytest.raises(ValueError, match=r"demo_000_0000.nii.gz: expected a stacked PET/CT image.*got shape \(1,"):
        PETCTChannelsd("image")(load({"image": ct}))
    study = str(tmp_path / "s.nii.gz")
    write_petct_study(str(petct / "ds" / "imagesTr" / "demo_000_0001.nii.gz"), ct, study)
    img = nib.load(study)
    shifted = str(tmp_path / "label.nii.gz")
    save_nifti(np.zeros(img.shape[:3], np.uint8), img.affine + _shift(), shifted)
    both = LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True)(
        {"image": study, "label": shifted}
    )
    with pytest.raises(ValueError, match=r"label file .*label.nii.gz is not on the grid of image file .*s.nii.gz"):
        PETCTChannelsd("image", label_key="label")(both)
    bad = both["image"].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite voxels"):
        PETCTChannelsd("image")({"image": bad})


def _shift() -> np.ndarray:
    m = np.zeros((4, 4))
    m[0, 3] = 10.0  # 10 mm off the image grid
    return m


def test_studies_datalist_pairs_images_with_final_labels(tmp_path):
    for name in ("b.nii.gz", "a.png", "c.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "labels" / "final").mkdir(parents=True)
    (tmp_path / "labels" / "final" / "a.png").write_bytes(b"x")
    (tmp_path / "labels" / "final" / "b.nii.gz").write_bytes(b"x")
    root = str(tmp_path)
    assert studies_datalist(root) == [
        {"image": os.path.join(root, "a.png"), "label": os.path.join(root, "labels", "final", "a.png")},
        {"image": os.path.join(root, "b.nii.gz"), "label": os.path.join(root, "labels", "final", "b.nii.gz")},
    ]
    assert [d["image"] for d in studies_datalist(root, require_labels=False)] == [
        os.path.join(root, n) for n in ("a.png", "b.nii.gz", "c.nii")
    ]
    (tmp_path / "labels" / "final" / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="study 'a' has two final labels"):
        studies_datalist(root)
    with pytest.raises(ValueError, match="no labelled study"):
        studies_datalist(str(tmp_path / "labels"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        studies_datalist(str(tmp_path / "missing"))


def test_spad_header_fields_for_bare_image_items_match_the_datalist(tmp_path):
    generate_synthetic_spad(str(tmp_path), num_2d=1, num_3d=1, size_2d=32, size_3d=32, seed=0)
    full = build_spad_datalist(str(tmp_path))
    bare = [{"image": d["image"]} for d in full]
    fields = ("aniso_d", "spacing", "dim", "intensity")
    filled = with_spad_headers(bare)
    for f, b in zip(full, filled):
        assert {k: b[k] for k in fields} == {k: f[k] for k in fields}
        assert {k: SpadHeaderd("image")({"image": f["image"]})[k] for k in fields} == {k: f[k] for k in fields}
    png = next(d for d in full if d["image"].endswith(".png"))
    assert png["intensity"] == "uint8" and Image.open(png["image"]).mode == "L"
    # fields a caller gives are kept
    assert SpadHeaderd("image")({"image": png["image"], "intensity": "percentile"})["intensity"] == "percentile"
    with pytest.raises(ValueError, match="cannot read the image header"):
        with_spad_headers([{"image": str(tmp_path / "classes.csv")}])
