"""A real MONAI Label server (stock ``monaibundle`` app) serving each segmentation bundle: FratMAE (PET/CT
lesions), SPAD-ViT (a 3D volume and a 2D radiograph in one datastore) and M-IDoL (a 2D dermoscopy image).

MONAI Label needs its own environment (``pip install -e ".[label]"``: monailabel 0.8.5 with torch 2.14.1 and
torchvision 0.29.1). The test runs the server with the interpreter ``MEDFM_LABEL_PYTHON`` names, else
``<repo>/.venv-label/bin/python``; it is skipped, saying how to install one, when neither exists, and fails
when ``MEDFM_LABEL_PYTHON`` is set to something that cannot run the server.

For FratMAE the study is stored left-right flipped (not RAS), so the label must come back through the
bundle's orientation inversion onto the study's own grid; the expected label is computed here independently
of the bundle's transforms (numpy windowing, an explicit flip, MONAI's sliding window over the same weights).
For SPAD-ViT and M-IDoL the label must equal what the served bundle's own ``inference.json`` writes when run
without MONAI Label.
"""

from __future__ import annotations

import email.parser
import email.policy
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.inferers import SlidingWindowInferer
from PIL import Image

from medfm.data import (
    generate_synthetic_midol,
    generate_synthetic_petct,
    generate_synthetic_spad,
    write_petct_study,
)
from medfm.data.nifti import save_nifti

from .helpers import REPO, free_port

pytestmark = pytest.mark.slow


def _label_python() -> str:
    given = os.environ.get("MEDFM_LABEL_PYTHON")
    if given:
        path = os.path.abspath(given)
        assert os.path.isfile(path), f"MEDFM_LABEL_PYTHON={given} does not exist."
        return path
    default = os.path.join(REPO, ".venv-label", "bin", "python")
    if not os.path.isfile(default):
        pytest.skip(
            "no MONAI Label environment: python3 -m venv .venv-label && .venv-label/bin/pip install -e '.[label]' "
            "(or set MEDFM_LABEL_PYTHON)"
        )
    return default


def _flip_x(path: str) -> None:
    """Store a NIfTI left-right flipped: same world positions, first axis reversed (RAS becomes LAS)."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    n = data.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, n - 1
    save_nifti(np.ascontiguousarray(data[::-1]), img.affine @ flip, path)


def _request(url: str, method: str = "POST", body: bytes | None = None, headers: dict | None = None, timeout=300):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def _start_server(cmd: list[str], root, log_path, attempts: int = 3):
    """Start MONAI Label on a free port and wait until it answers; a port taken between choosing and binding it
    (another process on the machine) is retried on a new one. Returns the process, its URL and its open log."""
    for attempt in range(attempts):
        port = free_port()
        log = open(log_path, "w")  # noqa: SIM115 - open for the server's lifetime
        proc = subprocess.Popen(cmd + ["--port", str(port)], cwd=str(root), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        started = False
        try:
            while not started:
                try:
                    _request(base + "/info/", method="GET", timeout=5)
                    started = True
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(1)
            log.flush()
            text = log_path.read_text(encoding="utf-8", errors="replace")
        finally:  # not started, or interrupted while waiting: nothing is left running or open
            if not started:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                log.close()
        if started:
            return proc, base, log
        if "address already in use" not in text.lower() or attempt == attempts - 1:
            pytest.fail(f"MONAI Label server did not start (exit {proc.poll()}):\n{text[-4000:]}")
    raise AssertionError("unreachable")


def _multipart(fields: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "medfm" + os.urandom(8).hex()
    parts = []
    for name, (filename, data) in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in msg.iter_parts()
    }


def _study_fratmae(root) -> list[tuple[str, str, str]]:
    data = root / "data"
    generate_synthetic_petct(str(data), num_cases=1, shape=(24, 20, 40), spacing=(4.0, 4.0, 4.0), seed=3)
    study, label = str(root / "studies" / "case_a.nii.gz"), str(root / "case_a_label.nii.gz")
    write_petct_study(
        str(data / "imagesTr" / "demo_000_0001.nii.gz"), str(data / "imagesTr" / "demo_000_0000.nii.gz"), study
    )
    nib.save(nib.load(str(data / "labelsTr" / "demo_000.nii.gz")), label)
    _flip_x(study)
    _flip_x(label)
    return [("case_a", study, label)]


def _study_spad(root) -> list[tuple[str, str, str]]:
    """A 3D CT volume and a 2D radiograph (PNG) in one datastore: one network for both."""
    data = root / "data"
    generate_synthetic_spad(str(data), num_2d=1, num_3d=1, slice_spacings=(2.5,), size_2d=40, size_3d=32, seed=3)
    studies = []
    for sid, name in (("case_a", "ct_000.nii.gz"), ("case_b", "xray_000.png")):
        ext = ".png" if name.endswith(".png") else ".nii.gz"
        study, label = str(root / "studies" / f"{sid}{ext}"), str(root / f"{sid}_label{ext}")
        shutil.copyfile(data / "images" / name, study)
        shutil.copyfile(data / "labels" / name, label)
        studies.append((sid, study, label))
    return studies


def _study_midol(root) -> list[tuple[str, str, str]]:
    data = root / "data"
    generate_synthetic_midol(str(data), per_modality=1, size=48, seed=3)
    name = sorted(os.listdir(data / "dermoscopy"))[0]
    study, label = str(root / "studies" / "case_a.png"), str(root / "case_a_label.png")
    shutil.copyfile(data / "dermoscopy" / name, study)
    shutil.copyfile(data / "masks" / "dermoscopy" / name, label)
    return [("case_a", study, label)]


STUDIES = {"fratmae_petct": _study_fratmae, "spad_vit": _study_spad, "midol_multimodal": _study_midol}


def _installed_app(python: str, name: str) -> str | None:
    """The folder ``monailabel apps --download --name <name>`` copies from, where MONAI Label 0.8.5 looks first:
    ``sample-apps`` beside the ``monailabel`` package, then ``<prefix>/monailabel/sample-apps`` (where pip installs
    them); ``None`` when neither holds the app."""
    probe = "import sys, sysconfig; print(sysconfig.get_paths()['purelib']); print(sys.prefix)"
    res = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    purelib, prefix = res.stdout.splitlines()[:2]
    for root in (os.path.join(purelib, "sample-apps"), os.path.join(prefix, "monailabel", "sample-apps")):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


@pytest.fixture(scope="module")
def app_template(tmp_path_factory) -> str:
    """MONAI Label's stock ``monaibundle`` app, fetched once for the three servers (each gets its own copy). The
    copy is made here as ``monailabel apps --download`` makes it (the same folder, the same files left out), which
    saves that command's start (it imports MONAI Label); the command runs where the app is not in either place."""
    python = _label_python()
    apps = tmp_path_factory.mktemp("apps")
    installed = _installed_app(python, "monaibundle")
    if installed:
        shutil.copytree(installed, apps / "monaibundle", ignore=shutil.ignore_patterns("logs", "model", "__pycache__"))
        return str(apps / "monaibundle")
    cmd = [python, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(apps)]
    res = subprocess.run(cmd, cwd=str(apps), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return str(apps / "monaibundle")


@pytest.fixture(scope="module", params=sorted(STUDIES))
def server(request, tmp_path_factory, app_template):
    from medfm.utils import SERVED, build_served_bundle, merged_config

    python = _label_python()
    bundle = request.param
    spec = SERVED[bundle]["segmentation"]
    root = tmp_path_factory.mktemp(bundle)
    (root / "studies").mkdir()
    studies = STUDIES[bundle](root)

    # demo-size weights, deterministic
    cfg = os.path.join(REPO, "bundles", bundle, "configs")
    inference = merged_config([os.path.join(cfg, f) for f in spec.inference_files(demo=True)])
    torch.manual_seed(0)
    network = ConfigParser(inference).get_parsed_content("network_def")
    weights = str(root / "weights.pt")
    torch.save(network.state_dict(), weights)

    apps = root / "apps"
    shutil.copytree(app_template, apps / "monaibundle")
    served = apps / "monaibundle" / "model" / spec.name
    if bundle == "fratmae_petct":  # the tool's command line, as the docs show it, for one bundle
        tool = os.path.join(REPO, "tools", "serve_bundle.py")
        res = subprocess.run([sys.executable, tool, os.path.join(REPO, "bundles", bundle), "--weights", weights,
                              "--out", str(served), "--demo"], cwd=str(root), capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    else:  # what the tool calls, in this process
        build_served_bundle(os.path.join(REPO, "bundles", bundle), weights, served, demo=True)

    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(apps / "monaibundle"),
           "--studies", str(root / "studies"), "--conf", "models", spec.name, "--conf", "zoo_source", "local",
           "--conf", "sam2", "false", "--host", "127.0.0.1"]  # fmt: skip
    log_path = root / "server.log"
    proc, base, log = _start_server(cmd, root, log_path)
    try:
        yield {"bundle": bundle, "name": spec.name, "base": base, "root": root, "studies": studies,
               "served": served, "network": network, "inference": inference, "log": log_path}  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _read(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Array and affine (None for PNG) of a label or image file."""
    if path.endswith(".png"):
        return np.asarray(Image.open(path)), None
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _expected_fratmae(server, study: str) -> np.ndarray:
    """The lesion label computed without the bundle's transforms: window PET/CT in numpy, flip the stored LAS
    study to RAS, sliding window over the served weights, argmax, flip back."""
    img = nib.load(study)
    data = np.asarray(img.dataobj, dtype=np.float32)  # (X, Y, Z, 2): PET SUV, CT HU
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    pet = np.clip(data[..., 0] / 20.0, 0.0, 1.0)
    ct = np.clip((data[..., 1] + 1000.0) / 2000.0, 0.0, 1.0)
    x = torch.from_numpy(np.stack([pet, ct])[:, ::-1].copy())[None]  # RAS
    network = server["network"]
    network.load_state_dict(torch.load(server["served"] / "models" / "model.pt", weights_only=True))
    network.eval()
    cfg = ConfigParser(server["inference"])
    inferer = SlidingWindowInferer(
        roi_size=cfg.get_parsed_content("roi_size"), sw_batch_size=cfg["sw_batch_size"], overlap=cfg["sw_overlap"]
    )
    with torch.no_grad():
        pred = inferer(x, network).argmax(1)[0].numpy()
    return pred[::-1]


def _expected_standalone(server, study: str, run: str = "standalone") -> np.ndarray:
    """The label the served bundle's ``inference.json`` writes when run on the study without MONAI Label."""
    name = os.path.basename(study)
    data, out = server["root"] / run / name, server["root"] / f"{run}_out" / name
    data.mkdir(parents=True)
    shutil.copy(study, data)
    wf = ConfigWorkflow(
        config_file=str(server["served"] / "configs" / "inference.json"),
        workflow_type="inference",
        bundle_root=str(server["served"]),
        dataset_dir=str(data),
        output_dir=str(out),
        device="$torch.device('cpu')",
        num_workers=0,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (out / "failed.csv").read_text(encoding="utf-8").count("\n") == 1, "an input failed"  # header only
    (written,) = [str(out / f) for f in os.listdir(out) if f != "failed.csv"]
    label = _read(written)[0]
    if study.endswith(".png") and not written.endswith(".png"):
        # a 2D label saved as NIfTI keeps MONAI's PNG axes (width first); PIL reads PNGs height first
        label = np.squeeze(label).T
    return label


def test_infer_returns_label_on_the_study_grid(server):
    with open(os.path.join(REPO, "bundles", server["bundle"], "configs", "metadata.json")) as f:
        meta = json.load(f)
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    for sid, study, _ in server["studies"]:
        status, ctype, body = _request(f"{server['base']}/infer/{server['name']}?image={sid}&output=all")
        assert status == 200
        parts = _parse_multipart(ctype, body)
        params = json.loads(parts["params"])
        assert params["label_names"] == {v.lower(): int(k) for k, v in channels.items() if v != "background"}
        assert params["label_names"]

        ext = ".png" if study.endswith(".png") else ".nii.gz"
        out = server["root"] / f"pred_{sid}{ext}"
        out.write_bytes(parts["image"])
        got, affine = _read(str(out))
        image, image_affine = _read(study)
        assert got.shape == (image.shape[:2] if ext == ".png" else image.shape[:3]), sid
        assert got.dtype == np.uint8
        if image_affine is not None:
            np.testing.assert_allclose(affine, image_affine, atol=1e-4)
        assert set(np.unique(got)) <= set(params["label_names"].values()) | {0}

        if server["bundle"] == "fratmae_petct":
            expected = _expected_fratmae(server, study)
            # the check can tell orientations apart: the expected label is not left-right symmetric
            assert (expected != expected[::-1]).mean() > 0.01
        else:
            expected = _expected_standalone(server, study)
        assert expected.shape == got.shape, sid
        assert len(np.unique(expected)) > 1  # a constant label would make the comparison vacuous
        assert (got == expected).mean() > 0.999, sid  # same weights; torch builds differ in the last bits


def test_train_on_saved_labels_updates_the_served_model(server):
    for sid, study, label in server["studies"]:
        with open(label, "rb") as f:
            body, ctype = _multipart({"label": (os.path.basename(label), f.read())})
        url = f"{server['base']}/datastore/label?image={sid}&tag=final"
        status, _, _ = _request(url, "PUT", body, {"Content-Type": ctype})
        assert status == 200
        (saved,) = glob.glob(os.path.join(os.path.dirname(study), "labels", "final", f"{sid}.*"))
        assert np.array_equal(_read(saved)[0], _read(label)[0])

    model = server["served"] / "models" / "model.pt"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    old = torch.load(model, weights_only=True)
    payload = json.dumps({"max_epochs": 1, "device": "cpu"}).encode()
    url = f"{server['base']}/train/{server['name']}?run_sync=true"
    status, _, _ = _request(url, "POST", payload, {"Content-Type": "application/json"})
    assert status == 200
    assert hashlib.sha256(model.read_bytes()).hexdigest() != before, server["log"].read_text()[-3000:]
    new = torch.load(model, weights_only=True)
    assert new.keys() == old.keys()
    # trained on from the served weights (MONAI Label's CheckpointLoader), not from a fresh initialisation:
    # one epoch moves them by a small fraction of their norm
    change = sum(float((new[k].float() - old[k].float()).pow(2).sum()) for k in old)
    norm = sum(float(old[k].float().pow(2).sum()) for k in old)
    assert 0 < change < 1e-2 * norm

    # /infer serves the re-trained weights: its label is what they give outside MONAI Label
    sid, study, _ = server["studies"][0]
    status, _, body = _request(f"{server['base']}/infer/{server['name']}?image={sid}&output=image")
    assert status == 200
    ext = ".png" if study.endswith(".png") else ".nii.gz"
    out = server["root"] / f"pred_retrained_{sid}{ext}"
    out.write_bytes(body)
    if server["bundle"] == "fratmae_petct":
        expected = _expected_fratmae(server, study)  # reads the re-trained models/model.pt
    else:
        expected = _expected_standalone(server, study, run="retrained")
    assert (_read(str(out))[0] == expected).mean() > 0.999
