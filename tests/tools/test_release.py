"""Release zip -> loopback HTTP -> verified download and MONAI's download -> monai.bundle.load -> fine-tuning."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
import zipfile

import pytest
import torch
import yaml
from monai.bundle import download as monai_download
from monai.bundle import load as bundle_load
from monai.bundle import run as monai_run

from medfm.data import generate_synthetic_petct
from medfm.networks import load_fratmae_encoders
from medfm.utils import download_bundle, package_bundle, sha256_file

from ..bundles.helpers import REPO, captured_logs, workflow

pytestmark = pytest.mark.slow  # end-to-end runs through the bundle configs

B = "fratmae_petct"
DEMO_NET = {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "mlp_dim": 192, "patch_size": 8,
            "decoder_hidden_size": 64, "decoder_num_layers": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 128,
            "text_width": 64, "text_num_layers": 1, "text_num_heads": 4, "embed_dim": 64}  # fmt: skip


@contextlib.contextmanager
def serve(directory):
    """An HTTP server for ``directory`` on a free loopback port; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A demo-size segmentation model whose encoders come from a demo pre-training, packaged and served."""
    root = tmp_path_factory.mktemp("release")
    data = str(root / "data")
    generate_synthetic_petct(data, num_cases=4, shape=(48, 32, 96), spacing=(10.0, 10.0, 20.0), seed=5)
    pre = workflow(B, ["train.json", "demo.json"], dataset_dir=data, output_dir=str(root / "pre"), epochs=1)
    pre.initialize()
    pre.run()
    inf = workflow(B, ["inference.json", "demo_inference.json"], workflow_type="infer", dataset_dir=data)
    inf.initialize()
    seg = inf.parser.get_parsed_content("network_def")
    load_fratmae_encoders(seg, root / "pre" / "models" / "model.pt")
    weights = root / "model.pt"
    torch.save(seg.state_dict(), weights)
    (root / "dist").mkdir()
    with serve(root / "dist") as base:
        zip_path, digest = package_bundle(f"{REPO}/bundles/{B}", weights, root / "dist", url_base=base,
                                          pretrained=root / "pre" / "models" / "model.pt",
                                          inference_configs=("inference.json", "demo_inference.json"),
                                          finetune_configs=("finetune_seg.json", "demo_seg.json"))  # fmt: skip
        yield {"root": root, "data": data, "zip": zip_path, "sha": digest, "url": f"{base}/{zip_path.name}",
               "weights": weights, "base": base}  # fmt: skip


def test_zip_layout_and_large_files(release):
    with zipfile.ZipFile(release["zip"]) as zf:
        names = zf.namelist()
        entry = yaml.safe_load(zf.read(f"{B}/large_files.yml"))["large_files"][0]
    version = json.load(open(f"{REPO}/bundles/{B}/configs/metadata.json", encoding="utf-8"))["version"]
    assert release["zip"].name == f"{B}_v{version}.zip"
    assert all(n.startswith(f"{B}/") for n in names)
    assert {f"{B}/configs/train.json", f"{B}/configs/inference.json", f"{B}/configs/metadata.json",
            f"{B}/docs/README.md", f"{B}/LICENSE", f"{B}/models/model.pt"} <= set(names)  # fmt: skip
    assert not [n for n in names if "/runs/" in n or "/demo_data/" in n]
    assert entry == {"path": "models/model.pt", "url": f"{release['base']}/{B}_v{version}/models/model.pt",
                     "hash_val": sha256_file(release["weights"]), "hash_type": "sha256"}  # fmt: skip


def test_verified_download_then_monai_download_load_and_finetune(release):
    root = release["root"]
    got = download_bundle(release["url"], B, root / "dl_ours", release["sha"])
    assert sha256_file(got / "models" / "model.pt") == sha256_file(release["weights"])
    monai_download(name=B, bundle_dir=str(root / "dl_monai"), url=release["url"])  # what the CLI's download calls
    bundle = root / "dl_monai" / B
    assert (bundle / "configs" / "train.json").is_file()
    # monai.bundle.load builds train.json's network (FratMAE) and takes the released pre-trained encoders by name
    net = bundle_load(B, bundle_dir=str(root / "dl_monai"), workflow_type="train", net_override=DEMO_NET,
                      model_file="models/pretrained.pt")  # fmt: skip
    released = torch.load(bundle / "models" / "pretrained.pt", weights_only=True)
    assert all(torch.equal(v, released[k]) for k, v in net.state_dict().items()), "pre-training state not loaded"
    # fine-tuning from the downloaded pre-trained encoders, with the downloaded bundle's own configs (in this
    # process, as ``python -m monai.bundle run`` would run them)
    files = [str(bundle / "configs" / "finetune_seg.json"), str(bundle / "configs" / "demo_seg.json")]
    with captured_logs() as log:
        monai_run(run_id="run", config_file=files, dataset_dir=release["data"], output_dir=str(root / "ft"),
                  pretrained_checkpoint=str(bundle / "models" / "pretrained.pt"), epochs=1, val_interval=1)  # fmt: skip
    assert f"loaded 58 encoder tensors from {bundle}/models/pretrained.pt" in "\n".join(log)
    assert (root / "ft" / "models" / "model.pt").is_file()


def test_wrong_hash_is_refused_and_nothing_extracted(release, tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        download_bundle(release["url"], B, tmp_path / "dl", "0" * 64)
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("member", [f"{B}/../escaped.txt", "/abs/escaped.txt", "other/escaped.txt"])
def test_member_escaping_the_bundle_folder_is_refused(tmp_path, member):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(f"{B}/configs/train.json", "{}")
        zf.writestr(member, "x")
    with serve(tmp_path) as base, pytest.raises(ValueError, match="outside"):
        download_bundle(f"{base}/bad.zip", B, tmp_path / "dl", sha256_file(bad))
    assert not (tmp_path / "dl").exists() and not (tmp_path / "escaped.txt").exists()
