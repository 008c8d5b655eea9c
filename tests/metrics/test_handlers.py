"""Report handlers driven like MONAI's SupervisedEvaluator (decollated list output), plus classification metrics."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate

from medfm.metrics import ClassificationReport, SegmentationReport, accuracy, bootstrap_ci, macro_sensitivity


def _mt(array: np.ndarray, spacing: tuple[float, float, float]) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array), affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def _cube(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((1, 6, 6, 6), dtype=np.float32)
    m[0, lo:hi, lo:hi, lo:hi] = 1
    return m


def _one_hot(mask: np.ndarray) -> np.ndarray:
    return np.concatenate([1 - mask, mask], axis=0)


def _seg_iterations() -> list[tuple[list[dict], list[dict]]]:
    """Two iterations of (batch, output), two samples each, with hand-counted expectations."""
    a = _cube(0, 2)
    d_pred = np.zeros((1, 6, 6, 6), dtype=np.float32)
    d_pred[0, 0:2, 0:2, 0] = 1  # 4 voxels inside the cube
    d_pred[0, 5, 5, 5] = 1  # stray voxel
    it1 = (
        [{"case": "a"}, {"case": "b"}],  # case ids only in the batch
        [
            {"pred": _mt(a, (1, 1, 1)), "label": _mt(a, (1, 1, 1))},
            {"pred": _mt(_cube(4, 6), (2, 2, 2)), "label": _mt(a, (2, 2, 2))},
        ],
    )
    it2 = (
        [{"case": "ignored"}, {}],
        [  # case ids in the output dicts win; predictions one-hot (2, X, Y, Z)
            {"pred": _mt(_one_hot(0 * a), (1, 1, 1)), "label": _mt(0 * a, (1, 1, 1)), "case": "c"},
            {"pred": _mt(_one_hot(d_pred), (1, 2, 3)), "label": _mt(a, (1, 2, 3)), "case": "d"},
        ],
    )
    return [it1, it2]


# case: (dice, iou, fp_ml, fn_ml), counted by hand
SEG_EXPECTED = {
    "a": (1.0, 1.0, 0.0, 0.0),  # perfect, 1 mm³ voxels
    "b": (0.0, 0.0, 8 * 0.008, 8 * 0.008),  # disjoint cubes of 8 voxels, 8 mm³ voxels
    "c": (np.nan, np.nan, 0.0, 0.0),  # both empty: a negative case has no Dice (AutoPET policy)
    "d": (2 * 4 / (5 + 8), 4 / 9, 1 * 0.006, 0.0),  # 4 of 8 hit + 1 stray voxel, 6 mm³ voxels
}


def _engine() -> Engine:
    def step(engine: Engine, batch: tuple) -> list[dict]:
        engine.state.batch = batch[0]  # decollated batch, as MONAI's evaluator leaves it
        return batch[1]

    return Engine(step)


def _read(path: str) -> tuple[list[dict], dict]:
    with open(path + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path + ".json") as f:
        return rows, json.load(f)


def test_segmentation_report(tmp_path):
    iterations = _seg_iterations()
    engine = _engine()
    handler = SegmentationReport(str(tmp_path / "out"), num_bootstrap=300, seed=3, filename="seg")
    handler.attach(engine)
    for _ in range(2):  # a second run must reset, not accumulate
        engine.run(iterations, max_epochs=1)
    rows, report = _read(str(tmp_path / "out" / "seg"))
    assert [r["case"] for r in rows] == ["a", "b", "c", "d"]
    assert list(rows[0]) == ["case", "positive", "dice", "iou", "fp_ml", "fn_ml"]
    assert [r["positive"] for r in rows] == ["1", "1", "0", "1"]
    assert (rows[2]["dice"], rows[2]["iou"]) == ("", "")  # undefined, written as an empty cell / null
    assert report["cases"][2]["dice"] is None
    for row, case in zip(rows, report["cases"]):
        want = SEG_EXPECTED[row["case"]]
        got = tuple(float(row[k]) if row[k] else np.nan for k in ("dice", "iou", "fp_ml", "fn_ml"))
        assert got == pytest.approx(want, abs=1e-9, nan_ok=True)
        got_json = tuple(np.nan if case[k] is None else case[k] for k in ("dice", "iou", "fp_ml", "fn_ml"))
        assert got_json == pytest.approx(want, abs=1e-9, nan_ok=True)
    assert (report["num_cases"], report["num_positive"], report["num_negative"]) == (4, 3, 1)
    dices = [SEG_EXPECTED[c][0] for c in "abd"]  # Dice over the cases with a lesion only
    mean, low, high = bootstrap_ci(dices, 300, 0.95, 3)
    assert report["summary"]["dice"] == pytest.approx({"mean": np.mean(dices), "ci_low": low, "ci_high": high})
    assert low < mean < high
    assert report["summary"]["fp_ml"]["mean"] == pytest.approx((0.064 + 0.006) / 4)
    assert report["summary"]["fp_ml_negative"]["mean"] == pytest.approx(0.0)
    assert report["summary"]["fn_ml"]["mean"] == pytest.approx(0.064 / 3)  # over positive cases
    m = engine.state.metrics
    assert m["mean_dice"] == pytest.approx(np.mean(dices))
    assert m["mean_iou"] == pytest.approx(np.mean([SEG_EXPECTED[c][1] for c in "abd"]))
    assert m["iou_ci_low"] <= m["mean_iou"] <= m["iou_ci_high"]
    assert m["mean_fn_ml"] == pytest.approx(0.064 / 3)


def test_segmentation_report_dict_output_and_missing_key(tmp_path):
    """A non-decollated dict output (batched tensors) with case ids in a batch dict."""
    a = _cube(0, 2)
    samples = [{"pred": _mt(p, (2, 1, 1)), "label": _mt(a, (2, 1, 1))} for p in (a, _cube(1, 3))]
    out = list_data_collate(samples)  # batched MetaTensors, as a non-decollating evaluator leaves them
    engine = _engine()
    SegmentationReport(str(tmp_path), num_bootstrap=10).attach(engine)
    engine.run([({"case": ["x", "y"]}, out)], max_epochs=1)
    rows, _ = _read(str(tmp_path / "metrics"))
    assert [r["case"] for r in rows] == ["x", "y"]
    assert float(rows[1]["dice"]) == pytest.approx(2 * 1 / 16)  # cubes [0:2]^3 and [1:3]^3 share 1 voxel
    assert (float(rows[1]["fp_ml"]), float(rows[1]["fn_ml"])) == (0.0, 0.0)
    bad = Engine(lambda e, b: [{"pred": torch.zeros(1, 2, 2, 2)}])
    SegmentationReport(str(tmp_path)).attach(bad)
    with pytest.raises(ValueError, match="label"):
        bad.run([0], max_epochs=1)


def test_classification_metrics_hand_confusion():
    # confusion [true][pred]: class 0 -> 3/4 right, class 1 -> 1/2 right, class 2 -> 4/4 right
    y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 0, 2, 1, 0, 2, 2, 2, 2]
    assert macro_sensitivity(y_true, y_pred, 3) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert accuracy(y_true, y_pred) == pytest.approx(8 / 10)
    # class 2 absent from y_true: averaged over classes 0 and 1 only, though predicted
    assert macro_sensitivity([0, 0, 1, 1, 1], [0, 2, 1, 1, 2], 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert macro_sensitivity(torch.tensor([1, 1]), torch.tensor([1, 0]), 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        macro_sensitivity([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="same length"):
        accuracy([0, 1], [0])


def test_classification_report(tmp_path):
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9], [-0.5, 0.1], [1.2, 1.0]])
    probs = torch.softmax(logits, dim=1)
    preds = [logits[0], probs[1], logits[2], probs[3]]  # mix of logits and probabilities
    labels = [torch.tensor(0), 1, torch.tensor([0.0]), torch.tensor([0.0, 1.0])]  # 0-d, int, 1-elem, one-hot
    iterations = [
        ([{"case": f"p{k}"} for k in ks], [{"pred": preds[k], "label": labels[k]} for k in ks])
        for ks in ((0, 1), (2, 3))
    ]
    engine = _engine()
    ClassificationReport(str(tmp_path), num_classes=2, filename="stage").attach(engine)
    engine.run(iterations, max_epochs=1)
    rows, report = _read(str(tmp_path / "stage"))
    y_true, y_pred = [0, 1, 0, 1], [0, 1, 1, 0]  # argmax of the logits above, by hand
    assert [r["case"] for r in rows] == ["p0", "p1", "p2", "p3"]
    assert [int(r["label"]) for r in rows] == y_true
    assert [int(r["pred"]) for r in rows] == y_pred
    got_probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    np.testing.assert_allclose(got_probs, probs.numpy(), rtol=1e-5)
    # recall class 0: 1/2, class 1: 1/2 -> macro 0.5; accuracy 2/4
    assert report["macro_sensitivity"] == pytest.approx(0.5)
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["confusion_matrix"] == [[1, 1], [1, 1]]
    assert report["num_cases"] == 4
    assert engine.state.metrics == pytest.approx({"macro_sensitivity": 0.5, "accuracy": 0.5})
    bad = Engine(lambda e, b: [{"pred": torch.zeros(3), "label": 0}])
    ClassificationReport(str(tmp_path), num_classes=2).attach(bad)
    with pytest.raises(ValueError, match="num_classes"):
        bad.run([0], max_epochs=1)
    bad_label = Engine(lambda e, b: [{"pred": torch.zeros(2), "label": 2}])
    ClassificationReport(str(tmp_path), num_classes=2).attach(bad_label)
    with pytest.raises(ValueError, match="label"):
        bad_label.run([0], max_epochs=1)


def test_segmentation_report_with_monai_supervised_evaluator(tmp_path):
    """End to end through SupervisedEvaluator: decollated output, postprocessing argmax, case ids in the batch."""
    from monai.engines import SupervisedEvaluator
    from monai.transforms import AsDiscreted

    a, b = _cube(0, 2), _cube(1, 3)
    data = [
        {"image": _mt(_one_hot(p), (1, 1, 2)), "label": _mt(g, (1, 1, 2)), "case": c}
        for p, g, c in ((a, a, "s0"), (b, a, "s1"), (a, np.zeros_like(a), "s2"))
    ]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=list_data_collate)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        postprocessing=AsDiscreted(keys="pred", argmax=True),
        val_handlers=[SegmentationReport(str(tmp_path), num_bootstrap=50)],
    )
    evaluator.run()
    rows, report = _read(str(tmp_path / "metrics"))
    assert [r["case"] for r in rows] == ["s0", "s1", "s2"]
    got = [tuple(float(r[k]) if r[k] else np.nan for k in ("dice", "iou", "fp_ml", "fn_ml")) for r in rows]
    # s1: cubes [0:2]^3, [1:3]^3 share 1 voxel; s2: 8 predicted voxels, empty label (no Dice), 2 mm³ voxels
    want = [(1.0, 1.0, 0.0, 0.0), (2 / 16, 1 / 15, 0.0, 0.0), (np.nan, np.nan, 8 * 0.002, 0.0)]
    assert got == [pytest.approx(w, nan_ok=True) for w in want]
    assert evaluator.state.metrics["mean_dice"] == pytest.approx((1 + 2 / 16) / 2)
    assert evaluator.state.metrics["mean_fp_ml_negative"] == pytest.approx(8 * 0.002)
