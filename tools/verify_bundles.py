"""The model zoo's checks for every bundle under ``bundles/``, offline.

    python tools/verify_bundles.py [--schema ../shared/schemas/meta_schema_20240725.json] [bundle ...]

Per bundle: required and preferred files; the metadata version listed in its changelog; every config file
valid JSON; ``verify_metadata`` against the local schema; ``verify_net_in_out`` on ``inference.json``;
``ckpt_export`` (traced TorchScript) of freshly initialised weights, then ``torch.jit.load`` and a forward
pass that matches the eager network. A network of several named inputs (metadata without ``inputs.image``,
e.g. Pan-FM's organ images + presence mask) gets its own in/out check instead, and its export is reported
SKIP. The network checks use ``configs/demo_inference.json`` merged over
``inference.json`` when the bundle has one (the paper-size network is checked by ``verify_net_in_out`` too
with ``--full``). Prints one line per check and exits 1 if any fails.

    python tools/verify_bundles.py --release dist/fratmae_petct_v0.3.0.zip [...]

checks release zips as the zoo's CI does: each ``large_files.yml`` entry fetched again from its URL by MONAI's
``download_large_files`` (hash-checked), ``required_packages_version`` without ``medfm`` and at installed
versions, ``models/model.pt`` among the required files and fitting ``inference.json``'s network, a scripted
``ckpt_export`` (reported SKIP where ``docs/README.md`` says the network cannot be scripted), then the checks
above on the extracted bundle, with the bundle folder on ``sys.path`` as MONAI Label puts it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
REQUIRED = ("LICENSE", "configs/metadata.json")
PREFERRED = ("configs/inference.json", "configs/train.json", "configs/evaluate.json", "configs/logging.conf",
             "configs/multi_gpu_train.json", "docs/README.md")  # fmt: skip


def _input_shape(meta: dict, n: int = 2) -> list[int]:
    """(1, C, *spatial) from ``network_data_format.inputs.image``, with ``"16*n"``-style sizes at ``n``."""
    image = meta["network_data_format"]["inputs"]["image"]
    spatial = [int(eval(str(s), {"n": n})) for s in image["spatial_shape"]]
    return [1, int(image["num_channels"]), *spatial]


def _multi_input_in_out(meta: dict, infer: list[str], bundle: Path) -> str:
    """``verify_net_in_out`` for a network of several named inputs: ``image_<organ>`` tensors (as the metadata
    gives them, at the demo config's shapes when one is merged) and a ``present`` mask; the output must have
    ``outputs.pred.num_channels`` channels, and a subject missing organs must still give finite outputs."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser()
    parser.read_config(infer)
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def").eval()
    organs = list(parser.get_parsed_content("organs"))
    shapes = parser.get_parsed_content("organ_shapes")
    declared = [k.removeprefix("image_") for k in meta["network_data_format"]["inputs"] if k.startswith("image_")]
    if declared != organs:
        raise ValueError(f"metadata inputs {declared} differ from the config's organs {organs}")
    images = {o: torch.rand(2, 1, *shapes[o]) for o in organs}
    present = torch.ones(2, len(organs), dtype=torch.bool)
    present[1, 1:] = False  # a subject with one organ
    with torch.no_grad():
        out = net(images, present)
    want = int(meta["network_data_format"]["outputs"]["pred"]["num_channels"])
    if tuple(out.shape) != (2, want) or not torch.isfinite(out).all():
        raise ValueError(f"output {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}), expected (2, {want})")
    return f"{len(organs)} organ inputs + present -> (2, {want})"


def _record_check(results: list, name: str, fn: Callable[[], str | None]) -> None:
    """Run one check: append ``(name, True, note)``, or ``(name, False, first line of the error)`` and print the
    traceback to stderr, then go on with the next check."""
    try:
        results.append((name, True, fn() or ""))
    except Exception as e:  # report and go on with the next check
        results.append((name, False, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
        traceback.print_exc(file=sys.stderr)


def check_bundle(
    bundle: Path, schema: Path, full: bool, required: tuple[str, ...] = REQUIRED
) -> list[tuple[str, bool, str]]:
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
    from monai.bundle.config_parser import ConfigParser

    results: list[tuple[str, bool, str]] = []
    check = functools.partial(_record_check, results)

    def files(names: tuple[str, ...], kind: str) -> str:
        missing = [f for f in names if not (bundle / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{kind} files missing: {missing}")
        return f"{len(names)} present"

    check("required files", lambda: files(required, "required"))
    check("preferred files", lambda: files(PREFERRED, "preferred"))
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))

    def changelog() -> str:
        if meta["version"] not in meta.get("changelog", {}):
            raise ValueError(f"version {meta['version']} is not in the changelog")
        return meta["version"]

    def json_configs() -> str:
        configs = sorted((bundle / "configs").glob("*.json"))
        for c in configs:
            json.loads(c.read_text(encoding="utf-8"))
        return f"{len(configs)} files"

    check("version in changelog", changelog)
    check("configs are JSON", json_configs)
    check("verify_metadata", lambda: verify_metadata(meta_file=str(meta_file), filepath=str(schema)))
    override = bundle / "configs" / "demo_inference.json"
    infer = [str(bundle / "configs" / "inference.json")] + ([str(override)] if override.is_file() else [])
    inputs = meta["network_data_format"]["inputs"]
    if "image" not in inputs:  # a network of several inputs (Pan-FM: one image per organ + a presence mask)
        check("network in/out (several inputs)", lambda: _multi_input_in_out(meta, infer, bundle))
        results.append(("ckpt_export + torch.jit.load", None, "skipped: the network takes a dict of inputs"))
        return results
    check("verify_net_in_out",
          lambda: verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=infer))  # fmt: skip
    if full and len(infer) > 1:
        check("verify_net_in_out (full size)",
              lambda: verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=infer[:1]))

    def export() -> str:
        parser = ConfigParser()
        parser.read_config(infer)
        parser["bundle_root"] = str(bundle)
        net = parser.get_parsed_content("network_def").eval()
        shape = _input_shape(meta)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, ts = Path(tmp) / "model.pt", Path(tmp) / "model.ts"
            torch.save(net.state_dict(), ckpt)
            ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt), meta_file=str(meta_file),
                        config_file=infer, use_trace=True, input_shape=shape)  # fmt: skip
            loaded = torch.jit.load(str(ts))
            x = torch.rand(shape)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), net(x), atol=1e-4, rtol=1e-4)
        return f"traced at {shape}, torch.jit.load output matches"

    check("ckpt_export + torch.jit.load", export)
    return results


def check_release(zip_path: Path, schema: Path, full: bool, work: Path) -> list[tuple[str, bool | None, str]]:
    """The zoo's checks on a release zip: extracted with its large files fetched again from their URLs
    (``download_large_files``, hash-checked), public-only requirements, ``models/model.pt`` fitting
    ``inference.json``'s network, scripted TorchScript export (or a documented reason it is skipped), then
    :func:`check_bundle`. The bundle folder is put on ``sys.path`` first, as MONAI Label and the bundle's docs do
    (the code copy alone is exercised where ``medfm`` is not installed by ``tests/tools/test_release_bundles.py``)."""
    import importlib.metadata
    import shutil
    import zipfile

    import yaml
    from monai.bundle import ckpt_export
    from monai.bundle.scripts import download_large_files

    from medfm.utils import check_weights_fit, safe_extract

    with zipfile.ZipFile(zip_path) as zf:
        name = zf.namelist()[0].split("/")[0]
    bundle = safe_extract(zip_path, work, name)
    sys.path.insert(0, str(bundle))
    results: list[tuple[str, bool | None, str]] = []
    check = functools.partial(_record_check, results)

    def large_files() -> str:
        entries = yaml.safe_load((bundle / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
        fresh = work / "large_files" / name
        shutil.copytree(bundle, fresh)
        for e in entries:
            if "url" not in e:
                raise ValueError(f"large_files.yml entry {e['path']} has no url")
            (fresh / e["path"]).unlink()
        download_large_files(bundle_path=str(fresh))  # checks each file's hash
        return f"{len(entries)} files downloaded and hash-checked"

    def requirements() -> str:
        meta_text = (bundle / "configs" / "metadata.json").read_text(encoding="utf-8")
        required = json.loads(meta_text)["required_packages_version"]
        wrong = {k: v for k, v in required.items() if k == "medfm" or importlib.metadata.version(k) != v}
        if wrong:
            raise ValueError(f"not installable as listed (or not the installed version): {wrong}")
        return ", ".join(f"{k}=={v}" for k, v in required.items())

    def weights_fit() -> str:
        from monai.bundle.config_parser import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        net = parser.get_parsed_content("network_def")
        path = bundle / "models" / "model.pt"
        check_weights_fit(net, torch.load(path, map_location="cpu", weights_only=True), path)
        return f"all {len(net.state_dict())} tensors of {type(net).__name__}"

    def scripted() -> tuple[bool | None, str]:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ckpt_export(net_id="network_def", filepath=f"{tmp}/model.ts",
                            ckpt_file=str(bundle / "models" / "model.pt"),
                            meta_file=str(bundle / "configs" / "metadata.json"),
                            config_file=str(bundle / "configs" / "inference.json"),
                            bundle_root=str(bundle))  # fmt: skip
                return True, "scripted and saved"
            except Exception as e:
                if "cannot be scripted" in (bundle / "docs" / "README.md").read_text(encoding="utf-8"):
                    return None, f"the network cannot be scripted ({type(e).__name__}), as docs/README.md says"
                first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:200]
                return False, f"scripting fails ({type(e).__name__}: {first}); docs/README.md does not say so"

    check("large files (download_large_files)", large_files)
    check("requirements", requirements)
    check("models/model.pt fits inference.json", weights_fit)
    results.append(("ckpt_export (scripted)", *scripted()))
    results += check_bundle(bundle, schema, full, required=(*REQUIRED, "models/model.pt"))
    sys.path.remove(str(bundle))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", help="bundle folders (default: every bundle under bundles/)")
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="local copy of the metadata schema")
    p.add_argument("--full", action="store_true", help="also verify_net_in_out at the paper's network size")
    p.add_argument("--release", nargs="+", default=None, metavar="ZIP",
                   help="check release zips instead of bundle folders (large files fetched from their URLs)")
    args = p.parse_args(argv)
    if args.release:
        failed = 0
        with tempfile.TemporaryDirectory() as work:
            for i, z in enumerate(args.release):
                checks = check_release(Path(z).resolve(), Path(args.schema), args.full, Path(work) / str(i))
                for name, ok, detail in checks:
                    tag = "SKIP" if ok is None else "PASS" if ok else "FAIL"
                    print(f"{tag} {Path(z).name}: {name}{': ' + detail if detail else ''}", flush=True)
                    failed += ok is False
        print(f"{failed} check(s) failed" if failed else "all checks passed", flush=True)
        return 1 if failed else 0
    found = sorted(d.parent.parent for d in (REPO / "bundles").glob("*/configs/metadata.json"))
    bundles = [Path(b) for b in args.bundles] or found
    if not Path(args.schema).is_file():
        print(f"FAIL schema: {args.schema} does not exist", flush=True)
        return 1
    failed = 0
    for bundle in bundles:
        for name, ok, detail in check_bundle(bundle.resolve(), Path(args.schema), args.full):
            tag = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            print(f"{tag} {bundle.name}: {name}{': ' + detail if detail else ''}", flush=True)
            failed += ok is False
    print(f"{failed} check(s) failed" if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
