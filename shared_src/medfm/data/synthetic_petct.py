"""Synthetic whole-body PET/CT cases written in the AutoPET III nnU-Net layout (demo and test data).

Each case is a coarse, vectorised phantom of a person lying supine: body outline (legs, pelvis, abdomen,
thorax, neck, head), subcutaneous fat, soft tissue, lungs, heart, liver, spleen, kidneys, bladder, bones,
brain, salivary glands and lymph-node stations (small soft-tissue nodes in fat pads), with tracer-specific
uptake (FDG or PSMA), 0-4 lesions and noise. The structure mirrors what PET/CT pre-training exploits:

- every organ has a CT density and a PET uptake, so anatomy seen in CT predicts much of the PET image;
- lesions are hot in PET and at most faint in CT (a tenth of the way from the host tissue towards soft
  tissue density), so they are mainly a PET finding;
- lesions sit inside host tissues that CT shows (lymph nodes, lung, liver, spleen, bone, subcutaneous fat),
  with diagnosis-specific sites (lymphoma: nodes, spleen, marrow; melanoma: skin, nodes, lung, liver; lung
  cancer: lung, then mediastinal/hilar nodes, bone, liver; prostate cancer: pelvis, then nodes and bone);
- the tracer sets the organ pattern (FDG: brain, heart, bladder; PSMA: salivary glands, kidneys, liver,
  spleen, bladder), and age lowers bone density and FDG brain uptake. The files are
exactly what :func:`medfm.data.autopet.build_autopet_datalist` reads, so the demo and real data share one
path. Array axes: X = patient left -> right, Y = posterior -> anterior, Z = inferior -> superior (feet ->
head); the affine is ``diag(spacing)`` in RAS+ world coordinates, isocentre at X = Y = 0 and the top slice at
Z = 0 as on a PET/CT scanner table.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .autopet import CT_CHANNEL, PET_CHANNEL, find_petct_images
from .nifti import save_nifti
from .synthetic_shapes import axes_grid, ellipsoid_r2, random_voxel

__all__ = [
    "generate_synthetic_petct", "ensure_demo_petct", "ORGAN_LABELS", "DIAGNOSES",
    "DIAPHRAGM_HEIGHT_FRACTION", "DEFAULT_SHAPE", "DEFAULT_SPACING",
]  # fmt: skip

DEFAULT_SHAPE = (96, 64, 192)  # 48 x 32 x 192 cm field of view at the default spacing
DEFAULT_SPACING = (5.0, 5.0, 10.0)  # mm
DIAPHRAGM_HEIGHT_FRACTION = 0.70  # diaphragm level as a fraction of body height above the soles
DIAGNOSES = ("melanoma", "lymphoma", "lung cancer", "prostate cancer", "negative")
ORGAN_LABELS = {
    "air": 0, "fat": 1, "soft_tissue": 2, "lung": 3, "heart": 4, "liver": 5, "spleen": 6, "kidney": 7,
    "bone": 8, "brain": 9, "bladder": 10, "salivary_gland": 11, "lymph_node": 12,
}  # fmt: skip

# Outlines: height fraction -> half-width / half-depth in mm (reference habitus, scaled per case).
_TORSO_H = np.array([0.46, 0.50, 0.56, 0.62, 0.70, 0.78, 0.82, 0.845])
_TORSO_A = np.array([140.0, 170, 165, 150, 155, 170, 190, 120])
_TORSO_B = np.array([100.0, 110, 115, 115, 115, 115, 105, 80])
_LEG_H = np.array([0.01, 0.10, 0.25, 0.28, 0.45, 0.49])
_LEG_R = np.array([40.0, 40, 55, 50, 80, 85])
_SPINE_H, _SPINE_V = np.array([0.50, 0.70, 0.83, 0.87]), np.array([-65.0, -75, -60, -25])
# Organs: (code, centre (u mm, v mm, height fraction), semi-axes (mm, mm, fraction of height), side), with
# side +1 / -1 clipping the organ above / below the diaphragm. u > 0 is the patient's right (RAS).
_ORGANS = [
    (3, (-80, -10, 0.712), (62, 80, 0.125), 1), (3, (80, -10, 0.712), (62, 80, 0.125), 1),  # lungs
    (4, (-25, 25, 0.735), (55, 45, 0.035), 1),  # heart, left of midline
    (5, (65, 5, 0.665), (85, 70, 0.045), -1),  # liver, right
    (6, (-80, -35, 0.675), (30, 40, 0.03), -1),  # spleen, left
    (7, (-65, -50, 0.625), (28, 25, 0.032), -1), (7, (65, -50, 0.625), (28, 25, 0.032), -1),  # kidneys
    (10, (0, 30, 0.51), (40, 35, 0.02), -1),  # bladder
    (8, (-105, -20, 0.56), (15, 45, 0.035), 0), (8, (105, -20, 0.56), (15, 45, 0.035), 0),  # iliac wings
]  # fmt: skip
_GLANDS = [
    (11, (-42, 0, 0.888), (12, 18, 0.012), 0), (11, (42, 0, 0.888), (12, 18, 0.012), 0),  # parotids
    (11, (-30, 35, 0.866), (11, 11, 0.008), 0), (11, (30, 35, 0.866), (11, 11, 0.008), 0),  # submandibular
]  # fmt: skip
# Lymph-node stations: (centre, fat-pad semi-axes) as above; each pad holds 2-3 nodes. Cervical, axillary,
# mediastinal (above the heart), para-aortic, common iliac and inguinal.
_NODE_STATIONS = [
    ((-35, -5, 0.855), (16, 16, 0.018)), ((35, -5, 0.855), (16, 16, 0.018)),
    ((-135, -20, 0.79), (18, 28, 0.022)), ((135, -20, 0.79), (18, 28, 0.022)),
    ((0, 15, 0.785), (20, 22, 0.022)),
    ((0, -33, 0.60), (22, 12, 0.045)),
    ((-45, -15, 0.535), (16, 16, 0.022)), ((45, -15, 0.535), (16, 16, 0.022)),
    ((-75, 45, 0.49), (18, 16, 0.016)), ((75, 45, 0.49), (18, 16, 0.016)),
]  # fmt: skip
# Lesion sites per diagnosis: host -> weight, for the first lesion and for the others. "skin" is the
# subcutaneous fat layer; "pelvis" is soft tissue low in the pelvis near the midline (prostate bed).
_SITES = {
    "lymphoma": ({"node": 1.0}, {"node": 0.6, "spleen": 0.2, "bone": 0.2}),
    "melanoma": ({"skin": 0.6, "node": 0.4}, {"skin": 0.3, "node": 0.3, "lung": 0.2, "liver": 0.2}),
    "lung cancer": ({"lung": 1.0}, {"node": 0.4, "bone": 0.3, "liver": 0.2, "lung": 0.1}),
    "prostate cancer": ({"pelvis": 1.0}, {"node": 0.5, "bone": 0.5}),
}
_HOST_CODES = {"node": 12, "lung": 3, "liver": 5, "spleen": 6, "bone": 8, "skin": 1, "pelvis": 2}


def _ellipsoid_r2(uu: np.ndarray, vv: np.ndarray, hh: np.ndarray, centre: Sequence[float],
                  semi: Sequence[float]) -> np.ndarray:  # fmt: skip
    """Normalised squared radius of an axis-aligned ellipsoid, shape ``(nx, ny, nz)``; inf outside its box."""
    r2 = np.full((uu.size, vv.size, hh.size), np.inf, dtype=np.float32)
    box = []
    for axis, c, s in zip((uu, vv, hh), centre, semi):
        idx = np.flatnonzero(np.abs(axis - c) <= s)
        if idx.size == 0:
            return r2
        box.append(slice(idx[0], idx[-1] + 1))
    r2[tuple(box)] = ellipsoid_r2(axes_grid([a[b] for a, b in zip((uu, vv, hh), box)]), centre, semi)
    return r2


def _elliptic_slabs(uu: np.ndarray, vv: np.ndarray, cu: Any, cv: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of per-slice ellipses (centre ``cu, cv``, semi-axes ``a, b``, each scalar or shape ``(nz,)``)."""
    a, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
    on = (a > 0) & (b > 0)
    a_s, b_s = np.where(on, a, 1.0), np.where(on, b, 1.0)
    r2 = ellipsoid_r2((uu[:, None, None], vv[None, :, None]), (cu, cv), (a_s, b_s))
    return (r2 <= 1.0) & on[None, None, :]


def _erode(mask: np.ndarray) -> np.ndarray:
    """6-neighbour binary erosion; voxels on the array border are never kept."""
    out = mask.copy()
    for axis in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        out[tuple(hi)] &= mask[tuple(lo)]
        out[tuple(lo)] &= mask[tuple(hi)]
        edge = [slice(None)] * 3
        edge[axis] = [0, -1]
        out[tuple(edge)] = False
    return out


def _smooth(vol: np.ndarray, spacing: Sequence[float], sigma_mm: float = 3.0) -> np.ndarray:
    """PET resolution: per axis a 3-tap kernel ``[w, 1 - 2w, w]`` of std ``sigma_mm`` (``w <= 1/4``)."""
    for axis, step in enumerate(spacing):
        w = min(0.25, 0.5 * (sigma_mm / step) ** 2)
        p = np.pad(vol, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = vol.shape[axis]
        vol = w * p.take(range(0, n), axis) + (1 - 2 * w) * vol + w * p.take(range(2, n + 2), axis)
    return vol


def _tissue_values(rng: np.random.Generator, tracer: str, age: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-case HU and SUV lookup tables indexed by organ code, shapes ``(13,)``; bone density and FDG
    brain uptake fall with age."""
    u = rng.uniform
    hu = [-1000, -100, 40, -800, 40, 60, 50, 30, u(500, 750) - 2.5 * (age - 20), 35, 10, 40, 40]
    if tracer == "PSMA":  # brain low; kidneys, salivary glands, liver and bladder high
        suv = [0, 0.2, 0.5, 0.3, u(1.2, 2), u(4, 6), u(3, 5), u(20, 40), 0.8, u(0.2, 0.5), u(10, 30), u(12, 20),
               u(0.5, 0.8)]  # fmt: skip
    else:  # FDG: brain and bladder high, heart variable
        brain = u(9, 11) * (1 - 0.003 * (age - 20))
        suv = [0, 0.35, u(0.8, 1), 0.4, u(2, 6), u(2, 2.5), u(1.6, 2), u(4, 8), 1.0, brain, u(10, 30), u(1.5, 2),
               u(0.9, 1.3)]  # fmt: skip
    return np.asarray(hu, np.float32), np.asarray(suv, np.float32)


def _make_case(
    rng: np.random.Generator, diagnosis: str, shape: Sequence[int], spacing: Sequence[float], noise: bool = True
) -> dict:
    """Draw one case.

    Args:
        rng: the case's random generator.
        diagnosis: one of :data:`DIAGNOSES`; sets tracer, sex/age range and lesion sites.
        shape: array shape ``(X, Y, Z)``.
        spacing: voxel size in mm.
        noise: add the CT and PET noise (drawn last, so a case without noise is otherwise the same).

    Returns:
        ``{"meta", "affine", "ct", "pet", "label", "organs"}``: metadata dict, ``(4, 4)`` affine, CT (int16 HU),
        PET (float32 SUV), lesion mask and organ map (uint8), all of shape ``shape``.
    """
    nx, ny, nz = shape
    sx, sy, sz = spacing
    sex = "M" if diagnosis == "prostate cancer" else str(rng.choice(["M", "F"]))
    age = int(rng.integers(50 if diagnosis == "prostate cancer" else 20, 86))
    tracer = "PSMA" if diagnosis == "prostate cancer" else "FDG"
    height = rng.uniform(1680, 1900) if sex == "M" else rng.uniform(1580, 1780)
    habitus = rng.uniform(0.9, 1.1)
    # shrink the person uniformly if the field of view is too small for them
    s = min(1.0, (nz - 2) * sz / height, (nx - 2) * sx / (2 * (190 * habitus + 15)),
            (ny - 2) * sy / (2 * (120 * habitus + 10)))  # fmt: skip
    H, k = height * s, habitus * s  # body height, transverse scale
    fat = (rng.uniform(15, 35) if sex == "F" else rng.uniform(8, 25)) * s
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) * sz)
    xx, yy, zz = (affine[a, 3] + np.arange(n) * affine[a, a] for a, n in enumerate(shape))
    uu, vv = xx - rng.uniform(-15, 15) * s, yy - rng.uniform(-10, 10) * s
    hh = zz - (zz[0] + sz + rng.uniform(0, max((nz - 2) * sz - H, 0.0)))  # height above the soles
    hf = hh / H

    def interp(xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
        return np.interp(hf, xp, fp, left=0.0, right=0.0)

    ta, tb = interp(_TORSO_H, _TORSO_A) * k, interp(_TORSO_H, _TORSO_B) * k
    leg_r, leg_c = interp(_LEG_H, _LEG_R) * k, np.interp(hf, [0.01, 0.49], [75.0, 85.0]) * k
    neck = ((hf >= 0.83) & (hf <= 0.885)).astype(float) * k
    head_c, head_s = (0.0, 5 * k, 0.935 * H), (75 * k, 95 * k, 0.065 * H)
    body, inner = (
        _elliptic_slabs(uu, vv, 0.0, 0.0, ta - d, tb - d)
        | _elliptic_slabs(uu, vv, -leg_c, 0.0, leg_r - 0.7 * d, 1.05 * leg_r - 0.7 * d)
        | _elliptic_slabs(uu, vv, leg_c, 0.0, leg_r - 0.7 * d, 1.05 * leg_r - 0.7 * d)
        | _elliptic_slabs(uu, vv, 0.0, -10 * k, 55 * neck - 0.5 * d, 58 * neck - 0.5 * d)
        | (_ellipsoid_r2(uu, vv, hh, head_c, [x - 0.2 * d for x in head_s]) <= 1)
        for d in (0.0, fat)
    )
    organ = np.zeros(shape, np.uint8)
    organ[body] = ORGAN_LABELS["fat"]
    organ[inner] = ORGAN_LABELS["soft_tissue"]
    above = (hh >= DIAPHRAGM_HEIGHT_FRACTION * H)[None, None, :]
    brain_c, brain_s = (0.0, 5 * k, 0.945 * H), (64 * k, 84 * k, 0.05 * H)
    spine_on, long_on = (hf >= 0.5) & (hf <= 0.87), (hf >= 0.04) & (hf <= 0.49)
    bones = (
        _elliptic_slabs(uu, vv, 0.0, interp(_SPINE_H, _SPINE_V) * k, 18 * k * spine_on, 16 * k * spine_on)
        | _elliptic_slabs(uu, vv, -leg_c, 0.0, 14 * k * long_on, 14 * k * long_on)
        | _elliptic_slabs(uu, vv, leg_c, 0.0, 14 * k * long_on, 14 * k * long_on)
        | (_ellipsoid_r2(uu, vv, hh, brain_c, [x + 7 * s for x in brain_s]) <= 1)  # skull (brain drawn over it)
    )

    def place(entries: list) -> None:
        for code, (cu, cv, ch), (a, b, c), side in entries:
            jit = rng.uniform(0.9, 1.1, 3)
            du, dv, dh = rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-0.008, 0.008)
            centre = (k * (cu + du), k * (cv + dv), H * (ch + dh))
            mask = _ellipsoid_r2(uu, vv, hh, centre, (a * k * jit[0], b * k * jit[1], c * H * jit[2])) <= 1
            mask &= above if side > 0 else ~above if side < 0 else True
            organ[mask & inner] = code

    place(_ORGANS)
    organ[bones & inner] = ORGAN_LABELS["bone"]
    organ[(_ellipsoid_r2(uu, vv, hh, brain_c, brain_s) <= 1) & inner] = ORGAN_LABELS["brain"]
    place(_GLANDS)
    soft = np.isin(organ, (ORGAN_LABELS["fat"], ORGAN_LABELS["soft_tissue"])) & inner
    for (cu, cv, ch), (a, b, c) in _NODE_STATIONS:  # fat pads, then 2-3 nodes inside each
        centre, semi = (k * cu, k * cv, H * ch), (a * k, b * k, c * H)
        pad = (_ellipsoid_r2(uu, vv, hh, centre, semi) <= 1) & soft
        organ[pad] = ORGAN_LABELS["fat"]
        for _ in range(int(rng.integers(2, 4))):
            nc = [x + f * rng.uniform(-0.5, 0.5) for x, f in zip(centre, semi)]
            ns = (rng.uniform(9, 13) * s, rng.uniform(9, 13) * s, rng.uniform(12, 18) * s)
            organ[(_ellipsoid_r2(uu, vv, hh, nc, ns) <= 1) & pad] = ORGAN_LABELS["lymph_node"]

    hu, suv = _tissue_values(rng, tracer, age)
    ct, pet = hu[organ], _smooth(suv[organ], spacing)
    label = np.zeros(shape, bool)
    if diagnosis != "negative":
        eligible = _erode(body) & ((hf >= 0.45) & (hf <= 0.87))[None, None, :]
        hosts = {name: eligible & (organ == code) for name, code in _HOST_CODES.items()}
        hosts["skin"] &= ~inner  # subcutaneous fat, not the fat pads of the nodes
        hosts["pelvis"] &= (hf < 0.53)[None, None, :] & (np.abs(uu) < 40 * k)[:, None, None]
        # advanced (both sides of the diaphragm) half the time, so staging is balanced among lesion cases
        advanced = bool(rng.random() < 0.5)
        n_lesions = int(rng.integers(2 if advanced else 1, 5))
        first = {"lung cancer": True, "prostate cancer": False}.get(diagnosis, bool(rng.random() < 0.5))
        rest = list(rng.random(n_lesions - 2) < 0.5) if advanced else [first] * (n_lesions - 1)
        sides = [first] + ([not first] if advanced else []) + rest
        liver_suv = float(suv[ORGAN_LABELS["liver"]])
        for j, side in enumerate(sides):
            weights = _SITES[diagnosis][0 if j == 0 else 1]
            allowed = {h: hosts[h] & (above if side else ~above) for h in _SITES[diagnosis][1] | weights}
            names = [h for h in weights if allowed[h].any()] or [h for h in allowed if allowed[h].any()]
            if not names:
                continue
            p = np.array([weights.get(h, 1.0) for h in names])
            host = names[int(rng.choice(len(names), p=p / p.sum()))]
            ci = random_voxel(rng, allowed[host])
            semi = rng.uniform(8, 22) * s * rng.uniform(0.8, 1.2, 3)
            r2 = _ellipsoid_r2(uu, vv, hh, (uu[ci[0]], vv[ci[1]], hh[ci[2]]), semi)
            parts, _ = ndimage.label((r2 <= 1) & allowed[host])
            m = parts == parts[ci]  # the part of the ellipsoid inside the host that holds its centre
            peak = rng.uniform(max(4.0, 2.5 * liver_suv), max(15.0, 4 * liver_suv))
            pet[m] = np.maximum(pet[m], peak * (1 - 0.2 * r2[m]))
            ct[m] += 0.1 * (hu[ORGAN_LABELS["soft_tissue"]] - ct[m])  # faint in CT
            label |= m
    stage = int(label[..., above[0, 0]].any() and label[..., ~above[0, 0]].any())
    on = float(noise)
    ct = ct + on * rng.standard_normal(shape, dtype=np.float32) * 12.0
    pet = pet * (1 + on * rng.uniform(0.08, 0.15) * rng.standard_normal(shape, dtype=np.float32))
    meta = {"tracer": tracer, "diagnosis": diagnosis, "age": age, "sex": sex, "stage": stage}
    return {
        "meta": meta, "affine": affine, "organs": organ, "label": label.astype(np.uint8),
        "ct": np.clip(np.rint(ct), -1024, 3071).astype(np.int16), "pet": np.clip(pet, 0, None).astype(np.float32),
    }  # fmt: skip


def generate_synthetic_petct(
    out_dir: str,
    num_cases: int = 8,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    write_organs: bool = False,
    overwrite: bool = False,
    noise: bool = True,
) -> list[str]:
    """Write synthetic whole-body PET/CT cases in the AutoPET III nnU-Net layout.

    Writes ``imagesTr/<case>_0000.nii.gz`` (CT, int16 HU), ``imagesTr/<case>_0001.nii.gz`` (PET, float32
    SUV), ``labelsTr/<case>.nii.gz`` (uint8 lesion mask) and ``metadata.csv`` (columns ``case, tracer,
    diagnosis, age, sex, stage``), all volumes of shape ``shape`` on one grid. ``stage`` is 1 when lesions lie
    both above and below the diaphragm (the first slice at or above ``DIAPHRAGM_HEIGHT_FRACTION`` of the body
    height, which is also the lung base), else 0. Diagnoses cycle through :data:`DIAGNOSES` from a
    seed-dependent start. Case ``i`` depends only on ``seed``, ``i``, ``shape`` and ``spacing``.

    Args:
        out_dir: dataset root (created if needed).
        num_cases: number of cases, named ``demo_000``, ``demo_001``, ...
        shape: array shape ``(X, Y, Z)``; a person who does not fit the field of view is shrunk to fit.
        spacing: voxel size in mm along ``(X, Y, Z)``.
        seed: random seed; the output is deterministic for a seed.
        write_organs: also write the organ map ``organsTr/<case>.nii.gz`` (codes in :data:`ORGAN_LABELS`).
        overwrite: replace existing files instead of raising.
        noise: add CT and PET noise; False writes the same cases without it (e.g. clean reconstruction targets).

    Returns:
        The case ids written.

    Raises:
        ValueError: invalid ``num_cases``, ``shape`` or ``spacing``.
        FileExistsError: a file to write already exists and ``overwrite`` is False.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {tuple(shape)}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {tuple(spacing)}.")
    shape, spacing = tuple(int(n) for n in shape), tuple(float(x) for x in spacing)
    cases = [f"demo_{i:03d}" for i in range(num_cases)]
    dirs = {d: os.path.join(out_dir, d) for d in ("imagesTr", "labelsTr", "organsTr")}
    paths = {
        c: {
            "ct": os.path.join(dirs["imagesTr"], f"{c}_{CT_CHANNEL}.nii.gz"),
            "pet": os.path.join(dirs["imagesTr"], f"{c}_{PET_CHANNEL}.nii.gz"),
            "label": os.path.join(dirs["labelsTr"], f"{c}.nii.gz"),
            **({"organs": os.path.join(dirs["organsTr"], f"{c}.nii.gz")} if write_organs else {}),
        }
        for c in cases
    }
    metadata_path = os.path.join(out_dir, "metadata.csv")
    if not overwrite:
        for path in [metadata_path] + [p for c in cases for p in paths[c].values()]:
            if os.path.exists(path):
                raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    for key in ("imagesTr", "labelsTr") + (("organsTr",) if write_organs else ()):
        os.makedirs(dirs[key], exist_ok=True)
    offset = int(np.random.default_rng(seed).integers(len(DIAGNOSES)))
    rows = []
    for i, (case, child) in enumerate(zip(cases, np.random.SeedSequence(seed).spawn(num_cases))):
        data = _make_case(np.random.default_rng(child), DIAGNOSES[(offset + i) % len(DIAGNOSES)], shape, spacing,
                          noise)  # fmt: skip
        for key, path in paths[case].items():
            save_nifti(data[key], data["affine"], path)
        rows.append({"case": case, **data["meta"]})
    with open(metadata_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "tracer", "diagnosis", "age", "sex", "stage"])
        writer.writeheader()
        writer.writerows(rows)
    return cases


def ensure_demo_petct(dataset_dir: str, num_cases: int = 8, seed: int = 0, **kw: Any) -> str:
    """Return a PET/CT dataset directory, generating the synthetic demo there if it does not exist.

    Args:
        dataset_dir: dataset root.
        num_cases: cases to generate when the directory does not exist.
        seed: generator seed.
        **kw: further arguments of :func:`generate_synthetic_petct` (``shape``, ``spacing``, ...).

    Returns:
        ``dataset_dir``, untouched if it already held PET/CT cases.

    Raises:
        ValueError: ``dataset_dir`` exists but holds no PET/CT case (never written into).
    """
    if not os.path.exists(dataset_dir):
        generate_synthetic_petct(dataset_dir, num_cases=num_cases, seed=seed, **kw)
        return dataset_dir
    ct, pet = find_petct_images(dataset_dir) if os.path.isdir(dataset_dir) else ({}, {})
    if not ct and not pet:
        raise ValueError(
            f"{dataset_dir} exists but holds no PET/CT cases; refusing to generate demo data into an existing "
            "directory (a dataset has imagesTr/<case>_0000.nii[.gz] and imagesTr/<case>_0001.nii[.gz])."
        )
    return dataset_dir
