#!/usr/bin/env python
"""How much of each bundle's configs is copied between its own config files.

    python tools/config_repetition.py [--run 5] [--json] [bundles/<name> ...]

A *meaningful line* is a line of a config JSON file with more than brackets, braces and commas on it, compared
with its leading and trailing white space removed. A meaningful line counts as *copied* when it lies in a run of
``--run`` (default 5) consecutive meaningful lines that appears, line for line, in another config file of the same
bundle. The figure per bundle is copied lines / meaningful lines over all its config files (``metadata.json``
included: it is one of the bundle's configs). Exit status 0; the table goes to stdout (``--json``: one object per
bundle).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_STRUCTURAL = set("[]{},")


def meaningful_lines(path: Path) -> list[str]:
    """The meaningful lines of one config file, stripped, in order."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not set(ln) <= _STRUCTURAL]


def copied_mask(lines: list[str], others: set[tuple[str, ...]], run: int) -> list[bool]:
    """For each line: does it lie in a window of ``run`` consecutive lines found in ``others``?"""
    mask = [False] * len(lines)
    for i in range(len(lines) - run + 1):
        if tuple(lines[i : i + run]) in others:
            for j in range(i, i + run):
                mask[j] = True
    return mask


def windows(lines: list[str], run: int) -> set[tuple[str, ...]]:
    return {tuple(lines[i : i + run]) for i in range(len(lines) - run + 1)}


def bundle_repetition(bundle: Path, run: int = 5) -> dict:
    """``{"bundle", "files", "meaningful", "copied", "fraction", "per_file": {name: [copied, meaningful]}}``."""
    files = sorted((bundle / "configs").glob("*.json"))
    if not files:
        raise ValueError(f"{bundle}: no config files under {bundle / 'configs'}.")
    lines = {f.name: meaningful_lines(f) for f in files}
    wins = {name: windows(ls, run) for name, ls in lines.items()}
    per_file = {}
    for name, ls in lines.items():
        others = set().union(*(w for n, w in wins.items() if n != name))
        per_file[name] = [sum(copied_mask(ls, others, run)), len(ls)]
    copied = sum(c for c, _ in per_file.values())
    total = sum(n for _, n in per_file.values())
    return {"bundle": bundle.name, "files": len(files), "meaningful": total, "copied": copied,
            "fraction": round(copied / total, 4) if total else 0.0, "per_file": per_file}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="*", help="bundle folders (default: every bundle under bundles/)")
    parser.add_argument("--run", type=int, default=5, help="shortest copied run of meaningful lines (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per bundle instead of a table")
    args = parser.parse_args(argv)
    if args.run < 1:
        parser.error("--run must be at least 1.")
    found = sorted(p.parent.parent for p in REPO.glob("bundles/*/configs/metadata.json"))
    bundles = [Path(b) for b in args.bundles] or found
    results = [bundle_repetition(b, args.run) for b in bundles]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    print(f"| bundle | config files | meaningful lines | in copied runs of {args.run}+ | share |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['bundle']} | {r['files']} | {r['meaningful']} | {r['copied']} | {100 * r['fraction']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
