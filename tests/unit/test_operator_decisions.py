"""The reconcile decision, table-tested without a cluster."""

from __future__ import annotations

import copy
from typing import Any

from modelops_operator import LABEL_REVISION
from modelops_operator import builders as b
from modelops_operator.decisions import Apply, Delete, Event, Observed, Scale, decide, revision_failure
from modelops_operator.spec import with_defaults

NOW = "2026-01-01T00:00:00Z"
SPEC = {"model": {"name": "fraud", "version": "1", "uri": "http://h/m.onnx", "sha256": "a" * 64}, "replicas": 2}


def md(spec: dict[str, Any] = SPEC, status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "fraud", "namespace": "ns", "uid": "u", "generation": generation},
            "spec": copy.deepcopy(spec), "status": status or {}}


def existing(obj: dict[str, Any], ready: int | None = None) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"]["resourceVersion"] = "1"
    if ready is not None:
        out["status"] = {"readyReplicas": ready}
    return out


def converge(m: dict[str, Any], ready: int) -> tuple[dict[str, Any], Observed]:
    """Applies the first pass's actions to an Observed and returns (md with status, observed)."""
    status, actions = decide(m, Observed(), NOW)
    obs = Observed()
    for a in actions:
        if isinstance(a, Apply):
            o = existing(a.manifest, ready if a.manifest["kind"] == "Deployment" else None)
            kind = a.manifest["kind"]
            if kind == "Deployment":
                obs.deployments[o["metadata"]["name"]] = o
            elif kind == "Service":
                obs.service = o
            elif kind == "PodDisruptionBudget":
                obs.pdb = o
    return {**m, "status": status}, obs


def test_first_pass_creates_deployment_service_pdb_and_is_pending() -> None:
    status, actions = decide(md(), Observed(), NOW)
    kinds = sorted(a.manifest["kind"] for a in actions if isinstance(a, Apply))
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service"]
    assert status["phase"] == "Pending"
    assert status["stable"]["revision"] == b.revision_hash(with_defaults(SPEC))
    assert any(isinstance(a, Event) and a.reason == "Pending" for a in actions)


def test_steady_state_makes_no_actions_and_no_status_change() -> None:
    m, obs = converge(md(), ready=2)
    status, _ = decide(m, obs, NOW)
    assert status["phase"] == "Ready"
    m2 = {**m, "status": status}
    status2, actions2 = decide(m2, obs, "2030-01-01T00:00:00Z")
    assert actions2 == [] and status2 == status  # later time, same status: lastTransitionTime kept


def test_replica_change_scales_the_same_deployment() -> None:
    m, obs = converge(md(), ready=2)
    m["status"], _ = decide(m, obs, NOW)
    spec = {**SPEC, "replicas": 4}
    status, actions = decide(md(spec, m["status"]), obs, NOW)
    assert [a for a in actions if not isinstance(a, Event)] == [Scale(f"fraud-{status['stable']['revision']}", 4)]
    assert status["phase"] == "Progressing"


def test_invalid_spec_changes_nothing_but_status() -> None:
    m, obs = converge(md(), ready=2)
    m["status"], _ = decide(m, obs, NOW)
    bad = {**SPEC, "autoscaling": {"minReplicas": 3, "maxReplicas": 1}}
    status, actions = decide(md(bad, m["status"], generation=2), obs, NOW)
    assert all(isinstance(a, Event) for a in actions)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.autoscaling.minReplicas" in ready["message"]
    assert status["stable"] == m["status"]["stable"] and status["observedGeneration"] == 2


def test_rolling_update_brings_up_the_new_revision_then_promotes_and_deletes_the_old() -> None:
    base = {**SPEC, "rollout": {"strategy": "RollingUpdate"}}
    m, obs = converge(md(base), ready=2)
    m["status"], _ = decide(m, obs, NOW)
    old_name = m["status"]["stable"]["deployment"]
    v2 = {**base, "model": {**SPEC["model"], "version": "2", "sha256": "b" * 64}}
    status, actions = decide(md(v2, m["status"]), obs, NOW)
    new = [a for a in actions if isinstance(a, Apply) and a.manifest["kind"] == "Deployment"]
    assert len(new) == 1 and new[0].manifest["metadata"]["name"] != old_name
    assert status["phase"] == "Progressing" and status["canary"]["modelVersion"] == "2"
    assert not any(isinstance(a, Delete) for a in actions)  # the old revision keeps serving meanwhile
    obs.deployments[new[0].manifest["metadata"]["name"]] = existing(new[0].manifest, ready=2)
    status2, actions2 = decide(md(v2, status), obs, NOW)
    assert status2["stable"]["modelVersion"] == "2" and "canary" not in status2
    assert Delete("apps/v1", "Deployment", old_name) in actions2


def test_revision_failure_reads_fetch_exit_codes_and_scheduling() -> None:
    def pod(**status: Any) -> dict[str, Any]:
        return {"metadata": {"name": "p", "labels": {LABEL_REVISION: "r1"}}, "status": status}

    integrity = pod(initContainerStatuses=[{"name": "fetch-model", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                            "lastState": {"terminated": {"exitCode": 3}}}])
    assert revision_failure([integrity], "r1")[0] == "ModelIntegrityFailed"  # type: ignore[index]
    fetch = pod(initContainerStatuses=[{"name": "fetch-model", "state": {"terminated": {"exitCode": 4}}}])
    assert revision_failure([fetch], "r1")[0] == "ModelFetchFailed"  # type: ignore[index]
    unsched = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                               "message": "0/2 nodes have nvidia.com/gpu"}])
    assert revision_failure([unsched], "r1") == ("Unschedulable", "0/2 nodes have nvidia.com/gpu")
    assert revision_failure([integrity], "other") is None
    assert revision_failure([pod(phase="Running")], "r1") is None


def test_degraded_first_revision_is_replaced_when_the_spec_is_fixed() -> None:
    m, obs = converge(md(), ready=0)
    m["status"], _ = decide(m, obs, NOW)
    fixed = {**SPEC, "model": {**SPEC["model"], "sha256": "f" * 64}}
    status, actions = decide(md(fixed, m["status"]), obs, NOW)
    assert status["stable"]["sha256"] == "f" * 64 and "canary" not in status
    assert any(isinstance(a, Delete) and a.kind == "Deployment" for a in actions)
