"""HTTP/1.1 transport for the Open Inference Protocol v2: a thin adapter over the data plane.

An asyncio Protocol with httptools' C parser, keep-alive and pipelining; no framework. Each
connection answers its requests in order; inference answers arrive by future callback, without a
Task per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools
import orjson

from . import __version__
from .dataplane import DataPlane, Result
from .errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RuntimeServerError,
    TooManyRequests,
    UnsupportedMediaType,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Registry

log = logging.getLogger("modelops.runtime")

JSON = b"application/json"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_WANTED_HEADERS = {
    b"content-type", b"content-length", b"content-encoding", b"inference-header-content-length", b"transfer-encoding",
}


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "received")

    def __init__(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes, keep_alive: bool) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.received = time.perf_counter()


class HttpProtocol(asyncio.Protocol):
    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.busy = False
        self.closing = False
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._rejected = False

    # -- connection --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed HTTP request: {e}")

    def _fail(self, status: int, message: str) -> None:
        self._rejected = True
        self.write(status, orjson.dumps({"error": message}), JSON, keep_alive=False)

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _WANTED_HEADERS:
            self._headers[name] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.app.max_body:
            # Answer before the body arrives, then close: the rest of the upload is not read.
            self._fail(413, f"request body of {int(length)} bytes exceeds the limit of {self.app.max_body} bytes")

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._size += len(body)
        if self._size > self.app.max_body:
            self._fail(413, f"request body exceeds the limit of {self.app.max_body} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        path = self._url.decode("latin-1").split("?", 1)[0]
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        req = Request(self.parser.get_method(), path, self._headers, body, self.parser.should_keep_alive())
        self.queue.append(req)
        if not self.busy:
            self._next()

    # -- dispatch ----------------------------------------------------------------------------------
    def _next(self) -> None:
        while self.queue and not self.busy and self.transport is not None:
            self.busy = True
            self.app.handle(self.queue.popleft(), self)

    def write(self, status: int, body: bytes, content_type: bytes, keep_alive: bool = True,
              extra: list[tuple[bytes, bytes]] | None = None) -> None:
        t = self.transport
        if t is None:
            return
        keep_alive = keep_alive and not self.closing and not self._rejected
        head = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            % (status, _REASONS.get(status, b"Unknown"), content_type, len(body))
        ]
        if extra:
            head.extend(b"%s: %s\r\n" % kv for kv in extra)
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(body)
        t.write(b"".join(head))
        if not keep_alive:
            t.close()
            self.transport = None
        self.busy = False
        if self.queue:
            self._next()
        elif self.closing and self.transport is not None:
            self.transport.close()
            self.transport = None


class App:
    """Routes requests to the data plane and owns request metrics and logs."""

    def __init__(
        self,
        dataplane: DataPlane,
        registry: Registry,
        max_body: int = 64 * 1024 * 1024,
        log_sample_rate: float = 1.0,
        payload_log_sample_rate: float = 0.0,
        log_stream: Any = None,
    ) -> None:
        self.dp = dataplane
        self.model = dataplane.model
        self.registry = registry
        self.max_body = max_body
        self.log_sample_rate = log_sample_rate
        self.payload_log_sample_rate = payload_log_sample_rate
        self.log_stream = log_stream or sys.stdout.buffer
        self.connections: set[HttpProtocol] = set()
        m = self.model
        lbl = (m.name, m.version)
        self._requests = registry.counter(
            "modelops_requests_total", "Inference requests by response code.", ("model", "version", "code"))
        self._codes: dict[int, Any] = {}
        self._latency = registry.histogram(
            "modelops_request_duration_seconds", "Inference request time from the last byte received to the "
            "response written.", ("model", "version")).labels(*lbl)
        self._inflight = registry.gauge(
            "modelops_inflight_requests", "Inference requests being processed.", ("model", "version")).labels(*lbl)
        info = registry.gauge("modelops_model_info", "The served model; 1 per loaded model.",
                              ("model", "version", "provider", "sha256"))
        info.labels(m.name, m.version, m.provider, m.digest).set(1)
        self._ready_gauge = registry.gauge("modelops_model_ready", "1 when the model answers requests.",
                                           ("model", "version")).labels(*lbl)
        self._ready_gauge.set(1 if m.ready else 0)
        self._feedback_counter = registry.counter(
            "modelops_feedback_requests_total", "Feedback requests by response code.", ("model", "code"))
        self.random = random.random
        # Cached exact paths of the hot endpoints.
        base = f"/v2/models/{m.name}"
        vbase = f"{base}/versions/{m.version}"
        self._infer_paths = {f"{base}/infer", f"{vbase}/infer"}
        self._routes: dict[str, Callable[[Request, HttpProtocol], None]] = {
            "/v2/health/live": self._live,
            "/v2/health/ready": self._ready,
            "/v2": self._server_metadata,
            "/metrics": self._metrics,
            base: self._model_metadata,
            vbase: self._model_metadata,
            f"{base}/ready": self._model_ready,
            f"{vbase}/ready": self._model_ready,
            f"{base}/feedback": self._feedback,
            f"{vbase}/feedback": self._feedback,
        }

    # -- entry -------------------------------------------------------------------------------------
    def handle(self, req: Request, conn: HttpProtocol) -> None:
        try:
            if req.path in self._infer_paths:
                self._infer(req, conn)
                return
            route = self._routes.get(req.path.rstrip("/") or "/")
            if route is None:
                raise NotFound(self._not_found_message(req.path))
            route(req, conn)
        except RuntimeServerError as e:
            self._error(conn, req, e)
        except Exception as e:  # a bug must never kill the connection loop; the client gets a 500
            log.exception("Failed request %s %s", req.method.decode(), req.path)
            self._error(conn, req, RuntimeServerError(f"internal error: {type(e).__name__}"))

    def _not_found_message(self, path: str) -> str:
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            if parts[2] != self.model.name:
                return f"model '{parts[2]}' is not served here (this server serves '{self.model.name}')"
            if len(parts) >= 5 and parts[3] == "versions" and parts[4] != self.model.version:
                return f"model '{parts[2]}' has no version '{parts[4]}' here (serving '{self.model.version}')"
        return f"no route for {path}"

    def _error(self, conn: HttpProtocol, req: Request, e: RuntimeServerError) -> None:
        extra = [(b"retry-after", str(e.retry_after).encode())] if isinstance(e, TooManyRequests) else None
        conn.write(e.status, orjson.dumps({"error": e.message}), JSON, req.keep_alive, extra)

    @staticmethod
    def _need(req: Request, method: bytes) -> None:
        if req.method != method and not (method == b"GET" and req.method == b"HEAD"):
            raise MethodNotAllowed(f"{req.path} takes {method.decode()}, not {req.method.decode()}")

    # -- small endpoints ---------------------------------------------------------------------------
    def _live(self, req: Request, conn: HttpProtocol) -> None:
        self._need(req, b"GET")
        conn.write(200, b'{"live":true}', JSON, req.keep_alive)

    def _ready(self, req: Request, conn: HttpProtocol) -> None:
        self._need(req, b"GET")
        ready = self.dp.ready()
        self._ready_gauge.set(1 if ready else 0)
        body: dict[str, object] = {"ready": ready}
        if not ready:
            body["reason"] = "draining" if self.dp.draining else self.model.not_ready_reason
        conn.write(200 if ready else 503, orjson.dumps(body), JSON, req.keep_alive)

    def _model_ready(self, req: Request, conn: HttpProtocol) -> None:
        self._ready(req, conn)

    def _server_metadata(self, req: Request, conn: HttpProtocol) -> None:
        self._need(req, b"GET")
        body = {"name": "modelops-runtime", "version": __version__,
                "extensions": ["binary_tensor_data", "model_feedback", "metrics"]}
        conn.write(200, orjson.dumps(body), JSON, req.keep_alive)

    def _model_metadata(self, req: Request, conn: HttpProtocol) -> None:
        self._need(req, b"GET")
        conn.write(200, orjson.dumps(self.model.metadata()), JSON, req.keep_alive)

    def _metrics(self, req: Request, conn: HttpProtocol) -> None:
        self._need(req, b"GET")
        self._ready_gauge.set(1 if self.dp.ready() else 0)
        conn.write(200, self.registry.render(), METRICS_CONTENT_TYPE.encode(), req.keep_alive)

    def _feedback(self, req: Request, conn: HttpProtocol) -> None:
        code = 200
        try:
            self._need(req, b"POST")
            self._check_json(req)
            try:
                doc = orjson.loads(self._decoded_body(req))
            except orjson.JSONDecodeError as e:
                raise BadRequest(f"malformed JSON: {e}") from None
            out = self.dp.monitor.feedback(doc)
            conn.write(200, orjson.dumps(out), JSON, req.keep_alive)
        except RuntimeServerError as e:
            code = e.status
            raise
        finally:
            self._feedback_counter.labels(self.model.name, str(code)).inc()

    # -- inference ---------------------------------------------------------------------------------
    def _check_json(self, req: Request) -> None:
        ctype = req.headers.get(b"content-type")
        if ctype is not None and not ctype.split(b";", 1)[0].strip().lower() == JSON:
            raise UnsupportedMediaType(f"content type {ctype.decode('latin-1')} is not supported; use application/json")

    def _decoded_body(self, req: Request) -> bytes:
        enc = req.headers.get(b"content-encoding")
        if enc is None or enc.lower() == b"identity":
            return req.body
        if enc.lower() not in (b"gzip", b"deflate"):
            raise UnsupportedMediaType(f"content encoding {enc.decode('latin-1')} is not supported (gzip, deflate)")
        d = zlib.decompressobj(zlib.MAX_WBITS | 32 if enc.lower() == b"gzip" else zlib.MAX_WBITS)
        try:
            out = d.decompress(req.body, self.max_body + 1)
        except zlib.error as e:
            raise BadRequest(f"could not decompress the body: {e}") from None
        if len(out) > self.max_body or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed body exceeds the limit of {self.max_body} bytes")
        return out

    def _code(self, code: int) -> Any:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._requests.labels(self.model.name, self.model.version, str(code))
        return child

    def _infer(self, req: Request, conn: HttpProtocol) -> None:
        inflight = self._inflight
        inflight.value += 1
        try:
            if req.method != b"POST":
                raise MethodNotAllowed(f"{req.path} takes POST, not {req.method.decode()}")
            hlen = req.headers.get(b"inference-header-content-length")
            if hlen is None:
                self._check_json(req)
                header_length = None
            else:
                ctype = req.headers.get(b"content-type", b"application/octet-stream").split(b";", 1)[0].strip()
                if ctype.lower() not in (b"application/octet-stream", JSON):
                    raise UnsupportedMediaType(
                        f"content type {ctype.decode('latin-1')} is not supported with binary tensors; "
                        "use application/octet-stream")
                if not hlen.isdigit():
                    raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
                header_length = int(hlen)
            body = self._decoded_body(req)
            ireq, fut = self.dp.submit(body, header_length)
        except RuntimeServerError as e:
            inflight.value -= 1
            self._finish(req, conn, e.status, None, None)
            self._error(conn, req, e)
            return
        except Exception as e:  # an inline inference failed inside ONNX Runtime
            err = RuntimeServerError(f"inference failed: {type(e).__name__}: {e}")
            inflight.value -= 1
            self._finish(req, conn, err.status, None, None)
            self._error(conn, req, err)
            return
        if isinstance(fut, Result):
            self._infer_done(req, conn, ireq, fut)
        else:
            fut.add_done_callback(lambda f: self._infer_done(req, conn, ireq, f))

    def _infer_done(self, req: Request, conn: HttpProtocol, ireq: Any, fut: asyncio.Future[Result] | Result) -> None:
        self._inflight.value -= 1
        if isinstance(fut, Result):
            result = fut
        else:
            exc = fut.exception()
            if exc is not None:
                err = exc if isinstance(exc, RuntimeServerError) else RuntimeServerError(
                    f"inference failed: {type(exc).__name__}: {exc}")
                self._finish(req, conn, err.status, ireq, None)
                self._error(conn, req, err)
                return
            result = fut.result()
        try:
            body, hlen = self.dp.respond(ireq, result)
        except RuntimeServerError as e:
            self._finish(req, conn, e.status, ireq, result)
            self._error(conn, req, e)
            return
        if hlen is None:
            conn.write(200, body, JSON, req.keep_alive)
        else:
            conn.write(200, body, b"application/octet-stream", req.keep_alive,
                       [(b"inference-header-content-length", str(hlen).encode())])
        self._finish(req, conn, 200, ireq, result, body)

    def _finish(self, req: Request, conn: HttpProtocol, code: int, ireq: Any, result: Result | None,
                response: bytes | None = None) -> None:
        elapsed = time.perf_counter() - req.received
        self._code(code).value += 1
        if code == 200:
            self._latency.observe(elapsed)
        if self.log_sample_rate >= 1.0 or (self.log_sample_rate > 0 and self.random() < self.log_sample_rate):
            line: dict[str, Any] = {
                "ts": time.time(), "msg": "Served inference request", "id": ireq.id if ireq else None,
                "model": self.model.name, "version": self.model.version, "code": code,
                "latency_ms": round(elapsed * 1000, 3), "batch_size": result.batch_size if result else 0,
            }
            if self.payload_log_sample_rate > 0 and self.random() < self.payload_log_sample_rate:
                line["request"] = req.body[:4096].decode("utf-8", "replace")
                if response is not None:
                    line["response"] = response[:4096].decode("utf-8", "replace")
            self.log_stream.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
