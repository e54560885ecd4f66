"""The io layer: the only module (with main) that talks to Kubernetes or to pods.

Reads come from a cache that kopf's watches keep current (no API read per reconcile); writes go
through one small REST helper, so every kind and API version (policy/v1beta1 on 1.20, policy/v1 on
1.21+) is handled the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import urllib.request
from collections import defaultdict
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import GROUP, KIND, LABEL_MD, PLURAL, VERSION
from .decisions import Apis, Apply, Delete, Event, Scale, applied_hash

log = logging.getLogger("modelops.operator")

PLURALS = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
           "HorizontalPodAutoscaler": "horizontalpodautoscalers", "PodDisruptionBudget": "poddisruptionbudgets",
           "Event": "events", "Pod": "pods", KIND: PLURAL}

Key = tuple[str, str]  # namespace, name


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def path_for(api_version: str, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    p = f"{base}/namespaces/{namespace}/{PLURALS[kind]}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


class Cache:
    """Latest known body of ModelDeployments and of their children, fed by watch events."""

    def __init__(self) -> None:
        self.mds: dict[Key, dict[str, Any]] = {}
        self.children: dict[str, dict[Key, dict[Key, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))

    def put(self, kind: str, event_type: str, body: dict[str, Any]) -> Key | None:
        """Records a watch event; returns the ModelDeployment it concerns."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if kind == KIND:
            if event_type == "DELETED":
                self.mds.pop(key, None)
                for per_kind in self.children.values():
                    per_kind.pop(key, None)
            else:
                self.mds[key] = body
            return key
        owner = (meta.get("labels") or {}).get(LABEL_MD)
        if not owner:
            return None
        md_key = (key[0], owner)
        if event_type == "DELETED":
            self.children[kind][md_key].pop(key, None)
        else:
            self.children[kind][md_key][key] = body
        return md_key

    def of(self, kind: str, md_key: Key) -> list[dict[str, Any]]:
        return list(self.children[kind].get(md_key, {}).values())


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client
        self.writes = 0

    @classmethod
    def connect(cls) -> Kube:
        try:
            config.load_incluster_config()
            return cls(client.ApiClient())
        except config.ConfigException:
            return cls(config.new_client_from_config())

    # -- REST ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        m, url, hdrs, data, post = self.api.param_serialize(method, path, header_params=headers, body=body,
                                                            auth_settings=["BearerToken"])
        resp = self.api.call_api(m, url, hdrs, data, post)
        raw = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(http_resp=resp)
        if method != "GET":
            self.writes += 1
        return json.loads(raw) if raw else {}

    def discover(self) -> Apis:
        def served(group_version: str) -> bool:
            try:
                self.request("GET", f"/apis/{group_version}")
                return True
            except ApiException:
                return False

        return Apis(hpa="autoscaling/v2" if served("autoscaling/v2") else "autoscaling/v2beta2",
                    pdb="policy/v1" if served("policy/v1") else "policy/v1beta1")

    # -- actions ---------------------------------------------------------------------------------
    def perform(self, md: dict[str, Any], action: Apply | Scale | Delete | Event) -> None:
        ns = md["metadata"]["namespace"]
        if isinstance(action, Apply):
            m = action.manifest
            kind, name = m["kind"], m["metadata"]["name"]
            if action.existing is None:
                try:
                    self.request("POST", path_for(m["apiVersion"], kind, ns), m)
                    self.event(md, "Normal", "Created", f"Created {kind} {name}")
                    log.info("Created %s %s/%s", kind, ns, name)
                    return
                except ApiException as e:
                    if e.status != 409:
                        raise
                    # Created by an earlier pass whose watch event has not arrived yet.
                    action.existing = self.request("GET", path_for(m["apiVersion"], kind, ns, name))
                    if applied_hash(action.existing) == applied_hash(m):
                        return
            body = json.loads(json.dumps(m))
            old = action.existing
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if kind == "Service":
                for f in ("clusterIP", "clusterIPs"):
                    if f in old.get("spec", {}):
                        body["spec"][f] = old["spec"][f]
            if kind == "Deployment" and "replicas" not in body["spec"]:
                body["spec"]["replicas"] = old.get("spec", {}).get("replicas")
            self.request("PUT", path_for(m["apiVersion"], kind, ns, name), body)
            self.event(md, "Normal", "Updated", f"Updated {kind} {name}")
            log.info("Updated %s %s/%s", kind, ns, name)
        elif isinstance(action, Scale):
            self.request("PATCH", path_for("apps/v1", "Deployment", ns, action.name),
                         {"spec": {"replicas": action.replicas}}, "application/merge-patch+json")
            self.event(md, "Normal", "Scaled", f"Scaled Deployment {action.name} to {action.replicas}")
            log.info("Scaled Deployment %s/%s to %d", ns, action.name, action.replicas)
        elif isinstance(action, Delete):
            try:
                self.request("DELETE", path_for(action.api_version, action.kind, ns, action.name),
                             {"propagationPolicy": "Background"})
            except ApiException as e:
                if e.status != 404:
                    raise
                return
            self.event(md, "Normal", "Deleted", f"Deleted {action.kind} {action.name}")
            log.info("Deleted %s %s/%s", action.kind, ns, action.name)
        else:
            self.event(md, action.type, action.reason, action.message)

    def event(self, md: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = md["metadata"]
        t = now()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1000], "count": 1,
            "firstTimestamp": t, "lastTimestamp": t, "source": {"component": "modelops-operator"},
            "reportingComponent": "modelops.dev/operator", "reportingInstance": "modelops-operator",
        }
        try:
            self.request("POST", path_for("v1", "Event", meta["namespace"]), body)
        except ApiException as e:  # an event is never worth failing a reconcile over
            log.warning("Could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)

    def write_status(self, md: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        meta = md["metadata"]
        return self.request("PATCH", path_for(f"{GROUP}/{VERSION}", KIND, meta["namespace"], meta["name"], "status"),
                            {"status": status}, "application/merge-patch+json")


def serving_details(pod: dict[str, Any], model: str, port: int) -> tuple[str, list[str]] | None:
    """Asks a ready runtime pod which ONNX Runtime provider it serves on and which load-time
    optimizations it applied."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/v2/models/{model}", timeout=2) as resp:
            params = json.load(resp)["parameters"]
            return str(params["execution_provider"]), [str(a) for a in params.get("applied") or []]
    except (OSError, ValueError, KeyError):
        return None


def scrape(pod: dict[str, Any], port: int) -> Any:
    """The runtime pod's /metrics, parsed; None when it does not answer (a measurement, not an error)."""
    from .analysis import parse_prometheus

    ip = (pod.get("status") or {}).get("podIP")
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=2) as resp:
            return parse_prometheus(resp.read().decode())
    except (OSError, ValueError):
        return None


async def to_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)
