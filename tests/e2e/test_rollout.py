"""Progressive rollout on the real local control plane, with steady client load through the Service.

Each scenario: v1 serves, v2 is applied, the canary takes real traffic, the operator judges it on the
pods' own metrics (no Prometheus) and promotes or rolls back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import yaml
from kubernetes import client
from modelops_local.traffic import Load
from modelops_runtime import toymodels

from tests.argo import health
from tests.e2e.test_operator import apply, deployments, md, phase_is
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e
INTERVAL, FAILURE_LIMIT = 2, 2


@pytest.fixture(scope="module")
def models(cluster: dict[str, Any], model_dir: Path, model_server: int) -> dict[str, dict[str, str]]:
    made = {
        "v1": toymodels.mlp(seed=0),
        "good": toymodels.mlp(seed=0, scale=1.0005),
        "slow": toymodels.heavy(seed=0, width=2048, depth=4),
        "errors": toymodels.failing_mlp(seed=0),
        "drift": toymodels.mlp(seed=0, bias_shift=50.0),
        "inaccurate": toymodels.mlp(seed=7),
    }
    out = {}
    for name, data in made.items():
        digest = toymodels.save(data, model_dir / f"ro-{name}.onnx")
        out[name] = {"uri": f"http://{cluster['host_ip']}:{model_server}/ro-{name}.onnx", "sha256": digest,
                     "path": str(model_dir / f"ro-{name}.onnx")}
    return out


def spec_for(model: dict[str, str], version: str, checks: dict[str, Any],
             steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "modelops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "fraud"},
            "spec": {"model": {"name": "fraud", "version": version, "uri": model["uri"], "sha256": model["sha256"]},
                     "replicas": 2, "monitoring": {"task": "classification"},
                     "rollout": {"strategy": "Canary",
                                 "steps": steps or [{"setWeight": 50}, {"pause": {"durationSeconds": 12}}],
                                 "analysis": {"intervalSeconds": INTERVAL, "failureLimit": FAILURE_LIMIT,
                                              "minSamples": 10, "checks": checks}}}}


def ready_v1(cluster: dict[str, Any], kube: Any, ns: str, models: dict[str, dict[str, str]],
             checks: dict[str, Any], services: Any, **kw: Any) -> str:
    apply(cluster, ns, spec_for(models["v1"], "1", checks, **kw))
    wait_until("v1 Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    return wait_until("the Service proxy", lambda: services(f"{ns}/fraud"))


def rolled_back(kube: Any, ns: str, models: dict[str, dict[str, str]], bad: str, checks: dict[str, Any],
                cluster: dict[str, Any], services: Any, metric: str, labeller: bool = False) -> None:
    url = ready_v1(cluster, kube, ns, models, checks, services)
    sess = ort.InferenceSession(models["v1"]["path"], providers=["CPUExecutionProvider"]) if labeller else None
    with Load(url, labeller=sess) as load:
        time.sleep(3)
        apply(cluster, ns, spec_for(models[bad], "2", checks))
        obj = wait_until("RolledBack", lambda: phase_is(kube, ns, "RolledBack"), timeout=120)
        wait_until("the canary at zero pods", lambda: "rollbackSeconds" in (md(kube, ns)["status"]["history"][-1]),
                   timeout=60)
    st = md(kube, ns)["status"]
    last = st["history"][-1]
    assert last["result"] == "RolledBack" and last["reason"] == "AnalysisFailed"
    assert metric in last["message"], last["message"]
    assert last["detectSeconds"] <= INTERVAL * FAILURE_LIMIT + 15, last
    assert last["detectSeconds"] + last["rollbackSeconds"] <= 60, last
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack" and metric in degraded["message"]
    assert ready["status"] == "True"  # stable keeps serving
    assert health(obj) == ("Degraded", degraded["message"])
    assert st["stable"]["modelVersion"] == "1" and st["failed"]["modelVersion"] == "2"
    events = client.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=fraud").items
    assert any(e.type == "Warning" and e.reason == "RolledBack" and metric in e.message for e in events)
    assert load.codes[200] > 50


def test_good_version_goes_through_every_step_without_a_failed_request(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any) -> None:
    checks = {"errorRate": {"max": 0.01}, "latency": {"quantile": 0.99, "maxRatio": 5},
              "predictionDrift": {"maxPSI": 0.5}}
    steps = [{"setWeight": 50}, {"pause": {"durationSeconds": 6}}]
    url = ready_v1(cluster, kube, ns, models, checks, services, steps=steps)
    (old,) = deployments(kube, ns)
    weights: set[int] = set()
    with Load(url) as load:
        time.sleep(2)
        apply(cluster, ns, spec_for(models["good"], "2", checks, steps=steps))

        seen: set[str] = set()

        def promoted() -> bool:
            obj = md(kube, ns)
            st = obj["status"]
            weights.add(st.get("canaryWeight", 0))
            seen.add(health(obj)[0])
            return st.get("phase") == "Ready" and st["stable"]["modelVersion"] == "2"

        wait_until("v2 promoted", promoted, timeout=180, interval=0.5)
        wait_until("the old revision gone", lambda: [d.metadata.name for d in deployments(kube, ns)] != [
            old.metadata.name] and len(deployments(kube, ns)) == 1, timeout=60)
        time.sleep(4)  # keep the load on while the old pods drain
    assert 50 in weights
    assert {"Progressing", "Healthy"} <= seen
    assert set(load.codes) == {200}, load.codes
    assert load.codes[200] > 100
    st = md(kube, ns)["status"]
    assert st["history"][-1]["result"] == "Promoted" and "canary" not in st


def test_slower_version_is_rolled_back_for_latency(cluster: dict[str, Any], kube: Any, operator: Any, ns: str,
                                                   models: dict[str, dict[str, str]], services: Any) -> None:
    rolled_back(kube, ns, models, "slow", {"latency": {"quantile": 0.9, "maxRatio": 2}}, cluster, services, "latency")


def test_failing_version_is_rolled_back_for_errors(cluster: dict[str, Any], kube: Any, operator: Any, ns: str,
                                                   models: dict[str, dict[str, str]], services: Any) -> None:
    rolled_back(kube, ns, models, "errors", {"errorRate": {"max": 0.05}}, cluster, services, "errorRate")


def test_drifting_version_is_rolled_back_for_prediction_drift(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any) -> None:
    rolled_back(kube, ns, models, "drift", {"predictionDrift": {"maxPSI": 0.25}, "latency": {"maxRatio": 5}},
                cluster, services, "predictionDrift")


def test_less_accurate_version_is_rolled_back_on_fed_back_labels(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any) -> None:
    rolled_back(kube, ns, models, "inaccurate", {"accuracy": {"min": 0.8, "minLabels": 10}}, cluster, services,
                "accuracy", labeller=True)


def test_canary_without_traffic_holds_instead_of_rolling_back(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any) -> None:
    checks = {"errorRate": {"max": 0.01}}
    ready_v1(cluster, kube, ns, models, checks, services)
    apply(cluster, ns, spec_for(models["errors"], "2", checks))

    def holding() -> dict[str, Any] | None:
        st = md(kube, ns)["status"]
        a = (st.get("rollout") or {}).get("analysis") or {}
        return st if a.get("verdict") == "Inconclusive" else None

    wait_until("an inconclusive verdict", holding, timeout=90)
    time.sleep(INTERVAL * (FAILURE_LIMIT + 3))
    st = md(kube, ns)["status"]
    assert st["phase"] == "Progressing" and st["rollout"]["step"] == 1
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert "holding since" in progressing["message"] and "samples" in progressing["message"]


def test_operator_killed_mid_rollout_resumes_from_status(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any, tmp_path: Path) -> None:
    from tests.conftest import OperatorProcess

    checks = {"errorRate": {"max": 0.01}}
    steps = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]
    url = ready_v1(cluster, kube, ns, models, checks, services, steps=steps)
    with Load(url) as load:
        apply(cluster, ns, spec_for(models["good"], "2", checks, steps=steps))
        paused = wait_until("Paused at step 2", lambda: phase_is(kube, ns, "Paused"), timeout=120)
        assert health(paused)[0] == "Suspended"
        started = md(kube, ns)["status"]["rollout"]["startedAt"]
        names = sorted(d.metadata.name for d in deployments(kube, ns))
        operator.stop(kill=True)
        replacement = OperatorProcess(operator.kubeconfig, tmp_path / "op.log", resync=1.0).start()
        try:
            wait_until("a few passes", lambda: replacement.metric("modelops_operator_reconciles_total") >= 4)
            st = md(kube, ns)["status"]
            assert st["phase"] == "Paused" and st["rollout"]["step"] == 1 and st["rollout"]["startedAt"] == started
            assert sorted(d.metadata.name for d in deployments(kube, ns)) == names
            import subprocess
            import sys

            res = subprocess.run([str(Path(sys.executable).parent / "modelops"), "--kubeconfig",
                                  operator.kubeconfig, "promote", "fraud", "-n", ns], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            wait_until("v2 promoted", lambda: phase_is(kube, ns, "Ready") and
                       md(kube, ns)["status"]["stable"]["modelVersion"] == "2", timeout=120)
        finally:
            replacement.stop()
            operator.start()
    assert set(load.codes) == {200}, load.codes
    yaml.safe_dump(md(kube, ns)["status"])  # status stays plain data


def test_prometheus_provider_rolls_back_a_failing_version(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any, prometheus: str) -> None:
    checks = {"errorRate": {"max": 0.05}, "prometheus": [{
        "name": "canaryRequestRate",
        "query": 'sum(rate(modelops_requests_total{namespace="{{namespace}}",pod=~"{{name}}-{{revision}}-.*"}'
                 '[{{window}}]))', "min": 0}]}
    provider = {"type": "prometheus", "address": prometheus}

    def spec(model: str, version: str) -> dict[str, Any]:
        doc = spec_for(models[model], version, checks)
        doc["spec"]["rollout"]["analysis"]["provider"] = provider
        doc["spec"]["rollout"]["analysis"]["intervalSeconds"] = 3
        return doc

    apply(cluster, ns, spec("v1", "1"))
    wait_until("v1 Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    url = wait_until("the Service proxy", lambda: services(f"{ns}/fraud"))
    with Load(url):
        time.sleep(3)
        apply(cluster, ns, spec("errors", "2"))
        obj = wait_until("RolledBack", lambda: phase_is(kube, ns, "RolledBack"), timeout=120)
    last = obj["status"]["history"][-1]
    assert "errorRate" in last["message"], last
    assert last["detectSeconds"] <= 3 * FAILURE_LIMIT + 15 + 5, last  # + Prometheus' scrape and rate() lag
    # The verdicts came from Prometheus: the user's PromQL check was evaluated alongside.
    events = client.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=fraud").items
    assert any(e.reason == "RolledBack" for e in events)


def test_prometheus_provider_measures_what_the_pods_provider_measures(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any, prometheus: str) -> None:
    from modelops_operator.analysis import total
    from modelops_operator.providers import prometheus_window

    url = ready_v1(cluster, kube, ns, models, {"errorRate": {"max": 0.05}}, services)
    revision = md(kube, ns)["status"]["stable"]["revision"]
    with Load(url, rate=20):
        def counted() -> float | None:
            w = prometheus_window(prometheus, ns, "fraud", revision, 10, 10)
            n = total(w.recent, "modelops_requests_total")
            return n if n > 50 else None

        n = wait_until("Prometheus to count the requests", counted, timeout=60)
    assert n > 50
    w = prometheus_window(prometheus, ns, "fraud", "no-such-revision", 10, 10)
    assert w.recent == {}  # no data is an empty window, not an error


def test_with_default_settings_a_bad_version_is_back_to_zero_within_60_seconds(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, models: dict[str, dict[str, str]],
        services: Any) -> None:
    def spec(model: str, version: str) -> dict[str, Any]:
        # Only what a user must say: the model and which checks matter. Steps, interval, minSamples,
        # failureLimit and onNoData are the defaults.
        return {"apiVersion": "modelops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "fraud"},
                "spec": {"model": {"name": "fraud", "version": version, "uri": models[model]["uri"],
                                   "sha256": models[model]["sha256"]}, "replicas": 2,
                         "rollout": {"analysis": {"checks": {"errorRate": {"max": 0.01},
                                                             "latency": {"maxRatio": 2}}}}}}

    apply(cluster, ns, spec("v1", "1"))
    wait_until("v1 Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    url = wait_until("the Service proxy", lambda: services(f"{ns}/fraud"))
    with Load(url):
        apply(cluster, ns, spec("errors", "2"))
        wait_until("RolledBack", lambda: phase_is(kube, ns, "RolledBack"), timeout=120)
        wait_until("the canary at zero pods", lambda: "rollbackSeconds" in md(kube, ns)["status"]["history"][-1],
                   timeout=60)
    last = md(kube, ns)["status"]["history"][-1]
    assert "errorRate" in last["message"]
    assert last["detectSeconds"] + last["rollbackSeconds"] <= 60, last
