"""Pure builders: from a (defaulted, valid) spec and a revision to the manifests of the children.

Deterministic: the same inputs give byte-identical manifests, so a hash of each is stored on the
child (annotation modelops.dev/applied-hash) and a steady-state reconcile writes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from . import ANNOTATION_HASH, GROUP, KIND, LABEL_MD, LABEL_REVISION, VERSION

MODEL_DIR = "/models"
MODEL_PATH = f"{MODEL_DIR}/model.onnx"
GOLDEN_DIR = "/etc/modelops"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUNTIME_UID = 10001


def _hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def revision_hash(spec: dict[str, Any]) -> str:
    """What defines a revision: the model, the runtime and monitoring, not replicas or rollout settings."""
    return _hash({"model": spec.get("model"), "runtime": spec.get("runtime"), "monitoring": spec.get("monitoring")})


def deployment_name(md_name: str, revision: str) -> str:
    return f"{md_name}-{revision}"


def owner_reference(md: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": md["metadata"]["name"],
            "uid": md["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _meta(md: dict[str, Any], name: str, revision: str | None = None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "modelops-runtime", "app.kubernetes.io/instance": md["metadata"]["name"],
              "app.kubernetes.io/managed-by": "modelops", LABEL_MD: md["metadata"]["name"]}
    if revision:
        labels[LABEL_REVISION] = revision
    return {"name": name, "namespace": md["metadata"]["namespace"], "labels": labels,
            "ownerReferences": [owner_reference(md)]}


def stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds the hash of the manifest (without replicas, which change on their own) as an annotation."""
    body = copy.deepcopy(manifest)
    body.get("spec", {}).pop("replicas", None)
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_HASH] = _hash(body, 16)
    return manifest


def runtime_args(spec: dict[str, Any]) -> list[str]:
    model, rt, mon = spec["model"], spec["runtime"], spec.get("monitoring") or {}
    b = rt["batching"]
    args = ["--model", MODEL_PATH, "--name", model["name"], "--version", model["version"], "--sha256",
            model["sha256"], "--host", "0.0.0.0", "--port", str(rt["port"]),
            "--intra-op-threads", str(rt["intraOpThreads"]), "--inter-op-threads", str(rt["interOpThreads"]),
            "--graph-optimization-level", model["optimization"]["graphOptimizationLevel"],
            "--device", rt["device"], "--max-batch-size", str(b["maxBatchSize"]),
            f"--max-delay={b['maxDelaySeconds']}", "--max-queue", str(b["maxQueue"]),
            f"--request-timeout={b['timeoutSeconds']}", "--cache-dir", "/tmp/modelops",
            "--task", mon.get("task", "auto"), f"--log-sample-rate={mon.get('logSampleRate', 1)}",
            f"--payload-log-sample-rate={mon.get('payloadLogSampleRate', 0)}",
            "--feedback-cache-size", str(mon.get("feedbackCacheSize", 100000))]
    if model["optimization"]["quantize"] != "none":
        args += ["--quantize", model["optimization"]["quantize"]]
    if rt["allowCpuFallback"]:
        args.append("--allow-cpu-fallback")
    if rt.get("executionProviders"):
        args += ["--execution-providers", ",".join(rt["executionProviders"])]
    if mon.get("features"):
        args += ["--monitor-features", ",".join(mon["features"])]
    if mon.get("predictionBuckets"):
        args.append("--prediction-buckets=" + ",".join(str(x) for x in mon["predictionBuckets"]))
    if model.get("golden"):
        args += ["--golden", f"{GOLDEN_DIR}/golden.json"]
    return args


def golden_configmap(md: dict[str, Any], spec: dict[str, Any], revision: str) -> dict[str, Any] | None:
    golden = spec["model"].get("golden")
    if not golden:
        return None
    return stamp({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _meta(md, f"{deployment_name(md['metadata']['name'], revision)}-golden", revision),
                  "data": {"golden.json": json.dumps(golden, sort_keys=True)}})


def pod_template(md: dict[str, Any], spec: dict[str, Any], revision: str) -> dict[str, Any]:
    model, rt = spec["model"], spec["runtime"]
    gpu = rt["device"] == "gpu"
    image = rt["gpuImage"] if gpu else rt["image"]
    restricted = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                  "runAsUser": RUNTIME_UID, "capabilities": {"drop": ["ALL"]}}
    resources = copy.deepcopy(rt.get("resources") or {})
    if gpu:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(rt["gpuCount"])
    fetch: dict[str, Any] = {
        "name": "fetch-model", "image": image, "command": ["modelops-fetch"],
        "args": ["--uri", model["uri"], "--sha256", model["sha256"], "--dest", MODEL_PATH],
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": restricted,
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
    }
    if model.get("storageSecretRef"):
        # Storage credentials reach the fetch step only, never the serving container.
        fetch["envFrom"] = [{"secretRef": {"name": model["storageSecretRef"]["name"]}}]
    port = rt["port"]
    mounts = [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "model", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if model.get("golden"):
        mounts.append({"name": "golden", "mountPath": GOLDEN_DIR, "readOnly": True})
        volumes.append({"name": "golden", "configMap": {
            "name": f"{deployment_name(md['metadata']['name'], revision)}-golden"}})
    container: dict[str, Any] = {
        "name": "runtime", "image": image, "args": runtime_args(spec),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": copy.deepcopy(rt.get("env") or []),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": restricted,
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 1,
                         "failureThreshold": 300, "timeoutSeconds": 2},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 2,
                           "failureThreshold": 2, "timeoutSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3, "timeoutSeconds": 2},
        # Endpoints drop the pod while it still serves: the server gets SIGTERM after this.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "2"]}}},
    }
    tolerations = copy.deepcopy(rt.get("tolerations") or [])
    if gpu and GPU_TOLERATION not in tolerations:
        tolerations.append(GPU_TOLERATION)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID,
                            "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [fetch],
        "containers": [container],
        "volumes": volumes,
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if rt.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(rt["nodeSelector"])
    if rt.get("affinity"):
        pod_spec["affinity"] = copy.deepcopy(rt["affinity"])
    meta = _meta(md, "", revision)
    return {"metadata": {"labels": meta["labels"], "annotations": {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}},
        "spec": pod_spec}


def deployment(md: dict[str, Any], spec: dict[str, Any], revision: str, replicas: int | None) -> dict[str, Any]:
    """One Deployment per revision; replicas None leaves them to an HPA."""
    name = deployment_name(md["metadata"]["name"], revision)
    selector = {LABEL_MD: md["metadata"]["name"], LABEL_REVISION: revision}
    body: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(md, name, revision),
        "spec": {"selector": {"matchLabels": selector}, "revisionHistoryLimit": 2, "progressDeadlineSeconds": 600,
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
                 "template": pod_template(md, spec, revision)},
    }
    stamp(body)
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    return body


def service(md: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return stamp({"apiVersion": "v1", "kind": "Service", "metadata": _meta(md, md["metadata"]["name"]),
                  "spec": {"type": "ClusterIP", "selector": {LABEL_MD: md["metadata"]["name"]},
                           "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})


def hpa(md: dict[str, Any], spec: dict[str, Any], revision: str, api_version: str) -> dict[str, Any]:
    auto = spec["autoscaling"]
    return stamp({
        "apiVersion": api_version, "kind": "HorizontalPodAutoscaler", "metadata": _meta(md, md["metadata"]["name"]),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": deployment_name(md["metadata"]["name"], revision)},
                 "minReplicas": auto["minReplicas"], "maxReplicas": auto["maxReplicas"],
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                     "type": "Utilization", "averageUtilization": auto["targetCPUUtilizationPercentage"]}}}]}})


def pdb(md: dict[str, Any], api_version: str) -> dict[str, Any]:
    return stamp({"apiVersion": api_version, "kind": "PodDisruptionBudget", "metadata": _meta(md, md["metadata"]["name"]),
                  "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {LABEL_MD: md["metadata"]["name"]}}}})


def service_url(md: dict[str, Any], spec: dict[str, Any]) -> str:
    m = md["metadata"]
    return f"http://{m['name']}.{m['namespace']}.svc.cluster.local/v2/models/{spec['model']['name']}"
