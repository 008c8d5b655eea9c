"""Validation metrics: the numbers the best-model saver sees equal the test-time report's, by hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import ConfusionMatrix, from_engine

from medfm.metrics import ClassificationReport, LesionDice, MacroSensitivity, SegmentationReport


def _run(outputs: list[list[dict]], *attach) -> Engine:
    """An engine whose iterations emit decollated outputs, as MONAI's SupervisedEvaluator does."""

    def step(engine: Engine, batch: list[dict]) -> list[dict]:
        engine.state.batch = [{"case": d["case"]} for d in batch]
        return batch

    engine = Engine(step)
    for name, metric in attach:
        if isinstance(metric, (MacroSensitivity, LesionDice, ConfusionMatrix)):
            metric.attach(engine, name)
        else:
            metric.attach(engine)
    engine.run(outputs, max_epochs=1)
    return engine


def _one_hot(k: int, n: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(k), n).float()


def test_macro_sensitivity_is_not_accuracy_and_matches_the_report(tmp_path):
    # 8 class-0 and 2 class-1 cases, all predicted 0: macro sensitivity (1 + 0) / 2 = 0.5, accuracy 0.8
    cases = [{"pred": _one_hot(0), "label": _one_hot(t), "case": f"c{i}"} for i, t in enumerate([0] * 8 + [1] * 2)]
    outputs = [cases[:3], cases[3:7], cases[7:]]
    transform = from_engine(["pred", "label"])
    engine = _run(
        outputs,
        ("macro", MacroSensitivity(num_classes=2, output_transform=transform)),
        ("monai_mean", ConfusionMatrix(include_background=True, metric_name="sensitivity", reduction="mean",
                                       output_transform=transform)),  # fmt: skip
        ("report", ClassificationReport(str(tmp_path), num_classes=2)),
    )
    assert engine.state.metrics["macro"] == pytest.approx(0.5)
    # MONAI's pooled "mean" sensitivity is accuracy here: why validation must not use it
    assert engine.state.metrics["monai_mean"] == pytest.approx(0.8)
    assert engine.state.metrics["macro_sensitivity"] == pytest.approx(engine.state.metrics["macro"])
    assert engine.state.metrics["accuracy"] == pytest.approx(0.8)


def test_macro_sensitivity_three_classes_indices_and_errors():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 0, 2, 1, 0, 2, 2, 2, 2]
    metric = MacroSensitivity(num_classes=3)
    metric.reset()
    # class indices as 1-element tensors, predictions as logits
    metric.update(([torch.tensor([5.0 if c == p else 0.0 for c in range(3)]) for p in y_pred],
                   [torch.tensor([t]) for t in y_true]))  # fmt: skip
    assert metric.compute() == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    with pytest.raises(ValueError, match="class index"):
        metric.update(([torch.zeros(3)], [torch.tensor([3])]))
    with pytest.raises(ValueError, match="num_classes"):
        MacroSensitivity(num_classes=1)


def _mask_case(lesion: np.ndarray | None, pred: np.ndarray, case: str) -> dict:
    label = np.zeros((1, 6, 6, 6), np.float32) if lesion is None else lesion
    aff = torch.eye(4, dtype=torch.float64)
    to_oh = lambda m: MetaTensor(torch.as_tensor(np.concatenate([1 - m, m])), affine=aff)  # noqa: E731
    return {"pred": to_oh(pred), "label": to_oh(label), "case": case}


def _cube(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((1, 6, 6, 6), np.float32)
    m[0, lo:hi, lo:hi, lo:hi] = 1
    return m


def test_lesion_dice_validation_equals_report_on_positive_and_negative_cases(tmp_path):
    """Half of AutoPET's FDG cases are negative controls: both metrics average Dice over positive cases only."""
    empty = np.zeros((1, 6, 6, 6), np.float32)
    cases = [
        _mask_case(_cube(0, 2), _cube(0, 2), "pos_perfect"),  # Dice 1
        _mask_case(_cube(0, 2), _cube(1, 3), "pos_overlap"),  # 1 shared voxel of 8 + 8: Dice 2/16
        _mask_case(_cube(0, 3), empty, "pos_missed"),  # Dice 0
        _mask_case(None, empty, "neg_clean"),  # no Dice; FP volume 0
        _mask_case(None, _cube(3, 5), "neg_false_positive"),  # no Dice; FP volume 8 voxels
    ]
    want = (1.0 + 2 / 16 + 0.0) / 3
    engine = _run(
        [cases[:2], cases[2:]],
        ("val_mean_dice", LesionDice(output_transform=from_engine(["pred", "label"]))),
        ("report", SegmentationReport(str(tmp_path), num_bootstrap=20)),
    )
    m = engine.state.metrics
    assert m["val_mean_dice"] == pytest.approx(want)
    assert m["mean_dice"] == pytest.approx(want)  # the test-time report, same policy
    assert m["mean_fp_ml_negative"] == pytest.approx(8 * 1e-3 / 2)  # 1 mm³ voxels, two negative cases


def test_lesion_dice_without_positive_case_is_nan_with_a_warning():
    empty = np.zeros((1, 6, 6, 6), np.float32)
    metric = LesionDice()
    metric.reset()
    case = _mask_case(None, empty, "neg")
    metric.update(([case["pred"]], [case["label"]]))
    with pytest.warns(UserWarning, match="none of the 1 validation cases"):
        assert np.isnan(metric.compute())
