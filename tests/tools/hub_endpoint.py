"""A loopback stand-in for the Hugging Face Hub's HTTP API, serving one folder as one model repository.

It answers the requests ``huggingface_hub.snapshot_download`` makes (repository info at a revision, the recursive
file tree, ``HEAD``/``GET`` of each file under ``resolve/<commit>/``), so ``python -m monai.bundle download --source
huggingface_hub`` runs unchanged with ``HF_ENDPOINT`` pointing here, without the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _handler(root: Path, repo_id: str, revision: str, commit: str) -> type[http.server.BaseHTTPRequestHandler]:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
            self.send_response(code)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
            api = f"/api/models/{repo_id}/"
            as_json = {"Content-Type": "application/json"}
            if path == api + f"revision/{revision}":
                info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                return self._reply(200, json.dumps(info).encode(), as_json, head)
            if path == api + f"tree/{commit}":
                tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                         "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files]  # fmt: skip
                return self._reply(200, json.dumps(tree).encode(), as_json, head)
            prefix = f"/{repo_id}/resolve/{commit}/"
            if path.startswith(prefix) and path[len(prefix) :] in files:
                data = (root / path[len(prefix) :]).read_bytes()
                headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._reply(200, data, headers, head)
            return self._reply(404, b"{}", {"X-Error-Code": "EntryNotFound", **as_json}, head)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

    return Handler


@contextmanager
def hub_endpoint(root: Path, repo_id: str, revision: str, commit: str = "0123456789abcdef" * 2 + "01234567"
                 ) -> Iterator[str]:  # fmt: skip
    """Serve ``root`` as ``repo_id`` at ``revision`` on a free loopback port; yields the endpoint URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), repo_id, revision, commit))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
