"""Serving a directory over HTTP on the host, where pods fetch model files from (the node's host address)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def file_server(directory: Path, host: str = "0.0.0.0") -> Iterator[int]:
    """Serves `directory` on all addresses (pods reach it through the host address); yields the port."""
    server = ThreadingHTTPServer((host, 0), partial(_QuietHandler, directory=str(directory)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)
