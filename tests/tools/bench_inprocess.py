"""``tools/bench.py`` called in this process: the records it would print, one dict per JSON line.

``test_bench.py`` runs the tool once as a command (its stdout holds JSON lines only); the other bench tests call
its ``main`` here, which saves an interpreter start per run.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def bench_records(monkeypatch, *args: str) -> list[dict]:
    """``python tools/bench.py *args`` in this process (asserting exit code 0); returns its JSON records."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench
    from benchlib import harness

    out = io.StringIO()
    monkeypatch.setattr(harness, "_STDOUT", out)  # the stream every case's records go to
    monkeypatch.setattr(bench, "_STDOUT", sys.stdout)  # what main() restores as stdout when it returns
    assert bench.main(list(args)) == 0
    return [json.loads(ln) for ln in out.getvalue().splitlines() if ln.strip()]
