"""Named steps the bundle configs call instead of repeating them: organ loading and the demo organ grids."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from medfm.transforms import LoadOrgansd
from medfm.utils.bundle import PANFM_DEMO_ORGAN_SHAPES, organ_loading, panfm_demo_organ_shapes

REPO = Path(__file__).resolve().parents[2]


def test_panfm_demo_organ_shapes_are_the_grids_the_demo_wrote() -> None:
    """The grids the three Pan-FM demo overlays wrote out before they read them from one place (hand-copied)."""
    written = {"brain": [16, 16, 16], "heart": [16, 16, 8], "adipose": [16, 16, 8], "liver": [16, 16, 8],
               "kidney": [8, 8, 8], "spleen": [8, 8, 8], "pancreas": [16, 8, 8]}  # fmt: skip
    got = panfm_demo_organ_shapes()
    assert got == written and list(got) == list(written)
    got["brain"][0] = 99  # a fresh copy each call: a config that edits it leaves the next one alone
    assert panfm_demo_organ_shapes()["brain"] == [16, 16, 16] and PANFM_DEMO_ORGAN_SHAPES["brain"] == (16, 16, 16)
    for name in ("demo.json", "demo_finetune.json", "demo_inference.json"):
        cfg = json.loads((REPO / "bundles/panfm_panorgan/configs" / name).read_text())
        assert cfg["organ_shapes"] == "$medfm.utils.bundle.panfm_demo_organ_shapes()", name


def test_organ_loading_equals_the_compose_it_names(tmp_path: Path) -> None:
    """``organ_loading`` gives the same sample as ``Compose([LoadOrgansd(...)])`` written out."""
    shapes = {"brain": [8, 8, 4], "liver": [4, 4, 4]}
    rng = np.random.default_rng(0)
    sample = {"subject": "s0"}
    for organ, shape in {"brain": (10, 9, 6), "liver": (5, 6, 7)}.items():
        path = tmp_path / f"{organ}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.eye(4)), str(path))
        sample[f"image_{organ}"] = str(path)
    pipe = organ_loading(["brain", "liver"], shapes, "zscore")
    assert isinstance(pipe, Compose) and len(pipe.transforms) == 1 and isinstance(pipe.transforms[0], LoadOrgansd)
    want = Compose([LoadOrgansd(["brain", "liver"], organ_shapes=shapes, intensity="zscore")])(dict(sample))
    got = pipe(dict(sample))
    assert set(got) == set(want)
    for key in want:
        if hasattr(want[key], "shape"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
            assert tuple(got["image_brain"].shape[-3:]) == (8, 8, 4)
        else:
            assert got[key] == want[key]


def test_petct_intensity_is_the_two_scalings_it_replaces() -> None:
    """CT window and PET SUV range, clipped to [0, 1]: checked against the closed form at the shipped settings."""
    import torch

    from medfm.data.cache import transform_state_hash
    from medfm.transforms import PETCTIntensityd

    ct = torch.tensor([[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]])
    pet = torch.tensor([[-1.0, 0.0, 5.0, 10.0, 20.0, 40.0]])
    out = PETCTIntensityd([-1000, 1000], 20)({"ct": ct, "pet": pet, "other": 7})
    torch.testing.assert_close(torch.as_tensor(out["ct"]), torch.tensor([[0.0, 0.0, 0.5, 0.75, 1.0, 1.0]]))
    torch.testing.assert_close(torch.as_tensor(out["pet"]), torch.tensor([[0.0, 0.0, 0.25, 0.5, 1.0, 1.0]]))
    assert out["other"] == 7
    # the cache hash of a pipeline holding the step follows its settings
    settings = [([-1000, 1000], 20), ([-500, 1000], 20), ([-1000, 1000], 10)]
    hashes = {transform_state_hash(Compose([PETCTIntensityd(w, s)])) for w, s in settings}
    assert len(hashes) == 3
    for bad in ({"ct_window": [1000, -1000], "pet_suv_max": 20}, {"ct_window": [0], "pet_suv_max": 20},
                {"ct_window": [-1000, 1000], "pet_suv_max": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            PETCTIntensityd(**bad)
