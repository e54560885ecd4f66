"""Test helpers: real runtime processes, bounded waits, tiny HTTP clients. No fakes here."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from modelops_local.files import file_server  # noqa: F401  (re-exported for tests)

T = TypeVar("T")
RUNTIME = str(Path(sys.executable).parent / "modelops-runtime")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], T | None], timeout: float = 30, interval: float = 0.1) -> T:
    """Polls `check` until it returns something truthy; fails the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Http:
    """A keep-alive HTTP/1.1 client for one host:port."""

    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def json(self, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = None if doc is None else json.dumps(doc).encode()
        status, _, data = self.request(method, path, body, {"content-type": "application/json"} if body else None)
        return status, json.loads(data) if data else None

    def close(self) -> None:
        self.conn.close()


class RuntimeProcess:
    """`modelops-runtime` as a real child process on a free loopback port."""

    def __init__(self, model: str | Path, name: str = "m", *args: str, env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.argv = [RUNTIME, "--model", str(model), "--name", name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--intra-op-threads", "1", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> RuntimeProcess:
        if self.log_dir:
            with open(self.log_dir / f"runtime-{self.port}.out", "wb") as out, \
                    open(self.log_dir / f"runtime-{self.port}.err", "wb") as err:
                self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env)
        else:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env)
        if wait_ready:
            wait_until("the runtime to be ready", self.ready, timeout=60)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"runtime exited with {self.proc.returncode}: {self.stderr()}")
        try:
            c = Http("127.0.0.1", self.port, timeout=2)
            status, _, _ = c.request("GET", "/v2/health/ready")
            c.close()
            return status == 200
        except OSError:
            return False

    def stderr(self) -> str:
        if self.log_dir:
            return (self.log_dir / f"runtime-{self.port}.err").read_text(errors="replace")
        if self.proc and self.proc.stderr and self.proc.poll() is not None:
            return self.proc.stderr.read().decode(errors="replace")
        return ""

    def client(self) -> Http:
        return Http("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RuntimeProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def infer_body(name: str, rows: list[list[float]], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    flat = [v for r in rows for v in r]
    return {"inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype, "data": flat}],
            **extra}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total
