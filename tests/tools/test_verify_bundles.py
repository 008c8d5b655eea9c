import contextlib
import io
import json
import shutil
import sys
import types

import pytest

from ..bundles.helpers import REPO, SCHEMA

pytestmark = pytest.mark.slow  # runs the bundles or the tool end to end


def _run(*args):
    """``python tools/verify_bundles.py --schema SCHEMA *args`` in this process (its release mode, which puts bundle
    folders on ``sys.path``, runs as a command in ``test_release_bundles.py``)."""
    sys.path.insert(0, f"{REPO}/tools")
    try:
        from verify_bundles import main
    finally:
        sys.path.remove(f"{REPO}/tools")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--schema", SCHEMA, *args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr="")


@pytest.fixture(autouse=True)
def _schema():
    import os

    if not os.path.isfile(SCHEMA):
        pytest.skip(f"metadata schema not found at {SCHEMA}")


def test_every_bundle_passes_the_model_zoo_checks():
    res = _run()
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert lines and all(ln.startswith("PASS") for ln in lines)
    for check in ("required files", "version in changelog", "verify_metadata", "verify_net_in_out", "ckpt_export"):
        assert any(check in ln for ln in lines), check


def test_a_version_missing_from_the_changelog_fails(tmp_path):
    bundle = tmp_path / "fratmae_petct"
    shutil.copytree(
        f"{REPO}/bundles/fratmae_petct", bundle, ignore=shutil.ignore_patterns("runs", "demo_data", "models")
    )
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "9.9.9"
    meta_file.write_text(json.dumps(meta, indent=4))
    res = _run(str(bundle))
    assert res.returncode == 1
    assert "FAIL fratmae_petct: version in changelog" in res.stdout
