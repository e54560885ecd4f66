"""`modelops-runtime`: load one model and serve it over the Open Inference Protocol v2.

Every option can also be set by an environment variable: --max-batch-size <-> MODELOPS_MAX_BATCH_SIZE.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from .dataplane import Batcher, BatchingConfig, DataPlane
from .errors import ModelLoadError
from .metrics import Registry
from .model import GRAPH_LEVELS, ModelConfig, OnnxModel
from .monitoring import DEFAULT_VALUE_BUCKETS, Monitor, MonitoringConfig
from .server import App, HttpProtocol

log = logging.getLogger("modelops.runtime")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(sorted(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelops-runtime",
        description="Serve one ONNX model over the Open Inference Protocol v2. "
        "Every option is also read from MODELOPS_<OPTION> (upper case, dashes as underscores).",
    )
    a = p.add_argument
    a("--model", required=True, help="path, file://, http(s):// or s3:// URI of the .onnx file")
    a("--name", required=True, help="model name in the V2 paths")
    a("--version", default="1", help="model version reported and accepted in paths")
    a("--sha256", default=None, help="expected sha256 of the model file; a mismatch refuses to start")
    a("--host", default="0.0.0.0")
    a("--port", type=int, default=8080)
    a("--device", choices=("cpu", "gpu"), default="cpu")
    a("--execution-providers", default="", help="comma-separated ONNX Runtime providers, in order of preference")
    a("--allow-cpu-fallback", action="store_true", help="serve on CPU when the GPU provider is unavailable")
    a("--intra-op-threads", type=int, default=0, help="0: ONNX Runtime's default")
    a("--inter-op-threads", type=int, default=0)
    a("--graph-optimization-level", choices=GRAPH_LEVELS, default="all")
    a("--quantize", choices=("dynamic-int8",), default=None, help="quantize at load time (cached by digest)")
    a("--cache-dir", default=None, help="where downloads and load-time optimizations are kept")
    a("--max-batch-size", type=int, default=1, help="rows per merged batch; 1 turns batching off")
    a("--max-delay", type=_positive_float, default=0.002, help="seconds a request may wait for a batch to fill")
    a("--max-queue", type=int, default=1024, help="queued requests beyond which requests get 503")
    a("--request-timeout", type=_positive_float, default=30.0, help="seconds from arrival to answer, then 504")
    a("--inline-below-ms", type=_positive_float, default=1.0,
      help="without batching, models faster than this per row run on the event loop (0: never)")
    a("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="request body limit, after decompression")
    a("--log-sample-rate", type=_positive_float, default=1.0, help="share of requests logged (one JSON line)")
    a("--payload-log-sample-rate", type=_positive_float, default=0.0, help="share of logged requests with payloads")
    a("--task", choices=("auto", "classification", "regression"), default="auto")
    a("--prediction-output", default=None, help="output monitored for predictions (default: the first)")
    a("--prediction-buckets", type=_floats, default=DEFAULT_VALUE_BUCKETS, help="bucket bounds for regression")
    a("--monitor-features", default="", help="input features to histogram, as INPUT:COLUMN[,INPUT:COLUMN]")
    a("--reference-profile", default=None, help='JSON file: {"inputs": {NAME: {"min": x, "max": y}}}')
    a("--feedback-cache-size", type=int, default=100_000, help="predictions kept for feedback by request id")
    a("--golden", default=None, help="JSON golden request; readiness requires answering it within tolerance")
    a("--drain-delay", type=_positive_float, default=0.0,
      help="seconds to keep accepting after SIGTERM while readiness is false")
    a("--shutdown-timeout", type=_positive_float, default=25.0, help="seconds to finish in-flight requests")
    a("--log-level", default="info")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    defaults: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        env = "MODELOPS_" + action.dest.upper()
        if env in os.environ:
            raw = os.environ[env]
            if isinstance(action, argparse._StoreTrueAction):
                defaults[action.dest] = raw.lower() in ("1", "true", "yes", "on")
            else:
                try:
                    defaults[action.dest] = action.type(raw) if action.type else raw  # type: ignore[operator]
                except (argparse.ArgumentTypeError, ValueError) as e:
                    parser.error(f"{env}={raw!r}: {e}")
                if action.choices and defaults[action.dest] not in action.choices:
                    parser.error(f"{env}={raw!r}: choose from {', '.join(map(str, action.choices))}")
            action.required = False
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _load_json(path: str | None, what: str) -> Any:
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the {what} {path}: {e}") from e


def build(args: argparse.Namespace) -> tuple[App, Batcher]:
    model = OnnxModel(ModelConfig(
        name=args.name, source=args.model, version=args.version, sha256=args.sha256, device=args.device,
        allow_cpu_fallback=args.allow_cpu_fallback, intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads, graph_optimization_level=args.graph_optimization_level,
        quantize=args.quantize, cache_dir=args.cache_dir,
        extra_providers=[p.strip() for p in args.execution_providers.split(",") if p.strip()],
    ))
    golden = _load_json(args.golden, "golden request")
    profile = _load_json(args.reference_profile, "reference profile") or {}
    model.load()
    model.warm_up(golden)
    try:
        mcfg = MonitoringConfig(
            task=args.task, prediction_output=args.prediction_output, value_buckets=args.prediction_buckets,
            features=MonitoringConfig.parse_features(args.monitor_features), profile=profile.get("inputs", {}),
            feedback_cache_size=args.feedback_cache_size,
        )
        if mcfg.prediction_output and model.loaded and mcfg.prediction_output not in model.output_names:
            raise ValueError(f"--prediction-output {mcfg.prediction_output}: the model gives {model.output_names}")
        monitor = Monitor(mcfg, registry := Registry(), model.name, model.version,
                          [s.name for s in model.inputs], model.output_names or ["none"])
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    batcher = Batcher(model, monitor, BatchingConfig(args.max_batch_size, args.max_delay, args.max_queue,
                                                     args.request_timeout, args.inline_below_ms / 1000), registry)
    app = App(DataPlane(model, monitor, batcher), registry, max_body=args.max_body_bytes,
              log_sample_rate=args.log_sample_rate, payload_log_sample_rate=args.payload_log_sample_rate)
    return app, batcher


async def serve(app: App, batcher: Batcher, args: argparse.Namespace, sock: socket.socket | None = None) -> None:
    loop = asyncio.get_running_loop()
    batcher.start(loop)
    # Everything loaded so far (ONNX Runtime, numpy, the model) lives for the whole process: keep it
    # out of the cyclic collector, and collect less often. Per-request objects are acyclic and freed by
    # reference counting, so this costs no memory growth.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    if sock is None:
        server = await loop.create_server(lambda: HttpProtocol(app), args.host, args.port, reuse_address=True,
                                          backlog=1024)
    else:
        server = await loop.create_server(lambda: HttpProtocol(app), sock=sock, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addr = server.sockets[0].getsockname()
    log.info("Serving model %s version %s on %s:%s (ready=%s)", app.model.name, app.model.version, addr[0], addr[1],
             app.model.ready)

    async def flush_logs() -> None:
        while True:
            await asyncio.sleep(0.5)
            app.log_stream.flush()

    flusher = loop.create_task(flush_logs())
    await stop.wait()
    # Drain: readiness false at once; keep accepting for drain_delay so balancers notice; then stop
    # accepting, let in-flight requests finish, and close idle keep-alive connections.
    app.dp.draining = True
    log.info("Received SIGTERM; draining (readiness false)")
    if args.drain_delay:
        await asyncio.sleep(args.drain_delay)
    server.close()
    deadline = time.monotonic() + args.shutdown_timeout
    for conn in list(app.connections):
        conn.closing = True
        if not conn.busy and not conn.queue and conn.transport is not None:
            conn.transport.close()
    while time.monotonic() < deadline and (not batcher.idle() or any(c.busy for c in app.connections)):
        await asyncio.sleep(0.01)
    flusher.cancel()
    app.log_stream.flush()
    batcher.stop()
    log.info("Stopped serving model %s", app.model.name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        app, batcher = build(args)
    except ModelLoadError as e:
        log.error("Refused to start: %s", e)
        return 2
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # uvloop is optional; asyncio's loop works, a little slower
        runner = asyncio.run
    try:
        runner(serve(app, batcher, args))
    except OSError as e:
        log.error("Could not serve on %s:%s: %s", args.host, args.port, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
