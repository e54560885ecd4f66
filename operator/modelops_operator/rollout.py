"""Progressive rollout: replica split, the canary step machine, rollback. Pure; the state lives in status.

status.rollout (while a canary is in flight):
  revision, modelVersion, step (index into the steps), stepStartedAt, startedAt,
  trafficSince (first pass with a ready canary pod behind the Service),
  analysis: {lastMeasuredAt, consecutiveFailures, verdict, inconclusiveSince, measurements}
  promoting (all steps done: the canary is scaling to full size before it becomes stable)
status.failed: the revision that was rolled back; it is not tried again until the spec changes or a
  retry is requested. status.history: the last rollouts, with time to detect and time to roll back.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from .analysis import FAIL, INCONCLUSIVE, PASS, Measurement

DEFAULT_STEPS: list[dict[str, Any]] = [{"setWeight": 20}, {"pause": {"durationSeconds": 15}}, {"setWeight": 50},
                                       {"pause": {"durationSeconds": 15}}]
HISTORY = 10
ANNOTATIONS = {"promote": "modelops.dev/promote", "abort": "modelops.dev/abort", "retry": "modelops.dev/retry"}


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def seconds_between(a: str, b: str) -> float:
    return (parse_time(b) - parse_time(a)).total_seconds()


def replica_split(total: int, weight: int) -> tuple[int, int]:
    """(canary, stable) pods for a weight in percent: at least one canary pod whenever weight > 0, and the
    stable revision keeps at least one pod until weight 100."""
    if total <= 0:
        return (1 if weight > 0 else 0), 0
    if weight <= 0:
        return 0, total
    if weight >= 100:
        return total, 0
    canary = max(1, math.floor(total * weight / 100 + 0.5))
    stable = max(1, total - canary)
    return canary, stable


@dataclass
class RolloutInputs:
    spec: dict[str, Any]
    annotations: dict[str, str]
    desired: int
    stable_ready: int
    canary_ready: int
    canary_replicas: int  # observed spec.replicas of the canary Deployment (0 if absent)
    analysis: tuple[str, list[Measurement]] | None  # a measurement taken this pass
    now: str


@dataclass
class RolloutOutcome:
    canary_replicas: int
    stable_replicas: int
    weight: int
    promote: bool = False
    rolled_back: str | None = None  # the message when this pass rolled back
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    measure_due: bool = False


def steps_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list((spec.get("rollout") or {}).get("steps") or DEFAULT_STEPS)


def analysis_cfg(spec: dict[str, Any]) -> dict[str, Any]:
    a = dict((spec.get("rollout") or {}).get("analysis") or {})
    a.setdefault("intervalSeconds", 5)
    a.setdefault("minSamples", 20)
    a.setdefault("failureLimit", 3)
    a.setdefault("onNoData", "pause")
    a.setdefault("checks", {})
    return a


def requested(status: dict[str, Any], annotations: dict[str, str], what: str) -> str | None:
    """A manual request (annotation value) not yet handled, or None."""
    value = annotations.get(ANNOTATIONS[what])
    if value and (status.get("handled") or {}).get(what) != value:
        return value
    return None


def mark_handled(status: dict[str, Any], annotations: dict[str, str], what: str) -> None:
    status.setdefault("handled", {})[what] = annotations[ANNOTATIONS[what]]


def start(status: dict[str, Any], revision: str, version: str, now: str, desired: int) -> None:
    """`desired` is the total size the split works on; with autoscaling it is frozen for the rollout."""
    status["rollout"] = {"revision": revision, "modelVersion": version, "step": 0, "stepStartedAt": now,
                         "desiredReplicas": desired,
                         "startedAt": now, "trafficSince": None, "promoting": False,
                         "analysis": {"consecutiveFailures": 0, "verdict": None, "lastMeasuredAt": None,
                                      "inconclusiveSince": None, "measurements": []}}


def measure_due(status: dict[str, Any], spec: dict[str, Any], now: str) -> bool:
    ro = status.get("rollout")
    if not ro or not ro.get("trafficSince") or not analysis_cfg(spec)["checks"]:
        return False
    last = ro["analysis"].get("lastMeasuredAt")
    return last is None or seconds_between(last, now) >= analysis_cfg(spec)["intervalSeconds"]


def advance(status: dict[str, Any], inp: RolloutInputs) -> RolloutOutcome:
    """One pass of the canary machine. Mutates status['rollout'] (and 'failed'/'history' on rollback)."""
    ro = status["rollout"]
    cfg = analysis_cfg(inp.spec)
    steps = steps_of(inp.spec)
    checks = cfg["checks"]
    now = inp.now

    # Weight in force: the last setWeight at or before the current step.
    weight = 0
    for s in steps[: ro["step"] + 1]:
        if "setWeight" in s:
            weight = s["setWeight"]
    if ro.get("promoting"):
        weight = 100

    if inp.canary_ready > 0 and weight > 0 and not ro.get("trafficSince"):
        ro["trafficSince"] = now

    # A measurement taken this pass.
    a = ro["analysis"]
    if inp.analysis is not None:
        verdict, measurements = inp.analysis
        a["lastMeasuredAt"] = now
        a["verdict"] = verdict
        a["measurements"] = [m.as_status() for m in measurements]
        if verdict == FAIL:
            a["consecutiveFailures"] = a.get("consecutiveFailures", 0) + 1
        elif verdict == PASS:
            a["consecutiveFailures"] = 0
        a["inconclusiveSince"] = (a.get("inconclusiveSince") or now) if verdict == INCONCLUSIVE else None

    if requested(status, inp.annotations, "abort"):
        mark_handled(status, inp.annotations, "abort")
        return rollback(status, inp, "Aborted", "aborted by user request")
    if a.get("consecutiveFailures", 0) >= cfg["failureLimit"]:
        failing = [m for m in a.get("measurements") or [] if m["verdict"] == FAIL]
        why = "; ".join(m["message"] for m in failing) or "analysis failed"
        return rollback(status, inp, "AnalysisFailed", why)

    if requested(status, inp.annotations, "promote"):
        mark_handled(status, inp.annotations, "promote")
        ro["promoting"] = True
        ro["step"] = len(steps)
        weight = 100

    healthy = not checks or a.get("verdict") == PASS
    canary_n, stable_n = replica_split(inp.desired, weight)
    out = RolloutOutcome(canary_n, stable_n, weight)
    if ro.get("promoting"):
        # The stable revision keeps its pods until the canary is at full size: no request is dropped.
        out.stable_replicas = max(inp.stable_ready, 1)
        if inp.canary_ready >= inp.desired:
            out.promote = True
        return out

    step = steps[ro["step"]] if ro["step"] < len(steps) else None
    if step is None:
        # Every step done: promote once the analysis (if any) passes.
        if healthy:
            ro["promoting"] = True
            out.canary_replicas, out.stable_replicas = inp.desired, max(inp.stable_ready, 1)
            out.weight = 100
        return out
    if "setWeight" in step:
        if inp.canary_ready >= canary_n and inp.canary_replicas == canary_n:
            _next(ro, now)
    elif "pause" in step:
        duration = (step["pause"] or {}).get("durationSeconds")
        if duration is None:
            out.requeue_after = None  # until promoted
        else:
            left = duration - seconds_between(ro["stepStartedAt"], now)
            if left <= 0 and healthy:
                _next(ro, now)
            elif left > 0:
                out.requeue_after = left
    return out


def _next(ro: dict[str, Any], now: str) -> None:
    ro["step"] += 1
    ro["stepStartedAt"] = now


def rollback(status: dict[str, Any], inp: RolloutInputs, reason: str, message: str) -> RolloutOutcome:
    """Traffic back to stable first (stable to full size, canary to zero), then record why, once."""
    ro = status.pop("rollout")
    detect = seconds_between(ro.get("trafficSince") or ro["startedAt"], inp.now)
    status["failed"] = {"revision": ro["revision"], "modelVersion": ro.get("modelVersion"), "reason": reason,
                        "message": message, "at": inp.now}
    record(status, {"revision": ro["revision"], "modelVersion": ro.get("modelVersion"), "result": "RolledBack",
                    "reason": reason, "message": message, "startedAt": ro["startedAt"], "finishedAt": inp.now,
                    "detectSeconds": detect})
    out = RolloutOutcome(0, inp.desired, 0, rolled_back=message)
    out.events.append(("Warning", "RolledBack",
                       f"Rolled back revision {ro['revision']} (model version {ro.get('modelVersion')}): {message}"))
    return out


def record(status: dict[str, Any], entry: dict[str, Any]) -> None:
    status["history"] = ([*list(status.get("history") or []), entry])[-HISTORY:]
