"""The operator core on the real local control plane: apply, serve, scale, reject, fail, restart, delete."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from modelops_runtime import toymodels

from tests.argo import health
from tests.helpers import Http, infer_body, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "modelops.dev", "v1alpha1", "modeldeployments"


@pytest.fixture(scope="module")
def served_model(cluster: dict[str, Any], model_dir: Path, model_server: int) -> dict[str, str]:
    digest = toymodels.save(toymodels.mlp(), model_dir / "fraud-v1.onnx")
    return {"uri": f"http://{cluster['host_ip']}:{model_server}/fraud-v1.onnx", "sha256": digest}


def example(served: dict[str, str], **changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "modeldeployment.yaml").read_text())
    doc["spec"]["model"].update(served)
    for k, v in changes.items():
        doc["spec"][k] = v
    return doc


def kubectl(cluster: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", cluster["kubeconfig"], *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def modelops(cluster: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([str(Path(sys.executable).parent / "modelops"), "--kubeconfig", cluster["kubeconfig"],
                           *args], capture_output=True, text=True, timeout=60)


def apply(cluster: dict[str, Any], ns: str, doc: dict[str, Any]) -> None:
    res = kubectl(cluster, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(doc))
    assert res.returncode == 0, res.stderr


def md(kube: Any, ns: str, name: str = "fraud") -> dict[str, Any]:
    return client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def phase_is(kube: Any, ns: str, phase: str, name: str = "fraud") -> dict[str, Any] | None:
    obj = md(kube, ns, name)
    return obj if (obj.get("status") or {}).get("phase") == phase else None


def deployments(kube: Any, ns: str) -> list[Any]:
    return client.AppsV1Api(kube).list_namespaced_deployment(ns, label_selector="modelops.dev/model-deployment").items


def infer_through_service(services: Any, ns: str, name: str = "fraud") -> int:
    url = wait_until("the Service proxy", lambda: services(f"{ns}/{name}"))
    host, port = url.removeprefix("http://").split(":")
    c = Http(host, int(port), timeout=10)
    status, out = c.json("POST", "/v2/models/fraud/infer", infer_body("x", [[0.25] * 256]))
    c.close()
    assert out is not None
    return status


def test_example_becomes_ready_and_serves_through_the_service(cluster: dict[str, Any], kube: Any, operator: Any,
                                                              ns: str, served_model: dict[str, str],
                                                              services: Any) -> None:
    # Given the example manifest applied with kubectl
    apply(cluster, ns, example(served_model))
    # Then it becomes Ready with 2 pods, and serves V2 inference through its Service
    obj = wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    st = obj["status"]
    assert st["replicas"] == {"desired": 2, "ready": 2, "summary": "2/2"}
    assert st["stable"]["modelVersion"] == "1" and st["stable"]["sha256"] == served_model["sha256"]
    assert st["executionProvider"] == "CPUExecutionProvider"
    assert st["url"] == f"http://fraud.{ns}.svc.cluster.local/v2/models/fraud"
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Ready")["status"] == "True"
    assert health(obj)[0] == "Healthy"  # Argo CD's view of the same object
    assert not obj["metadata"].get("finalizers")
    wait_until("a 200 through the Service", lambda: infer_through_service(services, ns) == 200, timeout=30)
    # And the pods run the restricted profile with the model fetched by an init step
    pod = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector="modelops.dev/model-deployment=fraud").items[0]
    assert pod.spec.automount_service_account_token is False
    assert pod.spec.security_context.run_as_non_root is True
    assert pod.spec.security_context.seccomp_profile.type == "RuntimeDefault"
    c = pod.spec.containers[0]
    assert c.security_context.read_only_root_filesystem is True and c.security_context.capabilities.drop == ["ALL"]
    assert [i.name for i in pod.spec.init_containers] == ["fetch-model"]
    assert pod.metadata.annotations["prometheus.io/scrape"] == "true"
    events = client.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=fraud").items
    assert {"Created", "Ready"} <= {e.reason for e in events}
    # The CLI tells the same story, and refuses what makes no sense with a message, not a traceback
    out = modelops(cluster, "status", "fraud", "-n", ns)
    assert out.returncode == 0 and "Phase:     Ready" in out.stdout and "model version 1" in out.stdout
    bad = modelops(cluster, "promote", "fraud", "-n", ns)
    assert bad.returncode == 1 and "no rollout in progress" in bad.stderr and "Traceback" not in bad.stderr
    missing = modelops(cluster, "status", "nope", "-n", ns)
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_scaling_changes_replicas_without_a_new_revision(cluster: dict[str, Any], kube: Any, operator: Any, ns: str,
                                                         served_model: dict[str, str]) -> None:
    apply(cluster, ns, example(served_model, replicas=1))
    obj = wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    revision = obj["status"]["stable"]["revision"]
    (dep,) = deployments(kube, ns)
    # When replicas change from 1 to 3
    apply(cluster, ns, example(served_model, replicas=3))
    # Then the same Deployment scales to 3 and the revision stays
    wait_until("3 ready replicas", lambda: (md(kube, ns)["status"].get("replicas") or {}).get("ready") == 3 and
               phase_is(kube, ns, "Ready"), timeout=120)
    (dep2,) = deployments(kube, ns)
    assert dep2.metadata.name == dep.metadata.name and dep2.metadata.uid == dep.metadata.uid
    assert md(kube, ns)["status"]["stable"]["revision"] == revision
    # And a PodDisruptionBudget now exists (replicas > 1)
    pdbs = kubectl(cluster, "get", "pdb", "-n", ns, "-o", "name")
    assert "poddisruptionbudget.policy/fraud" in pdbs.stdout


def test_invalid_spec_is_reported_and_the_running_revision_is_left_alone(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, served_model: dict[str, str],
        services: Any) -> None:
    apply(cluster, ns, example(served_model, replicas=1))
    wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    (before,) = deployments(kube, ns)
    # When a spec the schema accepts but the operator cannot act on is applied
    bad = example(served_model, replicas=1, autoscaling={"minReplicas": 5, "maxReplicas": 2})
    bad["spec"]["model"]["version"] = "2"
    apply(cluster, ns, bad)
    # Then Ready=False with reason InvalidSpec names the field, and nothing changed
    obj = wait_until("InvalidSpec", lambda: phase_is(kube, ns, "InvalidSpec"), timeout=60)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in ready["message"]
    assert health(obj) == ("Degraded", ready["message"])
    (after,) = deployments(kube, ns)
    assert after.metadata.resource_version == before.metadata.resource_version
    assert not kubectl(cluster, "get", "hpa", "-n", ns, "-o", "name").stdout.strip()
    assert infer_through_service(services, ns) == 200
    # And the schema itself rejects what it can check, with a message, before anything is stored
    worse = example(served_model)
    worse["spec"]["model"]["sha256"] = "not-a-digest"
    res = kubectl(cluster, "apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(worse))
    assert res.returncode != 0 and "spec.model.sha256" in res.stderr


def test_digest_mismatch_never_becomes_ready_and_says_why(cluster: dict[str, Any], kube: Any, operator: Any,
                                                          ns: str, served_model: dict[str, str]) -> None:
    wrong = dict(served_model, sha256="0" * 64)
    apply(cluster, ns, example(wrong, replicas=1))
    obj = wait_until("phase Degraded", lambda: phase_is(kube, ns, "Degraded"), timeout=120)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ModelIntegrityFailed"
    assert "sha256" in ready["message"]
    assert condition(obj, "Degraded")["status"] == "True"
    assert health(obj)[0] == "Degraded"
    # Fixing the digest replaces the failed revision
    apply(cluster, ns, example(served_model, replicas=1))
    wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    assert len(deployments(kube, ns)) == 1


def test_gpu_pods_request_gpus_land_on_the_gpu_node_and_fall_back_to_cpu(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, served_model: dict[str, str]) -> None:
    doc = example(served_model, replicas=1)
    doc["spec"]["runtime"] = {"device": "gpu", "gpuCount": 1, "allowCpuFallback": True,
                              "gpuImage": "ghcr.io/modelops/runtime-gpu:0.1.0"}
    apply(cluster, ns, doc)
    obj = wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    assert obj["status"]["executionProvider"] == "CPUExecutionProvider"
    (pod,) = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector="modelops.dev/model-deployment").items
    assert pod.spec.node_name == "local-gpu"
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.containers[0].image.startswith("ghcr.io/modelops/runtime-gpu")


def test_autoscaling_creates_an_hpa_with_the_api_version_the_cluster_serves(
        cluster: dict[str, Any], kube: Any, operator: Any, ns: str, served_model: dict[str, str]) -> None:
    doc = example(served_model, autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetCPUUtilizationPercentage": 60})
    doc["spec"].pop("replicas")
    apply(cluster, ns, doc)
    obj = wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    out = kubectl(cluster, "get", "hpa", "fraud", "-n", ns, "-o", "yaml")
    hpa = yaml.safe_load(out.stdout)
    assert hpa["apiVersion"].startswith("autoscaling/")
    assert hpa["spec"]["scaleTargetRef"]["name"] == obj["status"]["stable"]["deployment"]
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 3
    # Removing autoscaling removes the HPA and goes back to spec.replicas
    apply(cluster, ns, example(served_model, replicas=2))
    wait_until("the HPA gone", lambda: not kubectl(cluster, "get", "hpa", "-n", ns, "-o", "name").stdout.strip())
    wait_until("2 ready replicas", lambda: (md(kube, ns)["status"].get("replicas") or {}).get("ready") == 2,
               timeout=120)


def test_load_time_optimization_is_applied_and_shown(cluster: dict[str, Any], kube: Any, operator: Any, ns: str,
                                                    served_model: dict[str, str]) -> None:
    doc = example(served_model, replicas=1)
    doc["spec"]["model"]["optimization"] = {"quantize": "dynamic-int8", "graphOptimizationLevel": "extended"}
    apply(cluster, ns, doc)
    obj = wait_until("phase Ready with what was applied",
                     lambda: (o := phase_is(kube, ns, "Ready")) and "optimizationApplied" in o["status"] and o,
                     timeout=120)
    assert obj["status"]["optimizationApplied"] == ["dynamic-int8", "graph-extended"]


def test_operator_restart_changes_nothing(cluster: dict[str, Any], kube: Any, operator: Any, ns: str,
                                          served_model: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import OperatorProcess

    apply(cluster, ns, example(served_model, replicas=2))
    wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    before_md = md(kube, ns)["metadata"]["resourceVersion"]
    before = {d.metadata.name: d.metadata.resource_version for d in deployments(kube, ns)}
    # When the operator is killed and a new one starts
    operator.stop(kill=True)
    replacement = OperatorProcess(operator.kubeconfig, tmp_path / "op2.log", resync=1.0).start()
    try:
        wait_until("three resync passes", lambda: replacement.metric("modelops_operator_reconciles_total") >= 6,
                   timeout=60)
        # Then no child was created, changed or duplicated, and it made no write call at all
        assert replacement.metric("modelops_operator_api_writes") == 0
        assert {d.metadata.name: d.metadata.resource_version for d in deployments(kube, ns)} == before
        assert md(kube, ns)["metadata"]["resourceVersion"] == before_md
    finally:
        replacement.stop()
        operator.start()


def test_deleting_the_model_deployment_removes_its_children(cluster: dict[str, Any], kube: Any, operator: Any,
                                                            ns: str, served_model: dict[str, str]) -> None:
    apply(cluster, ns, example(served_model, replicas=1))
    wait_until("phase Ready", lambda: phase_is(kube, ns, "Ready"), timeout=120)
    res = kubectl(cluster, "delete", "md", "fraud", "-n", ns, "--wait=true", "--timeout=30s")
    assert res.returncode == 0, res.stderr
    core = client.CoreV1Api(kube)
    wait_until("children gone", lambda: not deployments(kube, ns) and not core.list_namespaced_service(ns).items and
               not core.list_namespaced_pod(ns).items, timeout=90)


def test_kubectl_explain_teaches_the_spec(cluster: dict[str, Any], crd: None) -> None:
    res = kubectl(cluster, "explain", "modeldeployment.spec.model.sha256")
    assert res.returncode == 0 and "sha256" in res.stdout and "64 hex" in res.stdout
    doc = copy.deepcopy(yaml.safe_load((ROOT / "crds" / "modeldeployments.modelops.dev.yaml").read_text()))
    assert "x-kubernetes-validations" not in yaml.safe_dump(doc)
