"""A work queue of ModelDeployment keys and the reconcile pass: observe (cache) -> decide -> act -> status.

Every watch event of a ModelDeployment or of one of its children enqueues the ModelDeployment; a
resync enqueues all of them periodically. A key is reconciled by one worker at a time, and a key
enqueued while it is being reconciled runs once more afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes.client.rest import ApiException

from . import LABEL_REVISION
from .analysis import Samples, Window, add, assess, diff
from .decisions import Apis, Observed, Requeue, decide
from .kube import Cache, Key, Kube, now, scrape, serving_details, to_thread
from .metrics import OperatorMetrics
from .providers import prometheus_checks, prometheus_window
from .rollout import analysis_cfg, measure_due, seconds_between
from .spec import with_defaults

log = logging.getLogger("modelops.operator")


class Controller:
    def __init__(self, kube: Kube, cache: Cache, apis: Apis, metrics: OperatorMetrics, workers: int = 4,
                 resync: float = 10.0) -> None:
        self.kube = kube
        self.cache = cache
        self.apis = apis
        self.metrics = metrics
        self.workers = workers
        self.resync = resync
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self.queued: set[Key] = set()
        self.active: set[Key] = set()
        self.again: set[Key] = set()
        self.providers: dict[tuple[str, str, str], str] = {}
        self.applied: dict[tuple[str, str, str], list[str]] = {}
        # Canary analysis memory: the last scrape of each pod, and its first scrape in the current rollout.
        self.last_scrape: dict[str, Samples] = {}
        self.baseline: dict[tuple[str, str], Samples] = {}  # (rollout id, pod uid) -> samples
        self.heartbeat = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    def enqueue(self, key: Key | None) -> None:
        if key is None:
            return
        if key in self.active:
            self.again.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.queue.put_nowait(key)

    async def run(self, initial_delay: float = 2.0) -> None:
        # Let the watches deliver their initial listings before the first decisions.
        await asyncio.sleep(initial_delay)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        while True:
            self.heartbeat = time.monotonic()
            for key in list(self.cache.mds):
                self.enqueue(key)
            self.metrics.managed.set(len(self.cache.mds))
            await asyncio.sleep(self.resync)

    async def _worker(self, _: int) -> None:
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            self.active.add(key)
            t0 = time.perf_counter()
            result = "ok"
            try:
                await self.reconcile(key)
            except ApiException as e:
                result = "error"
                log.warning("Failed reconcile of ModelDeployment %s/%s: %s %s", *key, e.status, e.reason)
            except Exception:
                result = "error"
                log.exception("Failed reconcile of ModelDeployment %s/%s", *key)
            finally:
                self.active.discard(key)
                self.metrics.observe(result, time.perf_counter() - t0)
                if key in self.again or result == "error":
                    self.again.discard(key)
                    if result == "error":
                        asyncio.get_running_loop().call_later(2.0, self.enqueue, key)
                    else:
                        self.enqueue(key)

    def observe(self, key: Key, md: dict[str, Any]) -> Observed:
        c = self.cache
        by_name = {d["metadata"]["name"]: d for d in c.of("Deployment", key)}
        cms = {d["metadata"]["name"]: d for d in c.of("ConfigMap", key)}
        svc = next((s for s in c.of("Service", key) if s["metadata"]["name"] == key[1]), None)
        hpa = next(iter(c.of("HorizontalPodAutoscaler", key)), None)
        pdb = next(iter(c.of("PodDisruptionBudget", key)), None)
        status = md.get("status") or {}
        providers = {rev: p for (ns, name, rev), p in self.providers.items() if (ns, name) == key}
        applied = {rev: a for (ns, name, rev), a in self.applied.items() if (ns, name) == key}
        stable = (status.get("stable") or {}).get("revision")
        if stable and status.get("executionProvider"):
            providers.setdefault(stable, status["executionProvider"])
            applied.setdefault(stable, list(status.get("optimizationApplied") or []))
        return Observed(deployments=by_name, configmaps=cms, service=svc, hpa=hpa, pdb=pdb,
                        pods=c.of("Pod", key), execution_providers=providers, optimizations=applied)

    async def _learn_provider(self, key: Key, spec: dict[str, Any], observed: Observed, revision: str) -> None:
        if revision in observed.execution_providers:
            return
        for pod in observed.pods:
            labels = pod["metadata"].get("labels") or {}
            ready = any(cd.get("type") == "Ready" and cd.get("status") == "True"
                        for cd in (pod.get("status") or {}).get("conditions") or [])
            if labels.get(LABEL_REVISION) == revision and ready:
                details = await to_thread(serving_details, pod, spec["model"]["name"], spec["runtime"]["port"])
                if details:
                    self.providers[(*key, revision)], self.applied[(*key, revision)] = details
                    observed.execution_providers[revision], observed.optimizations[revision] = details
                return

    async def _measure(self, key: Key, md: dict[str, Any], observed: Observed,
                       spec: dict[str, Any]) -> tuple[str, list[Any]]:
        status = md.get("status") or {}
        ro = status["rollout"]
        rollout_id = f"{key[0]}/{key[1]}/{ro['revision']}/{ro['startedAt']}"
        port = spec["runtime"]["port"]
        revisions = {"canary": ro["revision"], "stable": (status.get("stable") or {}).get("revision")}
        pods = [p for p in observed.pods if (p.get("status") or {}).get("podIP")
                and not p["metadata"].get("deletionTimestamp")]
        texts = await asyncio.gather(*(to_thread(scrape, p, port) for p in pods))
        windows = {"canary": Window(), "stable": Window()}
        for pod, samples in zip(pods, texts, strict=True):
            rev = (pod["metadata"].get("labels") or {}).get(LABEL_REVISION)
            role = next((r for r, v in revisions.items() if v == rev), None)
            if role is None or samples is None:
                continue
            uid = pod["metadata"]["uid"]
            prev = self.last_scrape.get(uid)
            self.last_scrape[uid] = samples
            base_key = (rollout_id, uid)
            if base_key not in self.baseline:
                # Canary pods are new: count from zero. Stable pods: from the first scrape of this rollout.
                self.baseline[base_key] = {} if role == "canary" else samples
            w = windows[role]
            if prev is not None or role == "canary":
                w.recent = add(w.recent, diff(samples, prev))
            w.since_start = add(w.since_start, diff(samples, self.baseline[base_key] or None))
        cfg = analysis_cfg(spec)
        return assess(cfg["checks"], windows["canary"], windows["stable"], cfg["minSamples"], cfg["onNoData"])

    async def _measure_prometheus(self, key: Key, md: dict[str, Any], spec: dict[str, Any]) -> tuple[str, list[Any]]:
        status = md.get("status") or {}
        ro = status["rollout"]
        cfg = analysis_cfg(spec)
        address = cfg["provider"]["address"]
        t = now()
        last = ro["analysis"].get("lastMeasuredAt")
        recent = max(seconds_between(last, t) if last else cfg["intervalSeconds"], cfg["intervalSeconds"])
        since = max(seconds_between(ro.get("trafficSince") or ro["startedAt"], t), recent)
        canary = await to_thread(prometheus_window, address, key[0], key[1], ro["revision"], recent, since)
        stable = await to_thread(prometheus_window, address, key[0], key[1],
                                 (status.get("stable") or {}).get("revision"), recent, since)
        builtin = {k: v for k, v in cfg["checks"].items() if k != "prometheus"}
        verdict, measurements = assess(builtin, canary, stable, cfg["minSamples"], cfg["onNoData"])
        extra = await to_thread(prometheus_checks, address, cfg["checks"].get("prometheus") or [], key[0], key[1],
                                ro["revision"], recent)
        measurements += extra
        order = {"Pass": 0, "Inconclusive": 1, "Fail": 2}
        return max([verdict, *(m.verdict for m in extra)], key=order.__getitem__), measurements

    def _record_history(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        old_h = {(h.get("revision"), h.get("startedAt")): h for h in old.get("history") or []}
        for h in new.get("history") or []:
            before = old_h.get((h.get("revision"), h.get("startedAt")), {})
            if "detectSeconds" in h and "detectSeconds" not in before:
                self.metrics.detect.observe(h["detectSeconds"])
            if "rollbackSeconds" in h and "rollbackSeconds" not in before:
                self.metrics.rollback.observe(h["rollbackSeconds"])
            if not before:
                self.metrics.rollouts.labels(h.get("result", "unknown")).inc()

    async def reconcile(self, key: Key) -> None:
        md = self.cache.mds.get(key)
        if md is None or md["metadata"].get("deletionTimestamp"):
            return  # garbage collection removes the children with their owner
        observed = self.observe(key, md)
        status0 = md.get("status") or {}
        spec = with_defaults(md.get("spec") or {})
        stable = (status0.get("stable") or {}).get("revision")
        if stable:
            await self._learn_provider(key, spec, observed, stable)
        t = now()
        if measure_due(status0, spec, t):
            if (analysis_cfg(spec).get("provider") or {}).get("type", "pods") == "prometheus":
                observed.analysis = await self._measure_prometheus(key, md, spec)
            else:
                observed.analysis = await self._measure(key, md, observed, spec)
        status, actions = decide(md, observed, t, self.apis)
        for action in actions:
            if isinstance(action, Requeue):
                asyncio.get_running_loop().call_later(action.seconds, self.enqueue, key)
            else:
                await to_thread(self.kube.perform, md, action)
        self._record_history(status0, status)
        old = md.get("status") or {}
        if status != old:
            patch = dict(status)
            for k in old:
                if k not in status:
                    patch[k] = None  # merge patch: null removes
            updated = await to_thread(self.kube.write_status, md, patch)
            if updated:
                self.cache.mds[key] = updated
