"""Build a release zip of a bundle and print its sha256.

    python tools/package_bundle.py bundles/fratmae_petct --weights runs/seg/models/model.pt --out dist \\
        [--torchscript model.ts] [--url-base https://example.org/releases/v0.2.0]

The zip is ``<out>/<bundle>_v<version>.zip`` with the top folder ``<bundle>/`` (configs, docs, LICENSE,
``models/model.pt``, optional ``models/model.ts``, ``large_files.yml`` holding the weights' sha256). Publish
the zip and its printed sha256 together; ``tools/download_bundle.py`` checks it.
"""

from __future__ import annotations

import argparse

from medfm.utils import package_bundle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder, e.g. bundles/fratmae_petct")
    p.add_argument("--weights", required=True, help="state dict to ship as models/model.pt")
    p.add_argument("--out", required=True, help="folder for the zip")
    p.add_argument("--torchscript", default=None, help="optional TorchScript file to ship as models/model.ts")
    p.add_argument("--url-base", default=None, help="where the zip will be published (recorded in large_files.yml)")
    args = p.parse_args(argv)
    path, digest = package_bundle(args.bundle, args.weights, args.out, args.torchscript, args.url_base)
    print(f"{path}\nsha256 {digest}")


if __name__ == "__main__":
    main()
