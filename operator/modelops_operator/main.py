"""`modelops-operator`: the entry point. kopf watches and hands every event to the controller.

kopf is used for what it does well here (watching, reconnecting, login, graceful shutdown). Only
event handlers are registered: they take no finalizer and write no bookkeeping to the objects, so
deleting a ModelDeployment never waits for the operator and a steady state makes no writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

import kopf

from . import GROUP, KIND, LABEL_MD, PLURAL, VERSION
from .controller import Controller
from .kube import Cache, Kube, to_thread
from .metrics import OperatorMetrics, serve

log = logging.getLogger("modelops.operator")


class State:
    cache = Cache()
    controller: Controller | None = None
    metrics_port = int(os.environ.get("MODELOPS_METRICS_PORT", "8081"))
    workers = int(os.environ.get("MODELOPS_WORKERS", "4"))
    resync = float(os.environ.get("MODELOPS_RESYNC_SECONDS", "10"))
    runner: Any = None
    task: asyncio.Task[None] | None = None


def _record(kind: str, event: dict[str, Any]) -> None:
    key = State.cache.put(kind, event.get("type") or "ADDED", event["object"])
    if State.controller is not None:
        State.controller.enqueue(key)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # No namespace or CRD observation: the resources are known, and the chart's RBAC stays least-privilege.
    settings.scanning.disabled = True
    settings.posting.enabled = False  # our own Events, in Kubernetes style, are posted by the io layer
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    kube = Kube.connect()
    apis = await to_thread(kube.discover)
    log.info("Discovered %s and %s", apis.hpa, apis.pdb)
    metrics = OperatorMetrics()
    State.controller = Controller(kube, State.cache, apis, metrics, workers=State.workers, resync=State.resync)
    State.task = asyncio.create_task(State.controller.run())
    controller = State.controller
    State.runner = await serve(metrics, State.metrics_port, lambda: controller.heartbeat, lambda: kube.writes)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if State.task:
        State.task.cancel()
    if State.runner:
        await State.runner.cleanup()


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_model_deployment(**kwargs: Any) -> None:
    _record(KIND, kwargs["event"])


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MD: kopf.PRESENT})
def on_deployment(**kwargs: Any) -> None:
    _record("Deployment", kwargs["event"])


@kopf.on.event("", "v1", "pods", labels={LABEL_MD: kopf.PRESENT})
def on_pod(**kwargs: Any) -> None:
    _record("Pod", kwargs["event"])


@kopf.on.event("", "v1", "services", labels={LABEL_MD: kopf.PRESENT})
def on_service(**kwargs: Any) -> None:
    _record("Service", kwargs["event"])


@kopf.on.event("", "v1", "configmaps", labels={LABEL_MD: kopf.PRESENT})
def on_configmap(**kwargs: Any) -> None:
    _record("ConfigMap", kwargs["event"])


@kopf.on.event("autoscaling", "horizontalpodautoscalers", labels={LABEL_MD: kopf.PRESENT})
def on_hpa(**kwargs: Any) -> None:
    _record("HorizontalPodAutoscaler", kwargs["event"])


@kopf.on.event("policy", "poddisruptionbudgets", labels={LABEL_MD: kopf.PRESENT})
def on_pdb(**kwargs: Any) -> None:
    _record("PodDisruptionBudget", kwargs["event"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modelops-operator", description="Run the modelops operator.")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--metrics-port", type=int, default=State.metrics_port, help="port of /metrics and /healthz")
    p.add_argument("--workers", type=int, default=State.workers, help="ModelDeployments reconciled at once")
    p.add_argument("--resync-seconds", type=float, default=State.resync, help="seconds between full resyncs")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    State.metrics_port, State.workers, State.resync = args.metrics_port, args.workers, args.resync_seconds
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler call at INFO; our own log lines say what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        kopf.run(standalone=True, clusterwide=not args.namespace, namespaces=list(args.namespace),
                 liveness_endpoint=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
