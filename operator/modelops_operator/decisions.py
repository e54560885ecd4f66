"""The reconcile decision: (ModelDeployment, observed children, now) -> (new status, actions).

Pure and table-testable. The io layer observes, calls `decide`, performs the actions and writes the
status once. Nothing here depends on which event triggered the pass.

Phases (status.phase):
- Pending: the first revision has no ready pod yet.
- Ready: the stable revision serves with every desired replica ready and nothing is rolling out.
- Progressing: a new revision is being brought up (or the stable one is scaling).
- Degraded: a revision cannot become ready (integrity, fetch, load, image or scheduling failure);
  any older revision that was serving keeps serving.
- InvalidSpec: the spec fails validation; nothing was changed, the last good revision keeps serving.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from . import ANNOTATION_HASH, LABEL_REVISION
from . import builders as b
from .analysis import Measurement
from .conditions import get_condition, set_condition
from .rollout import (
    RolloutInputs,
    advance,
    mark_handled,
    record,
    requested,
    seconds_between,
    start,
    steps_of,
)
from .spec import validate, with_defaults

FETCH_EXIT_REASONS = {3: "ModelIntegrityFailed", 4: "ModelFetchFailed"}


@dataclass
class Observed:
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, Any]] = field(default_factory=dict)
    service: dict[str, Any] | None = None
    hpa: dict[str, Any] | None = None
    pdb: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    execution_providers: dict[str, str] = field(default_factory=dict)  # revision -> provider in use
    optimizations: dict[str, list[str]] = field(default_factory=dict)  # revision -> load-time optimizations applied
    analysis: tuple[str, list[Measurement]] | None = None  # a canary measurement taken for this pass


@dataclass(frozen=True)
class Apis:
    hpa: str = "autoscaling/v2"
    pdb: str = "policy/v1"


@dataclass
class Apply:
    manifest: dict[str, Any]
    existing: dict[str, Any] | None  # None: create


@dataclass
class Scale:
    name: str
    replicas: int


@dataclass
class Delete:
    api_version: str
    kind: str
    name: str


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Requeue:
    seconds: float


Action = Apply | Scale | Delete | Event | Requeue


def _ready(dep: dict[str, Any] | None) -> int:
    return int(((dep or {}).get("status") or {}).get("readyReplicas") or 0)


def applied_hash(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_HASH)


def _need(desired: dict[str, Any], existing: dict[str, Any] | None, actions: list[Action]) -> None:
    """Applies `desired` unless the child already carries its hash (and, for Deployments, its replicas)."""
    if existing is None or applied_hash(existing) != applied_hash(desired):
        actions.append(Apply(desired, existing))
    elif "replicas" in desired.get("spec", {}) and existing.get("spec", {}).get("replicas") != desired["spec"]["replicas"]:
        actions.append(Scale(desired["metadata"]["name"], desired["spec"]["replicas"]))


def revision_failure(pods: list[dict[str, Any]], revision: str) -> tuple[str, str] | None:
    """Why the pods of a revision cannot become ready, read from their status; None when nothing is wrong."""
    for pod in pods:
        if (pod.get("metadata", {}).get("labels") or {}).get(LABEL_REVISION) != revision:
            continue
        st = pod.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return "Unschedulable", c.get("message", "no node fits the pod")
        for cs in st.get("initContainerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if cs.get("name") == "fetch-model" and term and term.get("exitCode") in FETCH_EXIT_REASONS:
                    reason = FETCH_EXIT_REASONS[term["exitCode"]]
                    what = ("the model file's sha256 does not match spec.model.sha256" if term["exitCode"] == 3
                            else "the model file could not be downloaded from spec.model.uri")
                    return reason, f"pod {pod['metadata']['name']}: {what}"
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                return "ImagePullFailed", f"pod {pod['metadata']['name']}: {waiting.get('message') or waiting['reason']}"
            if waiting.get("reason") == "CreateContainerConfigError":
                return "ConfigError", f"pod {pod['metadata']['name']}: {waiting.get('message', '')}"
        for cs in st.get("containerStatuses") or []:
            term = (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated")
            if cs.get("name") == "runtime" and term and term.get("exitCode") == 2:
                return "ModelLoadFailed", (f"pod {pod['metadata']['name']}: the runtime refused the model "
                                           "(see the runtime container's log)")
    return None


def decide(md: dict[str, Any], observed: Observed, now: str, apis: Apis = Apis()) -> tuple[dict[str, Any], list[Action]]:
    meta = md["metadata"]
    old_status: dict[str, Any] = md.get("status") or {}
    status = copy.deepcopy(old_status)
    status["observedGeneration"] = meta.get("generation", 1)
    conds: list[dict[str, Any]] = list(status.get("conditions") or [])
    actions: list[Action] = []

    spec = with_defaults(md.get("spec") or {})
    errors = validate(spec)
    if errors:
        message = "; ".join(str(e) for e in errors)
        conds = set_condition(conds, "Ready", False, "InvalidSpec", message, now)
        status["conditions"] = conds
        status["phase"] = "InvalidSpec"
        _phase_event(old_status, status, actions, message)
        return status, actions

    name = meta["name"]
    annotations = meta.get("annotations") or {}
    target = b.revision_hash(spec)
    strategy = spec["rollout"]["strategy"]
    version = spec["model"]["version"]
    failed = status.get("failed")
    if failed and (failed.get("revision") != target or requested(status, annotations, "retry")):
        status.pop("failed")  # a new spec, or a user's retry, gives the revision another chance
    if requested(status, annotations, "retry"):
        mark_handled(status, annotations, "retry")
    blocked = (status.get("failed") or {}).get("revision") == target

    stable = (status.get("stable") or {}).get("revision")
    stable_dep = observed.deployments.get(b.deployment_name(name, stable)) if stable else None
    # A stable revision that never served protects nothing: replace it outright.
    if stable is None or (stable != target and _ready(stable_dep) == 0 and not blocked
                          and (status.get("rollout") or {}).get("revision") != target):
        stable = target
        stable_dep = observed.deployments.get(b.deployment_name(name, target))
        status["stable"] = {"revision": target, "modelVersion": version,
                            "sha256": spec["model"]["sha256"], "deployment": b.deployment_name(name, target)}
    candidate = target if target != stable else None
    if candidate is None or (status.get("rollout") or {}).get("revision") not in (None, candidate):
        status.pop("rollout", None)  # finished, or superseded by a newer spec
    autoscaled = "autoscaling" in spec
    desired = spec["autoscaling"]["minReplicas"] if autoscaled else spec["replicas"]
    if autoscaled and stable_dep is not None and stable == (status.get("stable") or {}).get("revision"):
        desired = int((stable_dep.get("spec") or {}).get("replicas") or desired)
    canary_active = candidate is not None and strategy == "Canary" and not blocked
    if autoscaled and canary_active and status.get("rollout"):
        # Autoscaling pauses during a canary (its HPA is removed below): the split works on the size the
        # stable revision had when the canary started, and the HPA comes back when the rollout ends.
        desired = int(status["rollout"].get("desiredReplicas") or desired)

    target_dep_name = b.deployment_name(name, target)
    target_dep = observed.deployments.get(target_dep_name)
    target_replicas: int | None = desired
    stable_replicas = desired
    weight = 0
    promote = False
    paused_for_promotion = False
    if candidate is None:
        target_replicas = None if (autoscaled and stable_dep is not None) else desired
    elif blocked:
        target_replicas, stable_replicas = 0, desired
        hist = status.get("history") or []
        if hist and hist[-1].get("revision") == target and "rollbackSeconds" not in hist[-1] \
                and _ready(target_dep) == 0:
            hist[-1]["rollbackSeconds"] = seconds_between(status["failed"]["at"], now)
    elif strategy == "Canary":
        if status.get("rollout") is None:
            start(status, candidate, version, now, desired)
            actions.append(Event("Normal", "RolloutStarted", f"Started canary of revision {candidate} "
                                                             f"(model version {version})"))
        ro = status["rollout"]
        out = advance(status, RolloutInputs(
            spec=spec, annotations=annotations, desired=desired, stable_ready=_ready(stable_dep),
            canary_ready=_ready(target_dep), canary_replicas=int(((target_dep or {}).get("spec") or {}).get("replicas") or 0),
            analysis=observed.analysis, now=now))
        for kind, reason, message in out.events:
            actions.append(Event(kind, reason, message))
        target_replicas, stable_replicas, weight, promote = out.canary_replicas, out.stable_replicas, out.weight, \
            out.promote
        if out.rolled_back is not None:
            blocked = True
        else:
            step = steps_of(spec)[ro["step"]] if ro["step"] < len(steps_of(spec)) else None
            paused_for_promotion = bool(step and "pause" in step and (step["pause"] or {}).get("durationSeconds") is None)
            wait = [x for x in (out.requeue_after, _interval(spec) if ro.get("trafficSince") else 1.0) if x]
            actions.append(Requeue(max(0.5, min(wait))))
    elif strategy == "RollingUpdate":
        promote = _ready(target_dep) >= max(desired, 1)
    else:  # Recreate: the old revision goes first
        stable_replicas = 0
        target_replicas = desired if _ready(stable_dep) == 0 and int(
            ((stable_dep or {}).get("spec") or {}).get("replicas") or 0) == 0 else 0
        promote = _ready(target_dep) >= max(desired, 1)
    if candidate and not promote and stable_dep is not None and \
            (stable_dep.get("spec") or {}).get("replicas") != stable_replicas:
        # Traffic moves by replica ratio; the serving revision is scaled, never rebuilt.
        actions.append(Scale(stable_dep["metadata"]["name"], stable_replicas))
    if promote:
        target_replicas = desired

    _need(b.deployment(md, spec, target, target_replicas), target_dep, actions)
    cm = b.golden_configmap(md, spec, target)
    if cm is not None:
        _need(cm, observed.configmaps.get(cm["metadata"]["name"]), actions)
    _need(b.service(md, spec), observed.service, actions)

    if promote and candidate:
        ro = status.pop("rollout", None) or {}
        actions.append(Event("Normal", "Promoted", f"Promoted revision {target} (model version {version}) to stable"))
        if ro:
            record(status, {"revision": target, "modelVersion": version, "result": "Promoted",
                            "startedAt": ro.get("startedAt"), "finishedAt": now})
        status["stable"] = {"revision": target, "modelVersion": version,
                            "sha256": spec["model"]["sha256"], "deployment": target_dep_name}
        stable, stable_dep, candidate = target, target_dep, None
    live = {stable} | ({candidate} if candidate else set())

    if autoscaled and not (canary_active and candidate):
        _need(b.hpa(md, spec, stable, apis.hpa), observed.hpa, actions)
    elif observed.hpa is not None:
        actions.append(Delete(observed.hpa["apiVersion"], "HorizontalPodAutoscaler", observed.hpa["metadata"]["name"]))
    wants_pdb = (spec["autoscaling"]["maxReplicas"] if autoscaled else spec["replicas"]) > 1
    if wants_pdb:
        _need(b.pdb(md, apis.pdb), observed.pdb, actions)
    elif observed.pdb is not None:
        actions.append(Delete(observed.pdb["apiVersion"], "PodDisruptionBudget", observed.pdb["metadata"]["name"]))
    for dep_name, dep in sorted(observed.deployments.items()):
        rev = (dep["metadata"].get("labels") or {}).get(LABEL_REVISION)
        if rev not in live:
            actions.append(Delete("apps/v1", "Deployment", dep_name))
    for cm_name, obj in sorted(observed.configmaps.items()):
        if (obj["metadata"].get("labels") or {}).get(LABEL_REVISION) not in live:
            actions.append(Delete("v1", "ConfigMap", cm_name))

    # Status.
    stable_ready = _ready(stable_dep)
    status["replicas"] = {"desired": desired, "ready": stable_ready + (_ready(target_dep) if candidate else 0),
                          "summary": f"{stable_ready + (_ready(target_dep) if candidate else 0)}/{desired}"}
    if candidate and not blocked:
        status["canary"] = {"revision": candidate, "modelVersion": version,
                            "sha256": spec["model"]["sha256"], "deployment": target_dep_name,
                            "readyReplicas": _ready(target_dep)}
    else:
        status.pop("canary", None)
    status["canaryWeight"] = weight if candidate and not blocked else 0
    status["url"] = b.service_url(md, spec)
    provider = observed.execution_providers.get(stable)
    if provider:
        status["executionProvider"] = provider
        status["optimizationApplied"] = observed.optimizations.get(stable, [])
    failure = None if blocked else revision_failure(observed.pods, candidate or stable)
    serving = stable_ready >= 1 or desired == 0 or (candidate is not None and _ready(target_dep) >= 1)
    stable_version = status["stable"]["modelVersion"]
    if serving:
        conds = set_condition(conds, "Ready", True, "Serving",
                              f"revision {stable} (model version {stable_version}) serves with {stable_ready} "
                              f"ready of {desired} desired replicas", now)
    else:
        reason, message = failure or ("Starting", f"waiting for pods of revision {stable} to become ready")
        conds = set_condition(conds, "Ready", False, reason, message, now)
    if blocked:
        f = status["failed"]
        msg = f"rolled back revision {f['revision']} (model version {f.get('modelVersion')}): {f['message']}"
        conds = set_condition(conds, "Degraded", True, "RolledBack", msg, now)
        conds = set_condition(conds, "Progressing", False, "RolledBack",
                              "the failed revision is not retried until the spec changes or a retry is requested", now)
    elif failure:
        conds = set_condition(conds, "Degraded", True, failure[0], failure[1], now)
        conds = set_condition(conds, "Progressing", False, failure[0], failure[1], now)
    else:
        conds = set_condition(conds, "Degraded", False, "AsExpected", "no revision is failing", now)
        if candidate:
            conds = set_condition(conds, "Progressing", True, strategy, _progress_message(status, spec, strategy),
                                  now)
        elif stable_ready < desired:
            conds = set_condition(conds, "Progressing", True, "Scaling", f"{stable_ready}/{desired} replicas ready",
                                  now)
        else:
            conds = set_condition(conds, "Progressing", False, "Complete", f"revision {stable} is fully rolled out",
                                  now)
    status["conditions"] = conds
    if blocked:
        status["phase"] = "RolledBack"
    elif failure:
        status["phase"] = "Degraded"
    elif not serving:
        status["phase"] = "Pending"
    elif paused_for_promotion:
        status["phase"] = "Paused"
    elif candidate or stable_ready < desired:
        status["phase"] = "Progressing"
    else:
        status["phase"] = "Ready"
    _phase_event(old_status, status, actions, (get_condition(conds, "Degraded") or {}).get("message", "")
                 if (failure or blocked) else (get_condition(conds, "Ready") or {}).get("message", ""))
    return status, actions


def _interval(spec: dict[str, Any]) -> float:
    return float(((spec.get("rollout") or {}).get("analysis") or {}).get("intervalSeconds", 5))


def _progress_message(status: dict[str, Any], spec: dict[str, Any], strategy: str) -> str:
    ro = status.get("rollout")
    if strategy != "Canary" or not ro:
        return f"bringing up revision {(status.get('canary') or {}).get('revision')} ({strategy})"
    steps = steps_of(spec)
    a = ro.get("analysis") or {}
    parts = [f"step {min(ro['step'] + 1, len(steps))}/{len(steps)}", f"weight {status.get('canaryWeight', 0)}%"]
    if ro.get("promoting"):
        parts.append("promoting")
    if a.get("verdict") == "Inconclusive":
        why = "; ".join(m["message"] for m in a.get("measurements") or [] if m["verdict"] == "Inconclusive")
        parts.append(f"holding since {a.get('inconclusiveSince')}: {why}")
    elif a.get("verdict"):
        parts.append(f"analysis {a['verdict']} ({a.get('consecutiveFailures', 0)} consecutive failures)")
    elif not ro.get("trafficSince"):
        parts.append("waiting for canary pods")
    return ", ".join(parts)


def _phase_event(old: dict[str, Any], new: dict[str, Any], actions: list[Action], message: str) -> None:
    if old.get("phase") != new.get("phase"):
        warning = new["phase"] in ("Degraded", "InvalidSpec", "RolledBack")
        actions.append(Event("Warning" if warning else "Normal", new["phase"],
                             f"Phase changed from {old.get('phase') or 'none'} to {new['phase']}: {message}"))
