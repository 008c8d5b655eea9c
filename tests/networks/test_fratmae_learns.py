"""FratMAE pre-training learns on tiny synthetic PET/CT: the masked reconstruction error of held-out cases falls,
and a linear probe of the tracer on the pooled PET encoder features beats the same probe on the untrained encoder.

The probe predicts the tracer (FDG or PSMA, which set different organ uptake patterns) from mean-pooled PET
tokens by L2-regularised logistic regression with 5-fold cross-validation over 60 cases never seen in
pre-training. At this size a random encoder already separates the tracers (its features are close to a random
linear map of the mean patch), so the probes are compared by held-out log loss, i.e. by the margin.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.data import generate_synthetic_petct
from medfm.engines import FratMAEPretrainPrepareBatch
from medfm.losses import FratMAELoss
from medfm.losses.masked_mse import masked_mse
from medfm.masking import random_masking
from medfm.networks.blocks import patchify
from medfm.networks.nets import FratMAE

GRID = {"shape": (32, 24, 48), "spacing": (15.0, 20.0, 40.0)}  # whole body, 4 x 3 x 6 tokens of 8^3 voxels
SEEDS = (0, 1, 2)
PATCH, N_TOKENS, STEPS = (8, 8, 8), 72, 60


def _cases(root: Path, n: int, seed: int) -> dict:
    """PET and CT as the bundle scales them (SUV 0-20 and HU -1000-1000 to [0, 1]), and the tracer."""
    generate_synthetic_petct(str(root), n, seed=seed, **GRID)
    with open(root / "metadata.csv", newline="") as f:
        meta = list(csv.DictReader(f))

    def load(case: str, channel: str) -> np.ndarray:
        return np.asarray(nib.load(str(root / "imagesTr" / f"{case}_{channel}.nii.gz")).dataobj, np.float32)

    ct = np.stack([np.clip((load(m["case"], "0000") + 1000) / 2000, 0, 1) for m in meta])
    pet = np.stack([np.clip(load(m["case"], "0001") / 20, 0, 1) for m in meta])
    psma = torch.tensor([float(m["tracer"] == "PSMA") for m in meta])
    return {"pet": torch.from_numpy(pet)[:, None], "ct": torch.from_numpy(ct)[:, None], "psma": psma}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("learns")
    return {"train": _cases(root / "train", 24, seed=1), "probe": _cases(root / "probe", 60, seed=2)}


def _net(seed: int) -> FratMAE:
    torch.manual_seed(seed)
    return FratMAE(patch_size=8, hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96, decoder_hidden_size=32,
                   decoder_num_layers=1, decoder_num_heads=4, decoder_mlp_dim=64, context_align=False)  # fmt: skip


@torch.no_grad()
def _heldout_pet_mse(net: FratMAE, d: dict) -> float:
    """Masked-PET MSE of held-out cases under one fixed mask, CT fully visible."""
    net.eval()
    mk = random_masking(d["pet"].shape[0], N_TOKENS, 0.5, torch.Generator().manual_seed(99))
    out = net(d["pet"], d["ct"], masks={"pet": mk, "ct": None})
    net.train()
    return float(masked_mse(out["pet_pred"], patchify(d["pet"], PATCH), mk.mask))


@torch.no_grad()
def _pooled_pet_features(net: FratMAE, d: dict) -> torch.Tensor:
    net.eval()
    tokens = net.forward_features(d["pet"], d["ct"])["pet_tokens"]
    net.train()
    return tokens[:, 1:].mean(1)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of an L2-regularised logistic regression of ``y`` on ``x`` (L-BFGS)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w, b


def _probe_log_loss(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 0.1) -> float:
    """Held-out log loss of an L2-regularised logistic regression, 5-fold cross-validation (shuffled folds)."""
    fold = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)) % folds
    losses = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xtr, xte = (x[tr] - mu) / sd, (x[te] - mu) / sd
        w, b = _fit_logistic(xtr, y[tr], l2)
        with torch.no_grad():
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(xte @ w + b, y[te], reduction="none"))
    return float(torch.cat(losses).mean())


def _pretrain(net: FratMAE, d: dict, seed: int) -> None:
    prepare = FratMAEPretrainPrepareBatch(PATCH, mask_ratio=0.5, cross_modal=True, seed=seed, text_key=None)
    loss_fn = FratMAELoss(infonce_weight=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randperm(d["pet"].shape[0], generator=order)[:4]
        pet, targets, (ct,), kwargs = prepare({"pet": d["pet"][idx], "ct": d["ct"][idx]})
        loss = loss_fn(net(pet, ct, **kwargs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_pretraining_lowers_reconstruction_and_improves_a_linear_probe(data: dict) -> None:
    """Per seed, the held-out masked-PET MSE falls below half its start; averaged over three seeds (the probe of
    one random initialisation varies a lot), the tracer probe's held-out log loss on the pre-trained encoders is
    below 0.9 of that on the same encoders untrained."""
    y = data["probe"]["psma"]
    assert 0 < y.sum() < len(y)
    before, after = [], []
    for seed in SEEDS:
        net = _net(seed)
        mse0 = _heldout_pet_mse(net, data["probe"])
        before.append(_probe_log_loss(_pooled_pet_features(net, data["probe"]), y))
        _pretrain(net, data["train"], seed)
        mse1 = _heldout_pet_mse(net, data["probe"])
        after.append(_probe_log_loss(_pooled_pet_features(net, data["probe"]), y))
        assert mse1 < 0.5 * mse0, (seed, mse0, mse1)
    assert np.mean(after) < 0.9 * np.mean(before), (before, after)
