"""Builders: deterministic, owned, restricted, and a revision only when what defines it changes."""

from __future__ import annotations

from modelops_operator import ANNOTATION_HASH, LABEL_MD, LABEL_REVISION
from modelops_operator import builders as b
from modelops_operator.spec import with_defaults

MD = {"metadata": {"name": "fraud", "namespace": "risk", "uid": "u-1"}}
SPEC = with_defaults({"model": {"name": "fraud", "version": "3", "uri": "s3://b/m.onnx", "sha256": "c" * 64,
                                "storageSecretRef": {"name": "s3-creds"}}, "replicas": 2})


def test_revision_ignores_replicas_and_rollout_but_not_the_model() -> None:
    r = b.revision_hash(SPEC)
    assert b.revision_hash({**SPEC, "replicas": 7, "rollout": {"strategy": "Recreate"}}) == r
    assert b.revision_hash({**SPEC, "model": {**SPEC["model"], "version": "4"}}) != r
    assert b.revision_hash({**SPEC, "runtime": {**SPEC["runtime"], "intraOpThreads": 4}}) != r
    assert len(r) == 10


def test_deployment_is_deterministic_owned_and_restricted() -> None:
    rev = b.revision_hash(SPEC)
    d1, d2 = b.deployment(MD, SPEC, rev, 2), b.deployment(MD, SPEC, rev, 2)
    assert d1 == d2
    assert d1["metadata"]["name"] == f"fraud-{rev}"
    assert d1["metadata"]["ownerReferences"][0] == {
        "apiVersion": "modelops.dev/v1alpha1", "kind": "ModelDeployment", "name": "fraud", "uid": "u-1",
        "controller": True, "blockOwnerDeletion": True}
    assert d1["spec"]["selector"]["matchLabels"] == {LABEL_MD: "fraud", LABEL_REVISION: rev}
    assert d1["spec"]["replicas"] == 2
    pod = d1["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
    fetch, = pod["initContainers"]
    runtime, = pod["containers"]
    # Storage credentials reach the fetch step only.
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "envFrom" not in runtime
    assert fetch["args"] == ["--uri", "s3://b/m.onnx", "--sha256", "c" * 64, "--dest", "/models/model.onnx"]
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert runtime["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert runtime["startupProbe"] and runtime["lifecycle"]["preStop"]
    assert "--sha256" in runtime["args"] and "nvidia.com/gpu" not in str(runtime["resources"])
    assert d1["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_hash_annotation_ignores_replicas_only() -> None:
    rev = b.revision_hash(SPEC)
    h = b.deployment(MD, SPEC, rev, 2)["metadata"]["annotations"][ANNOTATION_HASH]
    assert b.deployment(MD, SPEC, rev, 5)["metadata"]["annotations"][ANNOTATION_HASH] == h
    other = {**SPEC, "runtime": {**SPEC["runtime"], "nodeSelector": {"pool": "a"}}}
    assert b.deployment(MD, other, rev, 2)["metadata"]["annotations"][ANNOTATION_HASH] != h


def test_gpu_pods_get_the_gpu_image_limits_and_toleration() -> None:
    spec = with_defaults({**SPEC, "runtime": {"device": "gpu", "gpuCount": 2, "allowCpuFallback": True,
                                              "tolerations": [{"key": "dedicated", "operator": "Exists"}]}})
    d = b.deployment(MD, spec, b.revision_hash(spec), 1)
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == spec["runtime"]["gpuImage"] and pod["initContainers"][0]["image"] == c["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    assert c["args"][c["args"].index("--device") + 1] == "gpu" and "--allow-cpu-fallback" in c["args"]


def test_golden_request_becomes_a_configmap_mounted_into_the_runtime() -> None:
    golden = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
              "outputs": [{"name": "y", "data": [2]}]}
    spec = with_defaults({**SPEC, "model": {**SPEC["model"], "golden": golden}})
    rev = b.revision_hash(spec)
    cm = b.golden_configmap(MD, spec, rev)
    assert cm is not None and cm["metadata"]["name"] == f"fraud-{rev}-golden"
    pod = b.deployment(MD, spec, rev, 1)["spec"]["template"]["spec"]
    assert {"name": "golden", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]
    assert "--golden" in pod["containers"][0]["args"]
    assert b.golden_configmap(MD, SPEC, rev) is None


def test_hpa_and_pdb_use_the_discovered_api_versions() -> None:
    spec = with_defaults({**SPEC, "autoscaling": {"maxReplicas": 5}})
    h = b.hpa(MD, spec, "abc", "autoscaling/v2beta2")
    assert h["apiVersion"] == "autoscaling/v2beta2" and h["spec"]["scaleTargetRef"]["name"] == "fraud-abc"
    assert h["spec"]["minReplicas"] == 1 and h["spec"]["maxReplicas"] == 5
    assert b.pdb(MD, "policy/v1beta1")["apiVersion"] == "policy/v1beta1"
