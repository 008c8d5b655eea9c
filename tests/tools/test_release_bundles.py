"""Release zips of all four bundles: the weights fit inference.json's network, the zip runs where medfm is not
installed, and the model zoo's checks pass on it (large files downloaded over loopback HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, run

from medfm.data import (
    generate_synthetic_midol,
    generate_synthetic_panfm,
    generate_synthetic_petct,
    generate_synthetic_spad,
)
from medfm.utils import download_bundle, load_bundle, package_bundle, sha256_file

from ..bundles.helpers import REPO, SCHEMA
from .test_release import serve

pytestmark = pytest.mark.slow  # end-to-end runs through the bundle configs

BUNDLES = ("fratmae_petct", "spad_vit", "panfm_panorgan", "midol_multimodal")
DEMO = ("inference.json", "demo_inference.json")
DEMO_FINETUNE = {"fratmae_petct": ("finetune_seg.json", "demo_seg.json"),
                 "spad_vit": ("finetune_seg.json", "demo.json", "demo_seg.json"),
                 "panfm_panorgan": ("finetune.json", "demo_finetune.json"),
                 "midol_multimodal": ("finetune_seg.json", "demo_seg.json")}  # fmt: skip


def _network(bundle: str, names: tuple[str, ...], seed: int):
    parser = ConfigParser()
    parser.read_config([f"{REPO}/bundles/{bundle}/configs/{n}" for n in names])
    parser["bundle_root"] = f"{REPO}/bundles/{bundle}"
    parser["dataset_dir"] = "/no/such/dataset"
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Each bundle packaged with demo-size task weights (random, seeded) and demo pre-training weights, served."""
    root = tmp_path_factory.mktemp("releases")
    dist = root / "dist"
    dist.mkdir()
    out = {}
    with serve(dist) as base:
        for i, b in enumerate(BUNDLES):
            weights, pretrained = root / f"{b}_model.pt", root / f"{b}_pretrained.pt"
            torch.save(_network(b, DEMO, seed=i).state_dict(), weights)
            torch.save(_network(b, ("train.json", "demo.json"), seed=10 + i).state_dict(), pretrained)
            zip_path, digest = package_bundle(f"{REPO}/bundles/{b}", weights, dist, url_base=base,
                                              pretrained=pretrained, inference_configs=DEMO,
                                              finetune_configs=DEMO_FINETUNE[b])  # fmt: skip
            got = download_bundle(f"{base}/{zip_path.name}", b, root / "dl", digest)
            out[b] = {"zip": zip_path, "dir": got, "weights": weights, "pretrained": pretrained}
        yield {"root": root, "base": base, "bundles": out}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_release_model_pt_is_the_inference_network(releases, bundle):
    """``monai.bundle.load(..., workflow_type="inference")`` of the download: every tensor from models/model.pt."""
    r = releases["bundles"][bundle]
    net = load_bundle(bundle, r["dir"].parent, workflow_type="inference")
    released = torch.load(r["dir"] / "models" / "model.pt", weights_only=True)
    state = net.state_dict()
    assert state.keys() == released.keys()
    assert all(torch.equal(state[k], released[k]) for k in state)
    assert sha256_file(r["dir"] / "models" / "pretrained.pt") == sha256_file(r["pretrained"])


@pytest.mark.parametrize("bundle", ["spad_vit", "panfm_panorgan", "midol_multimodal"])
def test_pretraining_weights_are_refused_as_model_pt(releases, bundle, tmp_path):
    """The pre-training state does not fit the task network, and another model's pre-training does not fit the
    fine-tuning encoder: packaging and our load name the file and the counts."""
    r = releases["bundles"][bundle]
    own = _network(bundle, DEMO, seed=0).state_dict()
    pre = torch.load(r["pretrained"], weights_only=True)
    matched = sum(1 for k, v in own.items() if k in pre and pre[k].shape == v.shape)  # by hand
    assert matched < len(own)
    refused = rf"_pretrained.pt does not fit .*matches {matched} of the network's {len(own)} "
    with pytest.raises(ValueError, match=refused):
        package_bundle(f"{REPO}/bundles/{bundle}", r["pretrained"], tmp_path / "dist", inference_configs=DEMO)
    other = releases["bundles"]["fratmae_petct"]["pretrained"]  # another model's pre-training for fine-tuning
    with pytest.raises(ValueError, match=rf"pre-trained weights for fine-tuning refused: {other}.* matches 0 of "):
        package_bundle(f"{REPO}/bundles/{bundle}", r["weights"], tmp_path / "dist2", pretrained=other,
                       inference_configs=DEMO, finetune_configs=DEMO_FINETUNE[bundle])  # fmt: skip
    copy = tmp_path / "dl" / bundle
    shutil.copytree(r["dir"], copy)
    shutil.copyfile(r["pretrained"], copy / "models" / "model.pt")
    refused = rf"model.pt does not fit the inference.json network .*matches {matched} of {len(own)}"
    with pytest.raises(ValueError, match=refused):
        load_bundle(bundle, tmp_path / "dl")


def test_release_layout_metadata_and_large_files(releases):
    """MONAI's download of the zip equals ours; code copy, public requirements only, and one large_files.yml entry
    per weights file with its own URL and hash, which MONAI's download_large_files fetches and checks over loopback
    HTTP."""
    from monai.bundle import download
    from monai.bundle.scripts import download_large_files

    src = Path(REPO) / "shared_src" / "medfm"
    for b, r in releases["bundles"].items():
        # MONAI's downloader (no hash check) gives the same files as ours
        download(name=b, bundle_dir=str(releases["root"] / "dl_monai"), url=f"{releases['base']}/{r['zip'].name}")
        ours = {p.relative_to(r["dir"]): sha256_file(p) for p in r["dir"].rglob("*") if p.is_file()}
        theirs = releases["root"] / "dl_monai" / b
        assert {p.relative_to(theirs): sha256_file(p) for p in theirs.rglob("*") if p.is_file()} == ours
        with zipfile.ZipFile(r["zip"]) as zf:
            names = set(zf.namelist())
        code = {f"{b}/medfm/{f.relative_to(src).as_posix()}" for f in src.rglob("*.py")}
        assert code <= names and f"{b}/medfm/__init__.py" in names
        meta = json.loads((r["dir"] / "configs" / "metadata.json").read_text(encoding="utf-8"))
        required = meta["required_packages_version"]
        assert "medfm" not in required
        for dist_name, version in required.items():  # every requirement is an installed public distribution
            assert version == __import__("importlib.metadata").metadata.version(dist_name), dist_name
        entries = yaml.safe_load((r["dir"] / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
        assert [e["path"] for e in entries] == ["models/model.pt", "models/pretrained.pt"]
        for e in entries:
            assert e["url"] == f"{releases['base']}/{r['zip'].stem}/{e['path']}"
            assert e["hash_type"] == "sha256" and e["hash_val"] == sha256_file(r["dir"] / e["path"])
        fresh = releases["root"] / "lf" / b
        shutil.copytree(r["dir"], fresh)
        for e in entries:
            os.remove(fresh / e["path"])
        download_large_files(bundle_path=str(fresh))
        for e in entries:
            assert sha256_file(fresh / e["path"]) == e["hash_val"]
        infer = json.loads((r["dir"] / "configs" / "inference.json").read_text(encoding="utf-8"))
        assert infer["ckpt_path"] == "$@ckpt_dir + '/model.pt'"  # the released weights, not a demo run's


_ISOLATED = textwrap.dedent(
    """
    import json, logging, os, sys
    try:
        import medfm
        sys.exit(f"medfm is importable before any bundle is on the path: {medfm.__file__}")
    except ModuleNotFoundError:
        pass
    import torch
    from monai.bundle import load, run

    results = {}
    for name, bundle, data, out, finetune, extra in json.loads(sys.argv[1]):
        for m in [m for m in sys.modules if m == "medfm" or m.startswith("medfm.")]:
            del sys.modules[m]
        sys.path.insert(0, bundle)  # what MONAI Label does; `monai.bundle run` from the bundle folder has it as cwd
        run(run_id="run", config_file=os.path.join(bundle, "configs", "inference.json"), dataset_dir=data,
            output_dir=out, **{"dataset#data": "$@datalist[:1]"})
        import medfm
        net = load(name, bundle_dir=os.path.dirname(bundle), workflow_type="inference")
        state = torch.load(os.path.join(bundle, "models", "model.pt"), weights_only=True)
        own = net.state_dict()
        results[name] = {
            "medfm": medfm.__file__,
            "matched": sum(1 for k, v in own.items() if k in state and torch.equal(v, state[k])),
            "total": len(own),
            "outputs": sorted(os.listdir(out)),
        }
        # one fine-tuning epoch from the released pre-trained weights, with the bundle's own fine-tuning configs
        log = []
        handler = logging.Handler()
        handler.emit = lambda record: log.append(record.getMessage())
        logging.getLogger("medfm").addHandler(handler)
        cfg = os.path.join(bundle, "configs")
        run(run_id="run", config_file=[os.path.join(cfg, c) for c in finetune], dataset_dir=data,
            output_dir=out + "_ft", epochs=1, val_interval=1, **extra,
            pretrained_checkpoint=os.path.join(bundle, "models", "pretrained.pt"))
        logging.getLogger("medfm").removeHandler(handler)
        results[name]["finetune_log"] = [m for m in log if m.startswith("loaded")]
        results[name]["finetuned"] = os.path.isfile(os.path.join(out + "_ft", "models", "last_model.pt"))
        sys.path.remove(bundle)
    print("RESULTS " + json.dumps(results))
    """
)


def _outputs(folder: Path) -> dict:
    """Every file written under ``folder`` -> its content (images as arrays, rounded; text as text)."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.name.endswith((".nii", ".nii.gz")):
            value = np.asarray(nib.load(f).dataobj).round(5).tolist()
        elif f.suffix == ".png":
            value = np.asarray(Image.open(f)).tolist()
        else:
            value = f.read_text(encoding="utf-8")
        out[f.relative_to(folder).as_posix()] = value
    return out


def test_release_runs_where_medfm_is_not_installed(releases):
    """One interpreter without site processing (so no editable medfm): each downloaded bundle runs inference.json
    on a demo image with its own medfm copy, monai.bundle.load gives the packaged weights, and the bundle fine-tunes
    one epoch from the released pre-trained weights (SPAD-ViT: one step); the predictions equal the packaged model's
    (the repository's inference configs with the packaged weights, run here)."""
    root = releases["root"] / "isolated"
    root.mkdir()
    data = {b: root / "data" / b for b in BUNDLES}
    generate_synthetic_petct(str(data["fratmae_petct"]), num_cases=3, shape=(48, 32, 96), spacing=(10.0, 10.0, 20.0))
    generate_synthetic_spad(str(data["spad_vit"]), num_2d=2, num_3d=2, size_2d=32, size_3d=32)
    generate_synthetic_panfm(str(data["panfm_panorgan"]), num_subjects=8)
    generate_synthetic_midol(str(data["midol_multimodal"]), per_modality=4, size=32)
    extra = {"spad_vit": {"max_steps": 1}}
    jobs = [[b, str(releases["bundles"][b]["dir"]), str(data[b]), str(root / "out" / b), DEMO_FINETUNE[b],
             extra.get(b, {})] for b in BUNDLES]  # fmt: skip
    script = root / "run_isolated.py"
    script.write_text(_ISOLATED, encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"], "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('medfm') is not None)"
    if subprocess.run([sys.executable, "-S", "-c", probe], cwd=str(root.parent), env=env).returncode:
        pytest.skip("medfm is installed into site-packages itself (not editable): no interpreter here lacks it")
    res = subprocess.run([sys.executable, "-S", str(script), json.dumps(jobs)], cwd=str(root), env=env,
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    results = json.loads(res.stdout.split("RESULTS ", 1)[1])
    for b in BUNDLES:
        r = results[b]
        assert r["medfm"] == str(releases["bundles"][b]["dir"] / "medfm" / "__init__.py")
        assert r["matched"] == r["total"] > 0, (b, r)
        assert r["outputs"], f"{b}: inference wrote nothing"
        # the packaged model's output: the repository's inference configs with the packaged weights, in this process
        ref = root / "ref" / b
        run(run_id="run", config_file=[f"{REPO}/bundles/{b}/configs/{n}" for n in DEMO],
            bundle_root=f"{REPO}/bundles/{b}", dataset_dir=str(data[b]), output_dir=str(ref),
            ckpt_path=str(releases["bundles"][b]["weights"]),
            **{"dataset#data": "$@datalist[:1]"})  # fmt: skip
        assert _outputs(ref) == _outputs(root / "out" / b), f"{b}: the release's prediction differs from the model's"
        pretrained = releases["bundles"][b]["dir"] / "models" / "pretrained.pt"
        assert r["finetuned"] and len(r["finetune_log"]) == 1, (b, r)
        assert r["finetune_log"][0].startswith("loaded ") and str(pretrained) in r["finetune_log"][0], (b, r)


def test_verify_bundles_release_passes_on_every_zip(releases):
    if not os.path.isfile(SCHEMA):
        pytest.skip(f"metadata schema not found at {SCHEMA}")
    zips = [str(r["zip"]) for r in releases["bundles"].values()]
    res = subprocess.run([sys.executable, f"{REPO}/tools/verify_bundles.py", "--schema", SCHEMA, "--release", *zips],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for b in BUNDLES:
        mine = [ln for ln in lines if f" {b}_v" in ln]
        for check in ("large files", "requirements", "model.pt fits inference.json", "ckpt_export (scripted)",
                      "required files", "version in changelog", "verify_metadata"):  # fmt: skip
            assert any(check in ln for ln in mine), (b, check)


def test_hub_layout_downloads_with_monai_from_a_hub_endpoint(releases, tmp_path):
    """The Hub layout, served by a loopback stand-in of the Hub's HTTP API, downloads with ``python -m monai.bundle
    download --source huggingface_hub`` unchanged (``HF_ENDPOINT``); the bundle it gives has every file of the
    layout, loads the released weights (every tensor matched) and carries the model card header."""
    pytest.importorskip("huggingface_hub")
    from medfm.utils import write_hub_layout

    from .hub_endpoint import hub_endpoint

    b = "midol_multimodal"
    layout = write_hub_layout(releases["bundles"][b]["zip"], tmp_path / "layout")
    card = (layout / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {"license": "apache-2.0", "library_name": "monai", "tags": ["monai", "medical", b]}
    assert card.split("---\n", 2)[2] == (layout / "docs" / "README.md").read_text(encoding="utf-8")
    with hub_endpoint(layout, f"medfm/{b}", "v0.1.0") as url:
        env = dict(os.environ, HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")  # fmt: skip
        args = ["download", "--name", b, "--source", "huggingface_hub", "--repo", f"medfm/{b}", "--version", "v0.1.0",
                "--bundle_dir", str(tmp_path / "bundles")]  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], env=env, capture_output=True, text=True,
                             encoding="utf-8", errors="replace", timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = tmp_path / "bundles" / b
    expected = sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file())
    downloaded = sorted(
        p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file() and ".cache" not in p.parts
    )
    assert downloaded == expected
    assert all(sha256_file(got / f) == sha256_file(layout / f) for f in expected)
    net = load_bundle(b, tmp_path / "bundles")
    released = torch.load(releases["bundles"][b]["weights"], weights_only=True)
    assert all(torch.equal(v, released[k]) for k, v in net.state_dict().items())
