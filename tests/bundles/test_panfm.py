"""Pan-FM bundle end to end through the ``monai.bundle`` CLI on the synthetic pan-organ demo: pre-training (each
masking mode), fine-tuning and linear probing, inference and evaluation with the missing-organ protocol."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from medfm.data import ORGANS, PANFM_DEMO_LABELS, read_subject_table

from .helpers import (
    error_text,
    event_tags,
    run_bundle,
    workflow,
)

B = "panfm_panorgan"
pytestmark = pytest.mark.slow


def _cli(cwd, names, *overrides, mode="training", cli=False):
    return run_bundle(B, cwd, names, *overrides, mode=mode, cli=cli)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("panfm")
    data = demo_data(B)
    out = {k: str(root / k) for k in ("pre", "ft", "probe", "inf", "eval")}
    common = ["--dataset_dir", data]
    # the command-line smoke run of this bundle; the other runs go in-process
    _cli(root, ["train.json", "demo.json"], *common, "--output_dir", out["pre"], "--max_steps", "12", cli=True)
    pre = os.path.join(out["pre"], "models", "model.pt")
    _cli(
        root,
        ["finetune.json", "demo_finetune.json"],
        *common,
        "--output_dir",
        out["ft"],
        "--pretrained_checkpoint",
        pre,
    )
    _cli(root, ["finetune.json", "linear_probe.json", "demo_finetune.json"], *common, "--output_dir", out["probe"],
         "--pretrained_checkpoint", pre)  # fmt: skip
    ft = os.path.join(out["ft"], "models", "model.pt")
    _cli(
        root,
        ["inference.json", "demo_inference.json"],
        *common,
        "--output_dir",
        out["inf"],
        "--ckpt_path",
        ft,
        mode=None,
    )
    _cli(root, ["inference.json", "evaluate.json", "demo_inference.json"], *common, "--output_dir", out["eval"],
         "--ckpt_path", ft, mode=None)  # fmt: skip
    return {"root": root, "data": data, "pre_ckpt": pre, "ft_ckpt": ft, **out}


def test_demo_has_one_organ_and_seven_organ_subjects(chain):
    counts = {sum(d["present"]) for d in read_subject_table(chain["data"])}
    assert {1, 7} <= counts


def test_pretraining_logs_losses_and_attention_shares(chain):
    scalars, images = event_tags(os.path.join(chain["pre"], "logs"))
    for term in ("cls", "patch", "teacher_temp", "momentum", "masked_fraction", *(f"attn_{o}" for o in ORGANS)):
        assert any(t.endswith(term) for t in scalars), (term, sorted(scalars))
    assert any("organ_attention" in t for t in images), images
    state = torch.load(chain["pre_ckpt"], weights_only=True)
    assert any(k.startswith("teacher.encoder.") for k in state) and any(k.startswith("student.") for k in state)


@pytest.mark.parametrize("mode", ["random", "sgm"])
def test_masking_switch_configs_run(chain, tmp_path, mode):
    wf = workflow(B, ["train.json", "demo.json", f"masking_{mode}.json"], dataset_dir=chain["data"],
                  output_dir=str(tmp_path / "out"), max_steps=2)  # fmt: skip
    wf.initialize()
    assert wf.parser.get_parsed_content("train#iteration").masking == mode
    wf.run()
    assert os.path.isfile(tmp_path / "out" / "models" / "model.pt")


def test_fine_tuning_and_linear_probe_start_from_the_teacher(chain):
    pre = torch.load(chain["pre_ckpt"], weights_only=True)
    probe = torch.load(os.path.join(chain["probe"], "models", "last_model.pt"), weights_only=True)
    assert chain["probe"] != chain["ft"]
    # the linear probe leaves the encoder exactly as pre-trained (teacher weights)
    for k, v in probe.items():
        if k.startswith("encoder."):
            torch.testing.assert_close(v, pre["teacher." + k])
    ft = torch.load(os.path.join(chain["ft"], "models", "last_model.pt"), weights_only=True)
    assert any(not torch.equal(v, pre["teacher." + k]) for k, v in ft.items() if k.startswith("encoder.blocks"))
    scalars, _ = event_tags(os.path.join(chain["ft"], "logs"))
    assert {"val_macro_auroc", "train_loss"} <= scalars, scalars


def test_inference_writes_one_probability_row_per_subject(chain):
    rows = list(csv.DictReader(open(os.path.join(chain["inf"], "probabilities.csv"))))
    subjects = [d["subject"] for d in read_subject_table(chain["data"])]
    assert [r["subject"] for r in rows] == subjects
    for r in rows:
        assert all(0.0 <= float(r[name]) <= 1.0 for name in PANFM_DEMO_LABELS)


def test_evaluation_writes_auroc_and_the_robustness_protocol(chain):
    rows = {r["condition"]: r for r in csv.DictReader(open(os.path.join(chain["eval"], "robustness_auroc.csv")))}
    expected = ["all organs", *(f"without {o}" for o in ORGANS), "random missing 20%", "random missing 40%",
                "random missing 60%"]  # fmt: skip
    assert list(rows) == expected
    for r in rows.values():
        vals = [float(r[n]) for n in PANFM_DEMO_LABELS]
        assert all(0.0 <= v <= 1.0 for v in vals)
        assert float(r["macro"]) == pytest.approx(sum(vals) / len(vals), abs=1e-3)
    subjects = {r["condition"]: r for r in csv.DictReader(open(os.path.join(chain["eval"], "robustness_subjects.csv")))}
    organs = [
        float(subjects[c]["mean_organs"]) for c in ("random missing 20%", "random missing 40%", "random missing 60%")
    ]
    assert organs[0] > organs[1] > organs[2] >= 1.0
    assert os.path.isfile(os.path.join(chain["eval"], "auroc.csv"))


def test_subject_without_organs_or_with_a_missing_file_stops_naming_it(chain, tmp_path):
    table = tmp_path / "subjects.csv"
    header = ["subject", *ORGANS]
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(["sub_empty", *[""] * len(ORGANS)])
    wf = workflow(B, ["train.json"], dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    assert "sub_empty" in error_text(e.value)
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(["sub_gone", "organs/nowhere.nii.gz", *[""] * (len(ORGANS) - 1)])
    wf = workflow(B, ["train.json"], dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out2"))
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    assert "sub_gone" in error_text(e.value) and "nowhere.nii.gz" in error_text(e.value)
