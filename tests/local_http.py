"""A local HTTP server for download tests: serves the files of a folder on 127.0.0.1 (no network needed)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import threading
from pathlib import Path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """Yields the base URL ("http://127.0.0.1:PORT/") of a server for ``folder``; stopped on exit."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def official_from(monkeypatch, key: str, path: Path, base_url: str):
    """Point the official weight ``key`` of models.weights.DEFAULT_WEIGHTS at ``base_url`` + the file's name,
    with ``path``'s sha256 as the published checksum. Returns the patched WeightFile."""
    from blended_diffusion.models import weights as W
    w = dataclasses.replace(W.DEFAULT_WEIGHTS[key], url=base_url + path.name,
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest(), sha256_prefix="", sha256_suffix="")
    monkeypatch.setitem(W.DEFAULT_WEIGHTS, key, w)
    return w
