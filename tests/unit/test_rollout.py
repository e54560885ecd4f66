"""The canary machine and the analysis maths, table-tested: splits, steps, verdicts, rollback, manual control."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from modelops_operator import builders as b
from modelops_operator.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Window,
    assess,
    histogram_quantile,
    parse_prometheus,
    psi,
)
from modelops_operator.decisions import Delete, Event, Observed, Requeue, Scale, decide
from modelops_operator.rollout import replica_split
from modelops_operator.spec import with_defaults


@pytest.mark.parametrize(("total", "weight", "split"), [
    (2, 0, (0, 2)), (2, 20, (1, 1)), (2, 50, (1, 1)), (2, 100, (2, 0)), (10, 20, (2, 8)), (10, 25, (3, 7)),
    (10, 90, (9, 1)), (1, 1, (1, 1)), (1, 99, (1, 1)), (5, 50, (3, 2)), (0, 10, (1, 0)), (3, 0, (0, 3)),
])
def test_replica_split(total: int, weight: int, split: tuple[int, int]) -> None:
    assert replica_split(total, weight) == split


def test_at_least_one_canary_pod_whenever_the_weight_is_above_zero() -> None:
    for total in range(0, 30):
        for weight in range(1, 101):
            canary, stable = replica_split(total, weight)
            assert canary >= 1
            assert stable >= (1 if weight < 100 and total > 0 else 0)


# -- analysis maths ------------------------------------------------------------------------------
def metrics(codes: dict[str, int], lat: dict[str, int], classes: dict[str, int] | None = None,
            fb: tuple[int, int] = (0, 0)) -> Any:
    lines = [f'modelops_requests_total{{code="{c}"}} {n}' for c, n in codes.items()]
    cum = 0
    for le, n in lat.items():
        cum += n
        lines.append(f'modelops_request_duration_seconds_bucket{{le="{le}"}} {cum}')
    lines.append(f"modelops_request_duration_seconds_count {cum}")
    lines += [f'modelops_prediction_class_total{{class="{k}"}} {v}' for k, v in (classes or {}).items()]
    lines += [f"modelops_feedback_total {fb[0]}", f"modelops_feedback_correct_total {fb[1]}"]
    return parse_prometheus("\n".join(lines))


def test_quantile_and_psi() -> None:
    s = metrics({"200": 100}, {"0.001": 50, "0.01": 49, "+Inf": 1})
    assert histogram_quantile(0.5, s, "modelops_request_duration_seconds") == pytest.approx(0.001)
    assert histogram_quantile(0.9, s, "modelops_request_duration_seconds") == pytest.approx(0.001 + 0.009 * 40 / 49)
    assert psi({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0
    assert psi({"a": 50, "b": 50}, {"a": 95, "b": 5}) > 0.2
    assert psi({}, {"a": 1}) is None


CHECKS = {"errorRate": {"max": 0.05}, "latency": {"quantile": 0.99, "maxRatio": 2},
          "predictionDrift": {"maxPSI": 0.2}, "accuracy": {"min": 0.8, "minLabels": 10}}


@pytest.mark.parametrize(("canary", "verdict", "failing"), [
    (metrics({"200": 100}, {"0.001": 100}, {"1": 50, "2": 50}, (20, 19)), PASS, []),
    (metrics({"200": 80, "500": 20}, {"0.001": 100}, {"1": 50, "2": 50}, (20, 19)), FAIL, ["errorRate"]),
    (metrics({"200": 100}, {"0.01": 100}, {"1": 50, "2": 50}, (20, 19)), FAIL, ["latency"]),
    (metrics({"200": 100}, {"0.001": 100}, {"1": 98, "2": 2}, (20, 19)), FAIL, ["predictionDrift"]),
    (metrics({"200": 100}, {"0.001": 100}, {"1": 50, "2": 50}, (20, 10)), FAIL, ["accuracy"]),
    (metrics({"200": 5}, {"0.001": 5}, {"1": 3, "2": 2}, (2, 2)), INCONCLUSIVE, []),
])
def test_assess_worst_verdict_wins(canary: Any, verdict: str, failing: list[str]) -> None:
    stable = metrics({"200": 400}, {"0.001": 400}, {"1": 200, "2": 200}, (100, 95))
    got, ms = assess(CHECKS, Window(canary, canary), Window(stable, stable), min_samples=20, on_no_data="pause")
    assert got == verdict
    assert sorted(m.metric for m in ms if m.verdict == FAIL) == failing


def test_no_data_policy() -> None:
    empty = Window()
    assert assess({"errorRate": {"max": 0.1}}, empty, empty, 20, "pause")[0] == INCONCLUSIVE
    assert assess({"errorRate": {"max": 0.1}}, empty, empty, 20, "fail")[0] == FAIL
    assert assess({"errorRate": {"max": 0.1}}, empty, empty, 20, "pass")[0] == PASS


# -- the canary machine through decide() -----------------------------------------------------------
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def at(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


BASE = {"model": {"name": "m", "version": "1", "uri": "http://h/m", "sha256": "a" * 64}, "replicas": 4,
        "rollout": {"strategy": "Canary", "steps": [{"setWeight": 25}, {"pause": {"durationSeconds": 10}},
                                                    {"setWeight": 50}, {"pause": {}}],
                    "analysis": {"intervalSeconds": 5, "failureLimit": 2, "checks": {"errorRate": {"max": 0.1}}}}}
V2 = {**BASE, "model": {**BASE["model"], "version": "2", "sha256": "b" * 64}}


class Cluster:
    """Applies decide()'s actions to in-memory Deployments that become ready at once (no fake API server:
    just the observed state a pure function needs)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.md: dict[str, Any] = {"metadata": {"name": "m", "namespace": "n", "uid": "u", "generation": 1,
                                                "annotations": {}}, "spec": spec, "status": {}}
        self.deps: dict[str, dict[str, Any]] = {}
        self.events: list[Event] = []

    def step(self, t: float, analysis: tuple[str, list[Any]] | None = None) -> list[Any]:
        obs = Observed(deployments=copy.deepcopy(self.deps), analysis=analysis)
        status, actions = decide(self.md, obs, at(t))
        for a in actions:
            if hasattr(a, "manifest") and a.manifest["kind"] == "Deployment":
                d = copy.deepcopy(a.manifest)
                if "replicas" not in d["spec"]:
                    d["spec"]["replicas"] = self.deps.get(d["metadata"]["name"], {}).get("spec", {}).get("replicas", 1)
                self.deps[d["metadata"]["name"]] = d
            elif isinstance(a, Scale):
                self.deps[a.name]["spec"]["replicas"] = a.replicas
            elif isinstance(a, Delete) and a.kind == "Deployment":
                self.deps.pop(a.name, None)
            elif isinstance(a, Event):
                self.events.append(a)
        for d in self.deps.values():
            d["status"] = {"readyReplicas": d["spec"]["replicas"]}
        self.md["status"] = status
        return actions

    def replicas(self) -> dict[str, int]:
        return {d["metadata"]["labels"]["modelops.dev/model-deployment"] + ":" +
                d["metadata"]["labels"]["modelops.dev/revision"]: d["spec"]["replicas"] for d in self.deps.values()}

    def apply(self, spec: dict[str, Any]) -> None:
        self.md["spec"] = spec
        self.md["metadata"]["generation"] += 1


def canary_with_traffic() -> Cluster:
    """v1 Ready, v2 applied at t=2, its canary pod ready (taking traffic) from t=3."""
    c = Cluster(BASE)
    c.step(0)
    c.step(1)
    c.apply(V2)
    c.step(2)
    c.step(3)
    return c


def rev(spec: dict[str, Any]) -> str:
    return b.revision_hash(with_defaults(spec))


def test_good_canary_walks_every_step_and_becomes_stable() -> None:
    c = Cluster(BASE)
    c.step(0)
    c.step(1)
    assert c.md["status"]["phase"] == "Ready"
    c.apply(V2)
    c.step(2)  # rollout starts at 25%: 1 canary, 3 stable
    assert c.replicas() == {f"m:{rev(BASE)}": 3, f"m:{rev(V2)}": 1}
    assert c.md["status"]["canaryWeight"] == 25 and c.md["status"]["phase"] == "Progressing"
    c.step(3)  # canary ready: traffic starts, setWeight step done -> pause
    c.step(8, (PASS, []))
    c.step(9)
    assert c.md["status"]["rollout"]["step"] == 1  # 10 s pause not over
    actions = c.step(14, (PASS, []))
    assert any(isinstance(a, Requeue) for a in actions)
    assert c.md["status"]["rollout"]["step"] == 2
    c.step(15)
    assert c.replicas() == {f"m:{rev(BASE)}": 2, f"m:{rev(V2)}": 2}
    c.step(16)
    assert c.md["status"]["phase"] == "Paused"  # pause without duration: until promoted
    c.step(40, (PASS, []))
    assert c.md["status"]["phase"] == "Paused"
    c.md["metadata"]["annotations"]["modelops.dev/promote"] = "1"
    c.step(41)
    c.step(42)
    c.step(43)
    st = c.md["status"]
    assert st["stable"]["modelVersion"] == "2" and "rollout" not in st and st["phase"] == "Ready"
    assert c.replicas() == {f"m:{rev(V2)}": 4}
    assert st["history"][-1]["result"] == "Promoted"
    c.step(44)  # the promote request is handled once
    assert st["handled"]["promote"] == "1"


def test_failures_roll_back_in_order_and_the_revision_is_not_retried() -> None:
    c = canary_with_traffic()
    c.step(8, (FAIL, []))
    assert c.md["status"]["rollout"]["analysis"]["consecutiveFailures"] == 1
    actions = c.step(13, (FAIL, []))
    scales = [a for a in actions if isinstance(a, Scale)]
    # Stable back to full size first, then the canary to zero.
    assert [s.replicas for s in scales][:1] == [4]
    assert c.replicas() == {f"m:{rev(BASE)}": 4, f"m:{rev(V2)}": 0}
    st = c.md["status"]
    assert st["phase"] == "RolledBack" and st["failed"]["revision"] == rev(V2)
    degraded = next(x for x in st["conditions"] if x["type"] == "Degraded")
    ready = next(x for x in st["conditions"] if x["type"] == "Ready")
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack" and ready["status"] == "True"
    assert any(e.type == "Warning" and e.reason == "RolledBack" for e in c.events)
    assert st["history"][-1]["detectSeconds"] == 10
    c.step(14)
    assert st["phase"] == "RolledBack" and c.replicas()[f"m:{rev(V2)}"] == 0  # not retried
    assert "rollbackSeconds" in c.md["status"]["history"][-1]
    # A retry request starts the canary again.
    c.md["metadata"]["annotations"]["modelops.dev/retry"] = "r1"
    c.step(20)
    assert c.md["status"]["phase"] == "Progressing" and c.replicas()[f"m:{rev(V2)}"] == 1


def test_inconclusive_holds_instead_of_rolling_back() -> None:
    c = canary_with_traffic()
    for t in range(8, 60, 5):
        c.step(t, (INCONCLUSIVE, []))
    st = c.md["status"]
    assert st["phase"] == "Progressing" and st["rollout"]["step"] == 1
    progressing = next(x for x in st["conditions"] if x["type"] == "Progressing")
    assert "holding since" in progressing["message"]


def test_a_newer_spec_supersedes_the_rollout() -> None:
    c = canary_with_traffic()
    v3 = {**BASE, "model": {**BASE["model"], "version": "3", "sha256": "c" * 64}}
    c.apply(v3)
    c.step(4)
    assert set(c.replicas()) == {f"m:{rev(BASE)}", f"m:{rev(v3)}"}
    assert c.md["status"]["rollout"]["revision"] == rev(v3) and c.md["status"]["rollout"]["step"] == 0


def test_abort_rolls_back_with_the_users_reason() -> None:
    c = Cluster(BASE)
    c.step(0)
    c.step(1)
    c.apply(V2)
    c.step(2)
    c.md["metadata"]["annotations"]["modelops.dev/abort"] = "now"
    c.step(3)
    assert c.md["status"]["phase"] == "RolledBack" and c.md["status"]["failed"]["reason"] == "Aborted"


def test_recreate_stops_the_old_revision_before_starting_the_new() -> None:
    base = {**BASE, "rollout": {"strategy": "Recreate"}}
    v2 = {**base, "model": {**BASE["model"], "version": "2", "sha256": "b" * 64}}
    c = Cluster(base)
    c.step(0)
    c.step(1)
    c.apply(v2)
    c.step(2)  # old scaled to zero, new created at zero
    assert c.replicas() == {f"m:{rev(base)}": 0, f"m:{rev(v2)}": 0}
    c.step(3)  # old has no pod left: the new one starts at full size
    assert c.replicas()[f"m:{rev(v2)}"] == 4
    c.step(4)
    c.step(5)
    assert c.md["status"]["stable"]["modelVersion"] == "2" and c.replicas() == {f"m:{rev(v2)}": 4}


def test_input_drift_reads_the_monitored_feature_histograms() -> None:
    def feature(counts: list[int]) -> Any:
        cum, lines = 0, []
        for le, n in zip(["-1", "0", "1", "+Inf"], counts, strict=True):
            cum += n
            lines.append(f'modelops_feature_value_bucket{{feature="x:0",le="{le}"}} {cum}')
        return parse_prometheus("\n".join(lines))

    stable = feature([100, 400, 400, 100])
    same, shifted = feature([10, 40, 40, 10]), feature([0, 5, 15, 80])
    checks = {"inputDrift": {"feature": "x:0", "maxPSI": 0.2}}
    assert assess(checks, Window(same, same), Window(stable, stable), 20, "pause")[0] == PASS
    verdict, ms = assess(checks, Window(shifted, shifted), Window(stable, stable), 20, "pause")
    assert verdict == FAIL and "x:0" in ms[0].message


def test_autoscaling_pauses_during_a_canary_and_resumes_on_the_new_stable() -> None:
    base = {**BASE, "autoscaling": {"minReplicas": 2, "maxReplicas": 8}}
    del base["replicas"]
    v2 = {**base, "model": {**BASE["model"], "version": "2", "sha256": "b" * 64}}
    c = Cluster(base)
    hpas: list[dict[str, Any]] = []

    def step(t: float, analysis: Any = None) -> None:
        for a in c.step(t, analysis):
            if hasattr(a, "manifest") and a.manifest["kind"] == "HorizontalPodAutoscaler":
                hpas[:] = [a.manifest]
            elif isinstance(a, Delete) and a.kind == "HorizontalPodAutoscaler":
                hpas.clear()

    step(0)
    step(1)
    assert hpas and hpas[0]["spec"]["scaleTargetRef"]["name"] == f"m-{rev(base)}"
    c.deps[f"m-{rev(base)}"]["spec"]["replicas"] = 6  # the HPA scaled the stable revision up
    c.deps[f"m-{rev(base)}"]["status"]["readyReplicas"] = 6
    c.apply(v2)
    obs_hpa = copy.deepcopy(hpas[0])
    # The HPA is observed while the canary starts: it is removed, and the split works on 6 pods.
    status, actions = decide(c.md, Observed(deployments=copy.deepcopy(c.deps), hpa={**obs_hpa, "metadata": {
        **obs_hpa["metadata"], "resourceVersion": "1"}}), at(2))
    assert any(isinstance(a, Delete) and a.kind == "HorizontalPodAutoscaler" for a in actions)
    assert status["rollout"]["desiredReplicas"] == 6
    hpas.clear()
    for t in range(2, 30):
        step(t, (PASS, []))
        if c.md["status"].get("phase") == "Paused":
            c.md["metadata"]["annotations"]["modelops.dev/promote"] = "go"
        if c.md["status"]["stable"]["modelVersion"] == "2":
            break
        assert sum(c.replicas().values()) >= 6  # never below the size the HPA had chosen
    step(31)
    assert c.md["status"]["stable"]["modelVersion"] == "2"
    assert hpas and hpas[0]["spec"]["scaleTargetRef"]["name"] == f"m-{rev(v2)}"
