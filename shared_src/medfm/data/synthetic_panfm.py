"""Synthetic pan-organ demo for Pan-FM in the subject-table layout of :func:`medfm.data.panfm.read_subject_table`.

Synthetic demo (:func:`generate_synthetic_panfm`). Per subject ``i`` (own random stream):

- Attributes: ``age ~ U(40, 80)``, ``sex`` F/M with equal odds, ``bmi = clip(27 + 4.5 N(0, 1), 17, 45)``;
  ``a = (age - 60) / 11.5``, ``b = (bmi - 27) / 4.5``, ``s = +1`` male / ``-1`` female, ``e_j ~ N(0, 1)``.
- Latent disease factors (about unit variance): ``f_met = 0.7 b + 0.7 e1``;
  ``f_card = 0.5 a + 0.3 f_met + 0.2 s + 0.75 e2``; ``f_ren = 0.35 a + 0.3 f_met + 0.85 e3``;
  ``f_hep = 0.45 f_met + 0.85 e4``.
- Labels (:data:`PANFM_DEMO_LABELS`): liability ``L_k = f_k + 0.4 e_k'`` (``e_k'`` never imaged); the
  ``round(p_k N)`` subjects with the highest ``L_k`` are positive (kept within ``[1, N - 1]``), with
  prevalence ``p = metabolic 0.40, cardiac 0.30, renal 0.25, hepatic 0.30``.
- Images: smooth anatomy (soft-edged ellipsoids and tubes, low-frequency texture) drawn in a normalised
  ``[-1, 1]^3`` field of view, so any ``organ_shapes`` shows the same anatomy; then a gain ``U(0.9, 1.1)``,
  a 5% bias field, magnitude noise ``|x + 0.03 N(0, 1)|`` and rounding to 1/4096. Shapes and spacings are
  organ-specific (:data:`DEFAULT_ORGAN_SHAPES`, :data:`DEFAULT_ORGAN_SPACINGS`). What each organ shows, with
  ``s_A = 0.9 f_met + 0.4 f_card`` and ``s_H = 0.9 f_card + 0.4 f_met``:

  - adipose, DOMINANT (strong, easy; metabolic and cardiac): abdominal slab, subcutaneous-fat thickness
    ``0.12 + 0.045 s_A`` and visceral-fat fraction ``0.25 + 0.12 s_A`` (bright fat on darker muscle).
  - heart, DOMINANT (strong, easy; cardiac and metabolic): left-ventricular wall thickness
    ``0.2 + 0.05 s_H`` and blood-pool signal ``0.4 + 0.12 s_H`` (wall 0.9); a fixed bright chest-wall fat
    band sets the upper intensity percentile.
  - liver (subtle; metabolic, hepatic): parenchyma ``0.55 + 0.04 f_met``; ``Poisson(max(0, 0.9 f_hep +
    0.2))`` small hypo-intense lesions (at most 6).
  - kidney (subtle; renal): medulla fraction ``0.7 + 0.06 f_ren`` (thinner cortex); a dark cyst with
    probability ``sigmoid(1.2 f_ren - 1.5)``.
  - spleen (weak; hepatic): size ``x (1 + 0.07 f_hep)``. pancreas (weak; metabolic): fat-lobule fraction
    ``0.15 + 0.06 f_met``.
  - brain (weak; age, cardiac): ventricle size ``x (1 + 0.3 a + 0.1 f_card)``; ``Poisson(max(0,
    1 + 0.9 f_card + 0.4 a))`` bright white-matter lesions (at most 8).

- Missingness NOT at random: organ ``o`` is missing with probability ``sigmoid(z_o)``: brain
  ``-2.0 + 1.2 a + 0.3 f_card`` (older subjects), heart ``-2.4 + 0.5 f_card``, adipose ``-2.6 + 0.5 b``,
  liver ``-2.2 + 0.4 f_hep``, kidney ``-2.4 + 1.4 f_ren`` (kidney disease), spleen ``-1.8 + 0.3 a``,
  pancreas ``-1.6 + 0.8 b`` (high BMI). Then, in order: a subject left with no organ keeps the organ with
  the lowest missing probability; if no subject has all seven, the first subject with the most organs gets
  all seven; if no other subject has exactly one, the first other subject with the fewest organs keeps only
  its present organ with the lowest missing probability.

- Organ variation (``organ_variation``, default 1 for every organ: the cohort above): an organ with factor
  ``v < 1`` is saved as ``T + v (x - T)``, where ``x`` is the subject's image and ``T`` the organ's template, the
  same organ rendered (with gain, bias field and noise) for a reference subject with every latent factor and the
  age term at 0, from a stream of its own. ``v = 0`` shows every subject the same image of that organ; ``v`` in
  between keeps the organ's disease signs and its anatomical variation at ``v`` times their size. Labels,
  attributes and missingness do not depend on it.

Files: ``subjects.csv`` (subject, organ paths, label columns), ``attributes.csv`` (subject, age, sex, bmi;
kept apart so attributes are never read as labels) and ``organs/<subject>_<organ>.nii.gz`` (float32, affine
``diag(spacing)`` centred on the origin).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import expit

from .nifti import save_nifti
from .panfm import ORGANS, PANFM_TABLE
from .synthetic_shapes import centred_affine, smooth_field, soft_ellipsoid, unit_grid

__all__ = [
    "DEFAULT_ORGAN_SHAPES", "DEFAULT_ORGAN_SPACINGS", "PANFM_DEMO_LABELS", "ensure_demo_panfm",
    "generate_synthetic_panfm",
]  # fmt: skip

PANFM_DEMO_LABELS = ("metabolic", "cardiac", "renal", "hepatic")
DEFAULT_ORGAN_SHAPES = {
    "brain": (40, 48, 40), "heart": (32, 32, 24), "adipose": (48, 32, 16), "liver": (36, 36, 24),
    "kidney": (24, 24, 20), "spleen": (24, 20, 20), "pancreas": (28, 16, 16),
}  # fmt: skip
DEFAULT_ORGAN_SPACINGS = {
    "brain": (1.5, 1.5, 1.5), "heart": (2.0, 2.0, 2.0), "adipose": (3.0, 3.0, 6.0), "liver": (2.5, 2.5, 3.0),
    "kidney": (1.5, 1.5, 2.0), "spleen": (2.0, 2.0, 2.5), "pancreas": (1.2, 1.2, 2.0),
}  # fmt: skip
_PREVALENCE = {"metabolic": 0.40, "cardiac": 0.30, "renal": 0.25, "hepatic": 0.30}


# ------------------------------------------------------------------------------------------ synthetic demo
def _mix(img: np.ndarray, mask: np.ndarray, value: Any) -> np.ndarray:
    """Paint ``value`` into ``img`` with soft ``mask``."""
    return img * (1 - mask) + value * mask


# Organ renderers: (random stream, normalised grid, array shape, latent factors f_k, standardised age a) -> volume
_Shape = Sequence[int]
_Factors = Mapping[str, float]


def _brain(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j, k = rng.uniform(-0.04, 0.04, 3), rng.uniform(0.93, 1.05)
    head = (0.86 * k, 0.92 * k, 0.86 * k)
    img = 0.7 * soft_ellipsoid(g, j, head)  # scalp
    img = _mix(img, soft_ellipsoid(g, j, [0.93 * x for x in head]), 0.25)  # skull
    grey = 0.55 + 0.03 * smooth_field(rng, shape, 6)
    img = _mix(img, soft_ellipsoid(g, j, [0.86 * x for x in head]), grey)  # grey matter
    img = _mix(img, soft_ellipsoid(g, j, [0.6 * x for x in head]), 0.8)  # white matter
    v = float(np.clip(1 + 0.3 * a + 0.1 * f["cardiac"], 0.6, 2.0))
    for side in (-1, 1):
        img = _mix(img, soft_ellipsoid(g, j + (side * 0.12, 0.05, 0.05), (0.08 * v, 0.25 * v, 0.12 * v)), 0.15)
    for _ in range(min(int(rng.poisson(max(0.0, 1 + 0.9 * f["cardiac"] + 0.4 * a))), 8)):
        c = j + rng.uniform(-0.35, 0.35, 3)
        img = img + 0.25 * soft_ellipsoid(g, c, [rng.uniform(0.05, 0.09)] * 3)
    return img


def _heart(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j, k = rng.uniform(-0.04, 0.04, 3), rng.uniform(0.97, 1.03)
    s = 0.9 * f["cardiac"] + 0.4 * f["metabolic"]
    wall = float(np.clip(0.2 + 0.05 * s, 0.06, 0.4))
    pool = float(np.clip(0.4 + 0.12 * s, 0.1, 0.75))  # blood-pool signal (relative to the bright wall)
    outer = (0.62 * k, 0.62 * k, 0.8 * k)
    img = 0.12 + 0.04 * smooth_field(rng, shape)  # lungs, mediastinum
    img = _mix(img, expit((g[1] - 0.78) * shape[1]).astype(np.float32), 1.0)  # anterior chest-wall fat
    img = _mix(img, soft_ellipsoid(g, j + (-0.55, 0.1, 0), (0.3, 0.5, 0.6)), 0.35)  # right ventricle
    img = _mix(img, soft_ellipsoid(g, j, outer), 0.9)  # myocardium
    return _mix(img, soft_ellipsoid(g, j, [x - wall for x in outer]), pool)  # left-ventricular blood pool


def _adipose(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    s = 0.9 * f["metabolic"] + 0.4 * f["cardiac"]
    t_sc = float(np.clip(0.12 + 0.045 * s, 0.03, 0.3))
    vf = float(np.clip(0.25 + 0.12 * s, 0.02, 0.7))
    k = rng.uniform(0.93, 1.0)
    flat = [g[0], g[1], np.zeros_like(g[2])]  # an abdominal slab: the same outline on every slice
    body, inner = (soft_ellipsoid(flat, (0, 0, 0), (0.95 * k - t, 0.9 * k - t, 1.0)) for t in (0.0, t_sc))
    field = smooth_field(rng, shape, 6)
    visceral = expit((field - np.quantile(field, 1 - vf)) * 8).astype(np.float32)
    img = _mix(body, inner, 0.35)  # subcutaneous fat (1.0) over the muscle wall
    img = _mix(img, soft_ellipsoid(flat, (0, 0, 0), (0.95 * k - t_sc - 0.06, 0.9 * k - t_sc - 0.06, 1.0)),
               0.3 + 0.65 * visceral)  # fmt: skip
    return _mix(img, soft_ellipsoid(flat, (0, -0.6 * k, 0), (0.12, 0.12, 1.0)), 0.1)  # spine


def _liver(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j, k = rng.uniform(-0.05, 0.05, 3), rng.uniform(0.92, 1.05)
    liver = soft_ellipsoid(g, j + (0.1, 0, 0), (0.8 * k, 0.7 * k, 0.75 * k))
    img = _mix(0.12 + 0.03 * smooth_field(rng, shape), liver, 0.55 + 0.04 * f["metabolic"])
    for _ in range(3):  # portal and hepatic vessels
        c, semi = j + rng.uniform(-0.3, 0.3, 3), [0.05, 0.05, 0.05]
        semi[int(rng.integers(3))] = 0.5
        img = _mix(img, soft_ellipsoid(g, c, semi) * liver, 0.3)
    for _ in range(min(int(rng.poisson(max(0.0, 0.9 * f["hepatic"] + 0.2))), 6)):
        img = img - 0.15 * soft_ellipsoid(g, j + rng.uniform(-0.45, 0.45, 3), [rng.uniform(0.07, 0.12)] * 3) * liver
    return img


def _kidney(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j, k = rng.uniform(-0.05, 0.05, 3), rng.uniform(0.92, 1.06)
    semi = (0.5 * k, 0.7 * k, 0.85 * k)
    medulla = float(np.clip(0.7 + 0.06 * f["renal"], 0.5, 0.88))  # inner fraction: thinner cortex when ill
    img = _mix(0.15 + 0.04 * smooth_field(rng, shape), soft_ellipsoid(g, j, semi), 0.75)
    img = _mix(img, soft_ellipsoid(g, j, [medulla * x for x in semi]), 0.45)
    img = _mix(img, soft_ellipsoid(g, j + (0.35 * k, 0, 0), (0.15, 0.2, 0.3)), 0.9)  # sinus fat at the hilum
    if rng.random() < expit(1.2 * f["renal"] - 1.5):
        img = _mix(img, soft_ellipsoid(g, j + rng.uniform(-0.3, 0.3, 3), [rng.uniform(0.12, 0.2)] * 3), 0.08)
    return img


def _spleen(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j = rng.uniform(-0.05, 0.05, 3)
    k = float(np.clip(1 + 0.07 * f["hepatic"], 0.8, 1.3)) * rng.uniform(0.95, 1.05)
    return _mix(0.2 + 0.04 * smooth_field(rng, shape), soft_ellipsoid(g, j, (0.55 * k, 0.65 * k, 0.65 * k)),
                0.6 + 0.04 * smooth_field(rng, shape, 5))  # fmt: skip


def _pancreas(rng: np.random.Generator, g: list[np.ndarray], shape: _Shape, f: _Factors, a: float) -> np.ndarray:
    j = rng.uniform(-0.05, 0.05, 3)
    centre = 0.3 * np.sin(np.pi * (g[0] - j[0]) / 2)  # a gently curved tube along X
    r = np.sqrt(((g[1] - centre - j[1]) / 0.35) ** 2 + ((g[2] - j[2]) / 0.4) ** 2 + (g[0] / 0.88) ** 8)
    gland = expit((1 - r) * 0.7 * shape[1]).astype(np.float32)
    field = smooth_field(rng, shape, 6)
    fat = float(np.clip(0.15 + 0.06 * f["metabolic"], 0.02, 0.5))
    lobules = expit((field - np.quantile(field, 1 - fat)) * 8).astype(np.float32)
    return _mix(0.15 + 0.03 * field, gland, 0.5 + 0.4 * lobules)


_RENDER = {"brain": _brain, "heart": _heart, "adipose": _adipose, "liver": _liver, "kidney": _kidney,
           "spleen": _spleen, "pancreas": _pancreas}  # fmt: skip


def _draw_subject(rng: np.random.Generator) -> dict[str, Any]:
    """Attributes, latent factors, label liabilities and organ missing probabilities of one subject."""
    age = float(rng.uniform(40, 80))
    sex = ("F", "M")[int(rng.integers(2))]
    bmi = float(np.clip(27 + 4.5 * rng.normal(), 17, 45))
    a, b, s = (age - 60) / 11.5, (bmi - 27) / 4.5, 1.0 if sex == "M" else -1.0
    e = rng.standard_normal(8)
    met = 0.7 * b + 0.7 * e[0]
    f = {"metabolic": met, "cardiac": 0.5 * a + 0.3 * met + 0.2 * s + 0.75 * e[1],
         "renal": 0.35 * a + 0.3 * met + 0.85 * e[2], "hepatic": 0.45 * met + 0.85 * e[3]}  # fmt: skip
    z = {"brain": -2.0 + 1.2 * a + 0.3 * f["cardiac"], "heart": -2.4 + 0.5 * f["cardiac"], "adipose": -2.6 + 0.5 * b,
         "liver": -2.2 + 0.4 * f["hepatic"], "kidney": -2.4 + 1.4 * f["renal"], "spleen": -1.8 + 0.3 * a,
         "pancreas": -1.6 + 0.8 * b}  # fmt: skip
    p_missing = np.array([expit(z[o]) for o in ORGANS])
    return {
        "age": age, "sex": sex, "bmi": bmi, "a": a, "f": f, "p_missing": p_missing,
        "liability": {k: f[k] + 0.4 * e[4 + n] for n, k in enumerate(PANFM_DEMO_LABELS)},
        "present": rng.random(len(ORGANS)) >= p_missing,
    }  # fmt: skip


def _fix_presence(subjects: list[dict[str, Any]]) -> None:
    """Every subject keeps one organ; the cohort gets a seven-organ and a one-organ subject (module doc)."""
    for sub in subjects:
        if not sub["present"].any():
            sub["present"][int(np.argmin(sub["p_missing"]))] = True
    counts = [int(sub["present"].sum()) for sub in subjects]
    full = next((n for n, c in enumerate(counts) if c == len(ORGANS)), None)
    if full is None:
        full = int(np.argmax(counts))
        subjects[full]["present"][:] = True
        counts[full] = len(ORGANS)
    if not any(c == 1 for n, c in enumerate(counts) if n != full):
        one = min((n for n in range(len(subjects)) if n != full), key=lambda n: (counts[n], n))
        sub = subjects[one]
        keep = int(np.argmin(np.where(sub["present"], sub["p_missing"], np.inf)))
        sub["present"][:] = False
        sub["present"][keep] = True


def _render(organ: str, rng: np.random.Generator, shape: Sequence[int], f: _Factors, a: float) -> np.ndarray:
    """One organ image: anatomy, then gain, bias field and magnitude noise (module doc), before rounding."""
    img = _RENDER[organ](rng, unit_grid(shape, -1.0, 1.0, np.float32), shape, f, a)
    img = img * rng.uniform(0.9, 1.1) * (1 + 0.05 * smooth_field(rng, shape, 3))  # gain and bias field
    return np.abs(img + 0.03 * rng.standard_normal(shape, dtype=np.float32))  # magnitude noise


def _check_variation(organ_variation: Mapping[str, float] | None) -> dict[str, float]:
    out = {o: 1.0 for o in ORGANS}
    for organ, v in (organ_variation or {}).items():
        if organ not in ORGANS:
            raise ValueError(f"organ_variation: unknown organ {organ!r}; organs are {ORGANS}.")
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"organ_variation[{organ!r}] must be in [0, 1], got {v}.")
        out[organ] = float(v)
    return out


def _save(array: np.ndarray, spacing: Sequence[float], path: str) -> None:
    save_nifti(array.astype(np.float32), centred_affine(array.shape, spacing), path)


def generate_synthetic_panfm(
    out_dir: str,
    num_subjects: int = 48,
    seed: int = 0,
    organ_shapes: Mapping[str, Sequence[int]] | None = None,
    overwrite: bool = False,
    organ_variation: Mapping[str, float] | None = None,
) -> str:
    """Write the synthetic pan-organ cohort (generative model, files: module doc).

    Args:
        out_dir: dataset root (created if needed).
        num_subjects: number of subjects (at least 2), named ``sub_000``, ``sub_001``, ...
        seed: random seed; the output is deterministic for a seed, shapes and ``num_subjects``.
        organ_shapes: per-organ array shape overriding :data:`DEFAULT_ORGAN_SHAPES` (e.g. tiny shapes for
            tests); spacings stay :data:`DEFAULT_ORGAN_SPACINGS`.
        overwrite: replace existing files instead of raising.
        organ_variation: organ -> factor in [0, 1] on its between-subject variation (module doc); organs not
            named keep 1 (the default cohort).

    Returns:
        Path of ``subjects.csv``.

    Raises:
        ValueError: ``num_subjects < 2``, a bad ``organ_shapes`` or ``organ_variation`` entry.
        FileExistsError: a file to write exists and ``overwrite`` is False.
    """
    if num_subjects < 2:
        raise ValueError(
            f"num_subjects must be at least 2 (a one-organ and a seven-organ subject), got {num_subjects}."
        )
    shapes = dict(DEFAULT_ORGAN_SHAPES)
    for organ, shape in (organ_shapes or {}).items():
        if organ not in ORGANS:
            raise ValueError(f"organ_shapes: unknown organ {organ!r}; organs are {ORGANS}.")
        if len(shape) != 3 or min(int(n) for n in shape) < 4:
            raise ValueError(f"organ_shapes[{organ!r}] must be three sizes of at least 4 voxels, got {shape}.")
        shapes[organ] = tuple(int(n) for n in shape)
    variation = _check_variation(organ_variation)
    ids = [f"sub_{i:03d}" for i in range(num_subjects)]
    table, attributes = os.path.join(out_dir, PANFM_TABLE), os.path.join(out_dir, "attributes.csv")
    children = [c.spawn(1 + len(ORGANS)) for c in np.random.SeedSequence(seed).spawn(num_subjects)]
    subjects = [_draw_subject(np.random.default_rng(c[0])) for c in children]
    _fix_presence(subjects)
    rel = {(sid, o): f"organs/{sid}_{o}.nii.gz" for sid, sub in zip(ids, subjects)
           for o, on in zip(ORGANS, sub["present"]) if on}  # fmt: skip
    if not overwrite:
        for path in [table, attributes] + [os.path.join(out_dir, r) for r in rel.values()]:
            if os.path.exists(path):
                raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    os.makedirs(os.path.join(out_dir, "organs"), exist_ok=True)
    reference = dict.fromkeys(PANFM_DEMO_LABELS, 0.0)
    templates = {o: _render(o, np.random.default_rng([seed, 2**31 + n]), shapes[o], reference, 0.0)
                 for n, o in enumerate(ORGANS) if variation[o] < 1.0}  # fmt: skip
    labels = {}
    for k in PANFM_DEMO_LABELS:
        n_pos = min(max(round(_PREVALENCE[k] * num_subjects), 1), num_subjects - 1)
        order = np.argsort([-sub["liability"][k] for sub in subjects], kind="stable")
        labels[k] = np.zeros(num_subjects, int)
        labels[k][order[:n_pos]] = 1
    for sid, sub, child in zip(ids, subjects, children):
        for o, on, organ_seed in zip(ORGANS, sub["present"], child[1:]):
            if not on:
                continue
            img = _render(o, np.random.default_rng(organ_seed), shapes[o], sub["f"], sub["a"])
            if variation[o] < 1.0:
                img = templates[o] + variation[o] * (img - templates[o])
            img = np.round(img * 4096) / 4096  # 12 fractional bits: far below the noise, smaller files
            _save(img, DEFAULT_ORGAN_SPACINGS[o], os.path.join(out_dir, rel[(sid, o)]))
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", *ORGANS, *PANFM_DEMO_LABELS])
        for n, sid in enumerate(ids):
            writer.writerow([sid, *(rel.get((sid, o), "") for o in ORGANS), *(labels[k][n] for k in PANFM_DEMO_LABELS)])
    with open(attributes, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "age", "sex", "bmi"])
        writer.writerows([sid, f"{sub['age']:.1f}", sub["sex"], f"{sub['bmi']:.1f}"] for sid, sub in zip(ids, subjects))
    return table


def ensure_demo_panfm(dataset_dir: str, **kw: Any) -> str:
    """Return a Pan-FM dataset directory, generating the synthetic demo there if it does not exist.

    Same rule as :func:`medfm.data.synthetic_petct.ensure_demo_petct`: a missing ``dataset_dir`` gets the
    demo; an existing one is returned untouched when it holds ``subjects.csv`` and is never written into
    otherwise.

    Args:
        dataset_dir: dataset root.
        **kw: arguments of :func:`generate_synthetic_panfm` (``num_subjects``, ``seed``, ``organ_shapes``).

    Returns:
        ``dataset_dir``.

    Raises:
        ValueError: ``dataset_dir`` exists but holds no ``subjects.csv``.
    """
    if not os.path.exists(dataset_dir):
        generate_synthetic_panfm(dataset_dir, **kw)
        return dataset_dir
    if not os.path.isfile(os.path.join(dataset_dir, PANFM_TABLE)):
        raise ValueError(
            f"{dataset_dir} exists but holds no {PANFM_TABLE}; refusing to generate demo data into an existing "
            "directory (a Pan-FM dataset has subjects.csv with a subject column and one image path per organ)."
        )
    return dataset_dir
