"""Build a release zip of a bundle (plus the weights files its large_files.yml points to) and print its sha256.

    python tools/package_bundle.py bundles/fratmae_petct --weights runs/seg/models/model.pt --out dist \\
        --url-base https://example.org/releases [--pretrained runs/train/models/model.pt] [--torchscript model.ts] \\
        [--inference-config inference.json --inference-config demo_inference.json] [--hub-dir hub/fratmae_petct]

``--weights`` are the weights of ``inference.json``'s network (the fine-tuned task model; refused, naming the
matched/total tensor count, when they do not fit it); ``--pretrained`` ships the pre-trained encoders as
``models/pretrained.pt`` for the fine-tuning configs (refused when the fine-tuning network cannot load
them). The zip is ``<out>/<bundle>_v<version>.zip`` with the top
folder ``<bundle>/`` (configs, docs, LICENSE, models, a copy of the ``medfm`` code, ``large_files.yml``); the
weights files go to ``<out>/<bundle>_v<version>/models/``. Publish ``<out>`` at ``--url-base`` and the printed
sha256 with it; ``tools/download_bundle.py`` checks it. Layout and the import mechanism:
``medfm.utils.release``. ``--hub-dir`` also writes the Hugging Face Hub repository layout of the zip
(``medfm.utils.hub``).
"""

from __future__ import annotations

import argparse

from medfm.utils import package_bundle, write_hub_layout


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder, e.g. bundles/fratmae_petct")
    p.add_argument("--weights", required=True, help="weights of inference.json's network, shipped as models/model.pt")
    p.add_argument("--out", required=True, help="folder for the zip and the published weights files")
    p.add_argument("--url-base", default=None, help="where --out will be published (each large_files.yml URL)")
    p.add_argument("--pretrained", default=None, help="pre-trained encoder weights, shipped as models/pretrained.pt")
    p.add_argument("--torchscript", default=None, help="optional TorchScript file to ship as models/model.ts")
    p.add_argument("--inference-config", action="append", default=None,
                   help="config merged into the released inference.json (repeat; default inference.json)")  # fmt: skip
    p.add_argument("--finetune-config", action="append", default=None,
                   help="fine-tuning config that must load --pretrained (repeat; default the bundle's)")  # fmt: skip
    p.add_argument("--hub-dir", default=None, help="also write the Hugging Face Hub repository layout (a new folder)")
    args = p.parse_args(argv)
    configs = tuple(args.inference_config or ("inference.json",))
    finetune = tuple(args.finetune_config) if args.finetune_config else None
    path, digest = package_bundle(args.bundle, args.weights, args.out, args.torchscript, args.url_base,
                                  args.pretrained, configs, finetune)  # fmt: skip
    print(f"{path}\nsha256 {digest}")
    if args.hub_dir:
        print(f"hub layout {write_hub_layout(path, args.hub_dir)}")


if __name__ == "__main__":
    main()
