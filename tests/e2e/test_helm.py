"""helm install / upgrade / uninstall of the chart on the local control plane, with the operator running
as a pod under the chart's ServiceAccount (not admin), and an example model reaching Ready."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from modelops_runtime import toymodels

from tests.e2e.test_operator import apply, example, md, phase_is
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e
helm = pytest.importorskip("helm_python")
CHART = str(Path(__file__).resolve().parents[2] / "charts" / "modelops")


def operator_pods(core: client.CoreV1Api, ns: str) -> list[Any]:
    return [p for p in core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/name=modelops-operator").items
            if not p.metadata.deletion_timestamp]


def ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_helm_install_upgrade_uninstall(cluster: dict[str, Any], kube: Any, crd: None, model_dir: Path,
                                       model_server: int) -> None:
    core = client.CoreV1Api(kube)
    ops_ns, app_ns = f"modelops-{uuid.uuid4().hex[:6]}", f"app-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": app_ns}})
    cfg = helm.Config(kubeconfig_path=cluster["kubeconfig"], namespace=ops_ns)
    digest = toymodels.save(toymodels.mlp(seed=3), model_dir / "helm.onnx")
    served = {"uri": f"http://{cluster['host_ip']}:{model_server}/helm.onnx", "sha256": digest}
    try:
        # Given the chart installed with namespaced RBAC watching only the app namespace
        values = {"rbac": {"scope": "namespace", "watchNamespaces": [app_ns]}, "operator": {"resyncSeconds": 2}}
        rel = cfg.install(CHART, "modelops", values, namespace=ops_ns, create_namespace=True, timeout=120)
        assert rel is not None
        pod = wait_until("the operator pod Ready", lambda: next(
            (p for p in operator_pods(core, ops_ns) if ready(p)), None), timeout=120)
        # Then the operator runs as the chart's ServiceAccount, not as an admin
        assert pod.spec.service_account_name == "modelops"
        # And an example ModelDeployment in the watched namespace reaches Ready
        apply(cluster, app_ns, example(served, replicas=1))
        obj = wait_until("phase Ready", lambda: phase_is(kube, app_ns, "Ready"), timeout=150)
        assert obj["status"]["stable"]["sha256"] == digest

        # When the release is upgraded with new values
        old_uid = pod.metadata.uid
        values2 = {**values, "operator": {"resyncSeconds": 2, "workers": 2}}
        cfg.upgrade(CHART, "modelops", values2, namespace=ops_ns, timeout=120)

        def replaced() -> Any:
            pods = [p for p in operator_pods(core, ops_ns) if ready(p)]
            return pods and pods[0].metadata.uid != old_uid and pods[0]

        new_pod = wait_until("the upgraded operator pod Ready", replaced, timeout=120)
        assert "--workers=2" in new_pod.spec.containers[0].args
        # Then the upgraded operator keeps the model converged (a scale-up is served)
        apply(cluster, app_ns, example(served, replicas=2))
        wait_until("2 ready replicas", lambda: (md(kube, app_ns)["status"].get("replicas") or {}).get("ready") == 2,
                   timeout=120)
    finally:
        # When it is uninstalled, the operator and its RBAC go; the CRD (in crds/) stays, as Helm does
        cfg.uninstall("modelops", ignore_not_found=True, timeout=120)
        wait_until("the operator pods gone", lambda: not operator_pods(core, ops_ns), timeout=90)
        rbac = client.RbacAuthorizationV1Api(kube)
        assert not rbac.list_namespaced_role(app_ns, label_selector="app.kubernetes.io/instance=modelops").items
        assert client.ApiextensionsV1Api(kube).read_custom_resource_definition("modeldeployments.modelops.dev")
        core.delete_namespace(app_ns)
        core.delete_namespace(ops_ns)
