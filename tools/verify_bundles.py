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
"""

from __future__ import annotations

import argparse
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


def check_bundle(bundle: Path, schema: Path, full: bool) -> list[tuple[str, bool, str]]:
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
    from monai.bundle.config_parser import ConfigParser

    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], str | None]) -> None:
        try:
            results.append((name, True, fn() or ""))
        except Exception as e:  # report and go on with the next check
            results.append((name, False, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
            traceback.print_exc(file=sys.stderr)

    def files(names: tuple[str, ...], kind: str) -> str:
        missing = [f for f in names if not (bundle / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{kind} files missing: {missing}")
        return f"{len(names)} present"

    check("required files", lambda: files(REQUIRED, "required"))
    check("preferred files", lambda: files(PREFERRED, "preferred"))
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())

    def changelog() -> str:
        if meta["version"] not in meta.get("changelog", {}):
            raise ValueError(f"version {meta['version']} is not in the changelog")
        return meta["version"]

    def json_configs() -> str:
        configs = sorted((bundle / "configs").glob("*.json"))
        for c in configs:
            json.loads(c.read_text())
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
    check("verify_net_in_out", lambda: verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=infer))
    if full and len(infer) > 1:
        check("verify_net_in_out (full size)",
              lambda: verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=infer[:1]))  # fmt: skip

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", help="bundle folders (default: every bundle under bundles/)")
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="local copy of the metadata schema")
    p.add_argument("--full", action="store_true", help="also verify_net_in_out at the paper's network size")
    args = p.parse_args(argv)
    bundles = [Path(b) for b in args.bundles] or sorted(d.parent.parent for d in (REPO / "bundles").glob("*/configs/metadata.json"))
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
