"""Download a bundle zip, check its sha256, and extract it safely.

    python tools/download_bundle.py --url https://…/fratmae_petct_v0.3.0.zip --name fratmae_petct \\
        --sha256 <published hash> --bundle-dir ./bundles_downloaded

Unlike ``python -m monai.bundle download --url …``, a wrong hash stops before anything is extracted, and a
member that would land outside ``<bundle-dir>/<name>`` (absolute path, ``..``, symbolic link) is refused.
"""

from __future__ import annotations

import argparse

from medfm.utils import download_bundle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True, help="bundle name, the zip's top folder")
    p.add_argument("--sha256", required=True, help="the published sha256 of the zip")
    p.add_argument("--bundle-dir", required=True, help="where to extract")
    args = p.parse_args(argv)
    print(download_bundle(args.url, args.name, args.bundle_dir, args.sha256))


if __name__ == "__main__":
    main()
