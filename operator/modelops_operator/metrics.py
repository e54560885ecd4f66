"""The operator's own metrics and health endpoint (aiohttp), on --metrics-port."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from modelops_runtime.metrics import CONTENT_TYPE, Registry

RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self._reconciles = r.counter("modelops_operator_reconciles_total", "Reconcile passes by result.", ("result",))
        self._duration = r.histogram("modelops_operator_reconcile_duration_seconds", "Time of one reconcile pass.",
                                     buckets=RECONCILE_BUCKETS).labels()
        self.managed = r.gauge("modelops_operator_managed_objects", "ModelDeployments known to the operator.").labels()
        self.detect = r.histogram("modelops_operator_time_to_detect_seconds",
                                  "From a canary's first traffic to the verdict that rolled it back.",
                                  buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600)).labels()
        self.rollback = r.histogram("modelops_operator_time_to_rollback_seconds",
                                    "From the rollback decision to the canary having no ready pod.",
                                    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120)).labels()
        self.rollouts = r.counter("modelops_operator_rollouts_total", "Finished rollouts by result.", ("result",))
        self.writes = r.gauge("modelops_operator_api_writes", "Write calls made to the API server since start.").labels()

    def observe(self, result: str, seconds: float) -> None:
        self._reconciles.labels(result).inc()
        self._duration.observe(seconds)


async def serve(metrics: OperatorMetrics, port: int, heartbeat: Callable[[], float], writes: Callable[[], int],
                stale_after: float = 60.0) -> web.AppRunner:
    async def get_metrics(_: web.Request) -> web.Response:
        metrics.writes.set(writes())
        return web.Response(body=metrics.registry.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        age = time.monotonic() - heartbeat()
        if age > stale_after:
            return web.json_response({"ok": False, "reason": f"resync loop silent for {age:.0f}s"}, status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
