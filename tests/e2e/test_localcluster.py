"""The local control plane and its process node, as the operator's e2e tests rely on them."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelops_runtime import toymodels

from tests.helpers import Http, infer_body, metric, wait_until

pytestmark = pytest.mark.e2e


def runtime_deployment(name: str, model_url: str, replicas: int = 2, gpu: bool = False) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "runtime", "image": "ghcr.io/modelops/runtime:0.1.0",
        "args": ["--model", model_url, "--name", "mlp", "--port", "8080", "--intra-op-threads", "1",
                 "--allow-cpu-fallback"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 5},
    }
    spec: dict[str, Any] = {"automountServiceAccountToken": False, "containers": [container],
                            "terminationGracePeriodSeconds": 5}
    if gpu:
        container["args"] += ["--device", "gpu"]
        container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}


@pytest.fixture(scope="module")
def model_url(cluster: dict[str, Any], model_dir: Path, model_server: int) -> str:
    toymodels.save(toymodels.mlp(), model_dir / "mlp.onnx")
    return f"http://{cluster['host_ip']}:{model_server}/mlp.onnx"


def ready_pods(core: client.CoreV1Api, ns: str, app: str, n: int) -> list[Any] | None:
    pods = core.list_namespaced_pod(ns, label_selector=f"app={app}").items
    ready = [p for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp and any(
        c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
    return ready if len(ready) == n else None


def pid_of(pod: Any) -> int:
    return int(pod.status.container_statuses[0].container_id.removeprefix("process://"))


def test_runtime_deployment_serves_on_pod_ips_and_replaces_deleted_pods(kube: Any, ns: str,
                                                                        model_url: str) -> None:
    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    # Given a Deployment of the runtime image with 2 replicas
    apps.create_namespaced_deployment(ns, runtime_deployment("mlp", model_url))
    # Then it becomes 2/2 Ready, with real processes answering on their pod IPs
    pods = wait_until("2 ready pods", lambda: ready_pods(core, ns, "mlp", 2), timeout=90)
    assert len({p.status.pod_ip for p in pods}) == 2
    for p in pods:
        c = Http(p.status.pod_ip, 8080)
        status, out = c.json("POST", "/v2/models/mlp/infer", infer_body("x", [[0.5] * 256]))
        c.close()
        assert status == 200 and out["outputs"][0]["shape"] == [1, 10]
        assert Path(f"/proc/{pid_of(p)}").exists()
    wait_until("the Deployment to report 2 available",
               lambda: apps.read_namespaced_deployment(namespace=ns, name="mlp").status.available_replicas == 2)

    # When a pod is deleted
    victim = pods[0]
    old_pid = pid_of(victim)
    core.delete_namespaced_pod(victim.metadata.name, ns)
    # Then its process exits and the ReplicaSet replaces it with a new ready pod
    wait_until("the old process to exit", lambda: not os.path.exists(f"/proc/{old_pid}"), timeout=30)
    new = wait_until("2 ready pods again", lambda: ready_pods(core, ns, "mlp", 2), timeout=90)
    assert victim.metadata.name not in {p.metadata.name for p in new}


def test_service_proxy_spreads_connections_over_ready_pods(kube: Any, ns: str, model_url: str,
                                                            services: Any) -> None:
    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    apps.create_namespaced_deployment(ns, runtime_deployment("mlp", model_url))
    core.create_namespaced_service(ns, {"metadata": {"name": "mlp"}, "spec": {
        "selector": {"app": "mlp"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    pods = wait_until("2 ready pods", lambda: ready_pods(core, ns, "mlp", 2), timeout=90)
    url = wait_until("the Service's proxy address", lambda: services(f"{ns}/mlp"))
    host, port = url.removeprefix("http://").split(":")

    def endpoints_ready() -> bool:
        ep = core.read_namespaced_endpoints("mlp", ns)
        return sum(len(s.addresses or []) for s in ep.subsets or []) == 2

    wait_until("2 endpoints", endpoints_ready)
    # When 20 requests go through the Service, each on a new connection
    for _ in range(20):
        c = Http(host, int(port))
        status, _ = c.json("POST", "/v2/models/mlp/infer", infer_body("x", [[1.0] * 256]))
        c.close()
        assert status == 200
    # Then both pods served some of them
    counts = []
    for p in pods:
        c = Http(p.status.pod_ip, 8080)
        _, _, text = c.request("GET", "/metrics")
        c.close()
        counts.append(metric(text.decode(), "modelops_requests_total", code="200"))
    assert sum(counts) >= 20 and all(n >= 5 for n in counts), counts


def test_gpu_pods_land_only_on_the_gpu_node(kube: Any, ns: str, model_url: str) -> None:
    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    apps.create_namespaced_deployment(ns, runtime_deployment("gpu", model_url, replicas=2, gpu=True))
    apps.create_namespaced_deployment(ns, runtime_deployment("cpu", model_url, replicas=1))
    gpu_pods = wait_until("2 ready GPU pods", lambda: ready_pods(core, ns, "gpu", 2), timeout=90)
    cpu_pods = wait_until("1 ready CPU pod", lambda: ready_pods(core, ns, "cpu", 1), timeout=90)
    assert {p.spec.node_name for p in gpu_pods} == {"local-gpu"}
    assert {p.spec.node_name for p in cpu_pods} == {"local-cpu"}  # the GPU taint keeps others away


def test_unknown_image_fails_the_pod_with_a_clear_reason(kube: Any, ns: str) -> None:
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(ns, {"metadata": {"name": "unknown"}, "spec": {
        "containers": [{"name": "c", "image": "example.com/not-mapped:1"}], "automountServiceAccountToken": False}})

    def waiting_reason() -> Any:
        st = core.read_namespaced_pod("unknown", ns).status.container_statuses
        return st and st[0].state.waiting and st[0].state.waiting.reason == "ErrImagePull" and st[0].state.waiting

    waiting = wait_until("the pod to report ErrImagePull", waiting_reason)
    assert "not in the process node's image map" in waiting.message


def test_rbac_is_enforced_for_a_service_account_without_rights(kube: Any, ns: str,
                                                                cluster: dict[str, Any]) -> None:
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "nobody"}})

    def token() -> str | None:
        for s in core.list_namespaced_secret(ns).items:
            if s.type == "kubernetes.io/service-account-token" and (s.metadata.annotations or {}).get(
                    "kubernetes.io/service-account.name") == "nobody" and s.data and "token" in s.data:
                return base64.b64decode(s.data["token"]).decode()
        return None

    tok = wait_until("the ServiceAccount's token", token)
    ca = Path(cluster["dir"]) / "pki" / "ca.crt"
    req = urllib.request.Request(f"{cluster['server']}/api/v1/namespaces/{ns}/pods",
                                 headers={"Authorization": f"Bearer {tok}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca)), timeout=10)
    assert err.value.code == 403


def _cluster_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if any(k in line for k in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd --data-dir"))]


def run_modelops(*args: str, state: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELOPS_LOCAL_STATE": str(state)}
    return subprocess.run([str(Path(sys.executable).parent / "modelops"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_modelops_local_up_status_down_leaves_nothing_behind(tmp_path: Path, cluster: dict[str, Any]) -> None:
    state = tmp_path / "local-cluster.json"
    before = set(_cluster_processes())
    up = run_modelops("local", "up", state=state)
    try:
        assert up.returncode == 0, up.stderr
        assert "export KUBECONFIG=" in up.stdout
        status = run_modelops("local", "status", state=state)
        assert status.returncode == 0, status.stderr
        lines = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
        assert lines["host"].count(".") == 3 and "local-gpu" in lines["nodes"]
        assert Path(lines["kubeconfig"]).exists()
        again = run_modelops("local", "up", state=state)
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        down = run_modelops("local", "down", state=state)
    assert down.returncode == 0, down.stderr
    assert set(_cluster_processes()) <= before
    assert not state.exists()
    assert run_modelops("local", "status", state=state).returncode == 1


def test_local_up_with_missing_binaries_names_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "MODELOPS_LOCAL_STATE": str(tmp_path / "s.json"), "MODELOPS_CACHE": str(tmp_path)}
    res = subprocess.run([str(Path(sys.executable).parent / "modelops"), "local", "up"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 1
    assert "make kubernetes" in res.stderr and "Traceback" not in res.stderr


def test_local_up_replaces_stale_state(tmp_path: Path) -> None:
    state = tmp_path / "local-cluster.json"
    stale_dir = tmp_path / "old"
    stale_dir.mkdir()
    state.write_text(json.dumps({"pid": 999999, "dir": str(stale_dir)}))
    env = {**os.environ, "MODELOPS_LOCAL_STATE": str(state), "MODELOPS_CACHE": str(tmp_path / "nobins")}
    res = subprocess.run([str(Path(sys.executable).parent / "modelops"), "local", "up"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert "no longer running" in res.stderr
    assert not stale_dir.exists()


def test_a_cluster_started_by_a_process_that_dies_stops_by_itself(tmp_path: Path) -> None:
    # Given a process that starts a cluster (as the demo and the test fixture do) and is then killed -9
    script = ("import sys, time; from pathlib import Path; from modelops_local.cluster import spawn; "
              f"p, s = spawn(Path({str(tmp_path / 'c')!r})); print(p.pid, flush=True); time.sleep(600)")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None
        cluster_pid = int(starter.stdout.readline())
        assert os.path.exists(f"/proc/{cluster_pid}")
    finally:
        starter.kill()
        starter.wait()
    # Then the cluster and everything it started go away, with no process left
    wait_until("the cluster to stop", lambda: not any(str(tmp_path) in line for line in subprocess.run(
        ["ps", "-eo", "args="], capture_output=True, text=True).stdout.splitlines()), timeout=60)
