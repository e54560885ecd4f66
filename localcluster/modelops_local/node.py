"""The process node: a small stand-in for the kubelet that runs bound Pods as local processes.

It registers Nodes and keeps them Ready, and for every Pod bound to one of them: gives it a network
namespace and an IP, turns its volumes into per-pod directories bind-mounted where the containers
expect them (each container gets a private mount namespace), runs init containers then containers
as processes of programs named by an image map, runs startup/readiness/liveness probes, restarts per
restartPolicy, and on deletion runs preStop, SIGTERM, waits the grace period, SIGKILLs and removes
the Pod. Container output goes to <workdir>/pods/<namespace>_<pod>/<container>.log.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from .network import PodNetwork
from .procs import stop_pid

log = logging.getLogger("modelops.local.node")

# Per-container staging directories for bind mounts; empty on the host (the mounts are private).
STAGE_ROOT = Path("/run/modelops-node")
RUNTIME_IMAGES = ("ghcr.io/modelops/runtime", "ghcr.io/modelops/runtime-gpu", "modelops/runtime", "modelops/runtime-gpu")
OPERATOR_IMAGES = ("ghcr.io/modelops/operator", "modelops/operator")


def default_image_map() -> dict[str, list[str]]:
    """Image repository (no tag or digest) -> the local program that stands for its entrypoint."""
    bindir = Path(sys.executable).parent
    m: dict[str, list[str]] = {}
    for image in RUNTIME_IMAGES:
        m[image] = [str(bindir / "modelops-runtime")]
    for image in OPERATOR_IMAGES:
        m[image] = [str(bindir / "modelops-operator")]
    return m


def image_repo(image: str) -> str:
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image = image[: len(image) - len(last)] + last.split(":", 1)[0]
    return image


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class NodeSpec:
    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "110"
    gpus: int = 0

    def manifest(self, host_ip: str) -> dict[str, Any]:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "modelops.dev/process-node": "true"}
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods}
        if self.gpus:
            labels["nvidia.com/gpu.present"] = "true"
            capacity["nvidia.com/gpu"] = str(self.gpus)
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": labels},
                "spec": {"taints": self.taints()}, "_capacity": capacity, "_host_ip": host_ip}

    def taints(self) -> list[dict[str, str]]:
        return [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}] if self.gpus else []


class Kube:
    """The few API calls the node makes, with merge patches spelled out."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)

    def merge_patch(self, path: str, body: dict[str, Any]) -> None:
        method, url, headers, data, post = self.api_client.param_serialize(
            "PATCH", path, header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        resp = self.api_client.call_api(method, url, headers, data, post)
        resp.read()
        if not 200 <= resp.status < 300:
            raise ApiException(http_resp=resp)


class ContainerProc:
    def __init__(self, spec: dict[str, Any], init: bool) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.ready = False
        self.started = False
        self.started_at = 0.0
        self.probe_next: dict[str, float] = {}
        self.probe_ok: dict[str, int] = {}
        self.probe_fail: dict[str, int] = {}
        self.backoff_until = 0.0

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {"name": self.name, "image": self.spec.get("image", ""),
                              "imageID": "", "ready": self.ready, "restartCount": self.restarts,
                              "state": self.state}
        if not self.init:
            st["started"] = self.started
        if self.proc is not None:
            st["containerID"] = f"process://{self.proc.pid}"
        if self.last_state:
            st["lastState"] = self.last_state
        return st


class PodRunner(threading.Thread):
    def __init__(self, node: ProcessNode, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = node.workdir / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.inits = [ContainerProc(c, True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerProc(c, False) for c in spec.get("containers") or []]
        self.netns = ""
        self.ip = ""
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.initialized = not self.inits
        self.stop_event = threading.Event()
        self.grace = float(spec.get("terminationGracePeriodSeconds", 30))
        self.start_time = now()
        self._last_status: dict[str, Any] | None = None
        self._transitions: dict[str, tuple[str, str]] = {}
        self.mount_points: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def terminate(self, grace: float | None) -> None:
        if grace is not None:
            self.grace = grace
        self.stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("Failed pod %s/%s", self.ns, self.pod_name)
        finally:
            self._cleanup()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.volumes = self._prepare_volumes()
        except (ApiException, OSError, ValueError) as e:
            self._fail_setup("CreateContainerConfigError", str(e))
            return
        problem = self._unmapped_image()
        if problem:
            self._fail_setup("ErrImagePull", problem)
            return
        self.netns, self.ip = self.node.network.add_pod(f"{self.ns}/{self.pod_name}")
        self._report()
        while not self.stop_event.is_set():
            if not self.initialized:
                self._step_init()
            elif self.phase in ("Pending", "Running"):
                self._step_containers()
            self._report()
            self.stop_event.wait(0.2)
        self._shutdown()

    def _fail_setup(self, reason: str, message: str) -> None:
        for c in self.inits + self.containers:
            c.state = {"waiting": {"reason": reason, "message": message}}
        log.warning("Could not start pod %s/%s: %s", self.ns, self.pod_name, message)
        self._report()
        self.stop_event.wait()
        self._delete_pod()

    def _unmapped_image(self) -> str:
        for c in self.inits + self.containers:
            image = c.spec.get("image", "")
            if image_repo(image) not in self.node.image_map:
                return (f"image {image} is not in the process node's image map "
                        f"(known: {', '.join(sorted(self.node.image_map))})")
        return ""

    # -- volumes ---------------------------------------------------------------------------------
    def _prepare_volumes(self) -> dict[str, Path]:
        vols: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes") or []:
            path = self.dir / "volumes" / v["name"]
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            if "secret" in v:
                sec = self.node.kube.core.read_namespaced_secret(v["secret"]["secretName"], self.ns)
                self._write_items(path, {k: base64.b64decode(x) for k, x in (sec.data or {}).items()},
                                  v["secret"].get("items"))
            elif "configMap" in v:
                cm = self.node.kube.core.read_namespaced_config_map(v["configMap"]["name"], self.ns)
                self._write_items(path, {k: x.encode() for k, x in (cm.data or {}).items()}, v["configMap"].get("items"))
            elif "projected" in v:
                for src in v["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        continue  # not issued by this node
                    if "secret" in src:
                        sec = self.node.kube.core.read_namespaced_secret(src["secret"]["name"], self.ns)
                        self._write_items(path, {k: base64.b64decode(x) for k, x in (sec.data or {}).items()},
                                          src["secret"].get("items"))
            elif "hostPath" in v:
                vols[v["name"]] = Path(v["hostPath"]["path"])
                continue
            vols[v["name"]] = path
        return vols

    @staticmethod
    def _write_items(path: Path, data: dict[str, bytes], items: list[dict[str, str]] | None) -> None:
        mapping = {i["key"]: i["path"] for i in items} if items else {k: k for k in data}
        for key, rel in mapping.items():
            if key in data:
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[key])

    # -- containers ------------------------------------------------------------------------------
    def _env(self, c: ContainerProc) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.dir), "LANG": "C.UTF-8",
               "HOSTNAME": self.pod_name, "PYTHONUNBUFFERED": "1"}
        if self.node.api_port:
            # What the kubelet injects for the kubernetes Service, pointed where pods can reach it.
            env.update({"KUBERNETES_SERVICE_HOST": self.node.network.host_ip,
                        "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
                        "KUBERNETES_SERVICE_PORT_HTTPS": str(self.node.api_port)})
        for src in c.spec.get("envFrom") or []:
            env.update(self._env_from(src))
        for e in c.spec.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "valueFrom" in e:
                val = self._value_from(e["valueFrom"])
                if val is not None:
                    env[e["name"]] = val
        return env

    def _env_from(self, src: dict[str, Any]) -> dict[str, str]:
        prefix = src.get("prefix", "")
        try:
            if "secretRef" in src:
                sec = self.node.kube.core.read_namespaced_secret(src["secretRef"]["name"], self.ns)
                return {prefix + k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}
            if "configMapRef" in src:
                cm = self.node.kube.core.read_namespaced_config_map(src["configMapRef"]["name"], self.ns)
                return {prefix + k: v for k, v in (cm.data or {}).items()}
        except ApiException as e:
            log.warning("Could not read envFrom source of pod %s/%s: %s", self.ns, self.pod_name, e.reason)
        return {}

    def _value_from(self, vf: dict[str, Any]) -> str | None:
        if "fieldRef" in vf:
            path = vf["fieldRef"]["fieldPath"]
            return {"metadata.name": self.pod_name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                    "status.podIP": self.ip, "spec.nodeName": self.pod["spec"].get("nodeName", ""),
                    "status.hostIP": self.node.network.host_ip}.get(path, "")
        if "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            try:
                sec = self.node.kube.core.read_namespaced_secret(ref["name"], self.ns)
                return base64.b64decode((sec.data or {})[ref["key"]]).decode()
            except (ApiException, KeyError):
                return None
        if "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            try:
                return (self.node.kube.core.read_namespaced_config_map(ref["name"], self.ns).data or {})[ref["key"]]
            except (ApiException, KeyError):
                return None
        return None

    def _mount_script(self, c: ContainerProc) -> str:
        """Shell steps run in the container's private mount namespace before its program.

        Every source is first bind-mounted into a per-container staging directory, then from there to
        its target: a target that covers the place sources live (an emptyDir at /tmp while the node's
        pod directories, or this very checkout, are under /tmp) then hides nothing that is still
        needed. The programs the image map names (the Python environment, and the checkout of an
        editable install) are re-exposed at their own paths if a target covered them.
        """
        q = shlex.quote
        stage = self.node.stage_dir(f"{self.uid[:8]}-{c.name}")
        lines = []
        mounts = []
        for i, m in enumerate(c.spec.get("volumeMounts") or []):
            src = self.volumes.get(m["name"])
            if src is None:
                continue
            src = src / m["subPath"] if m.get("subPath") else src
            staged = stage / f"v{i}"
            if src.is_dir():
                staged.mkdir(exist_ok=True)
            else:
                staged.touch()
            lines.append(f"mount --bind {q(str(src))} {q(str(staged))}")
            mounts.append((staged, Path(m["mountPath"]), m, src.is_dir()))
        needed = [p for p in self.node.program_paths if any(p.is_relative_to(t) for _, t, _, _ in mounts)]
        for j, p in enumerate(needed):
            (stage / f"p{j}").mkdir(exist_ok=True)
            lines.append(f"mount --bind {q(str(p))} {q(str(stage / f'p{j}'))}")
        for staged, target, m, is_dir in mounts:
            self.node.ensure_mount_point(target, is_dir)
            lines.append(f"mount --bind {q(str(staged))} {q(str(target))}")
            if m.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {q(str(target))}")
        for j, p in enumerate(needed):
            lines.append(f"mkdir -p {q(str(p))} && mount --bind {q(str(stage / f'p{j}'))} {q(str(p))}")
        lines.append('exec "$@"')
        return " && ".join(lines)

    def _start(self, c: ContainerProc) -> None:
        entry = self.node.image_map[image_repo(c.spec.get("image", ""))]
        cmd = list(c.spec.get("command") or entry) + list(c.spec.get("args") or [])
        log_path = self.dir / f"{c.name}.log"
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", self._mount_script(c), "sh", *cmd]
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            c.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=self._env(c), cwd=c.spec.get("workingDir") or str(self.dir),
                                      start_new_session=True)
        except OSError as e:
            c.state = {"waiting": {"reason": "CreateContainerError", "message": str(e)}}
            c.proc = None
            return
        finally:
            out.close()
        c.started_at = time.monotonic()
        c.state = {"running": {"startedAt": now()}}
        c.ready = False
        c.started = "startupProbe" not in c.spec
        c.probe_next, c.probe_ok, c.probe_fail = {}, {}, {}
        log.info("Started container %s of pod %s/%s (pid %d)", c.name, self.ns, self.pod_name, c.proc.pid)

    def _exited(self, c: ContainerProc) -> int | None:
        if c.proc is None:
            return None
        code = c.proc.poll()
        if code is None:
            return None
        code = code if code >= 0 else 128 - code
        c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                  "finishedAt": now()}}
        c.ready = False
        c.proc = None
        return code

    def _restart_later(self, c: ContainerProc) -> None:
        c.last_state = c.state
        delay = min(10.0 * 2 ** max(c.restarts - 1, 0), 300.0) if c.restarts else 1.0
        c.backoff_until = time.monotonic() + delay
        c.restarts += 1
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:.0f}s restarting failed container {c.name}"}}

    def _step_init(self) -> None:
        for c in self.inits:
            if "terminated" in c.state and c.state["terminated"]["exitCode"] == 0:
                continue
            if c.proc is None:
                if time.monotonic() < c.backoff_until:
                    return
                if "terminated" in c.state:  # failed before
                    if self.restart_policy == "Never":
                        self.phase, self.reason = "Failed", "InitContainerFailed"
                        return
                    self._restart_later(c)
                    return
                self._start(c)
                return
            code = self._exited(c)
            if code is None:
                return
            if code != 0:
                return
        self.initialized = True

    def _step_containers(self) -> None:
        all_done = True
        any_failed = False
        for c in self.containers:
            if c.proc is None and "terminated" not in c.state:
                if time.monotonic() >= c.backoff_until:
                    self._start(c)
                all_done = False
                continue
            code = self._exited(c)
            if code is None and c.proc is not None:
                all_done = False
                self._probe(c)
                continue
            term = c.state.get("terminated")
            if term is None:
                all_done = False
                continue
            failed = term["exitCode"] != 0
            any_failed |= failed
            if self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and failed):
                self._restart_later(c)
                all_done = False
        if self.containers and all_done:
            self.phase = "Failed" if any_failed else "Succeeded"
        elif any(c.proc is not None for c in self.containers):
            self.phase = "Running"

    # -- probes ----------------------------------------------------------------------------------
    def _probe(self, c: ContainerProc) -> None:
        t = time.monotonic()
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.spec.get(kind)
            if kind == "startupProbe" and (probe is None or c.started):
                continue
            if kind != "startupProbe" and not c.started:
                continue
            if probe is None:
                if kind == "readinessProbe":
                    c.ready = True
                continue
            due = c.probe_next.get(kind, c.started_at + float(probe.get("initialDelaySeconds", 0)))
            if t < due:
                continue
            c.probe_next[kind] = t + float(probe.get("periodSeconds", 10))
            ok = self._run_probe(c, probe)
            if ok:
                c.probe_ok[kind] = c.probe_ok.get(kind, 0) + 1
                c.probe_fail[kind] = 0
            else:
                c.probe_fail[kind] = c.probe_fail.get(kind, 0) + 1
                c.probe_ok[kind] = 0
            threshold_ok = int(probe.get("successThreshold", 1))
            threshold_fail = int(probe.get("failureThreshold", 3))
            if kind == "startupProbe":
                if ok:
                    c.started = True
                elif c.probe_fail[kind] >= threshold_fail:
                    self._kill_for_restart(c, "startup probe failed")
            elif kind == "livenessProbe":
                if c.probe_fail[kind] >= threshold_fail:
                    self._kill_for_restart(c, "liveness probe failed")
            else:
                if c.probe_ok[kind] >= threshold_ok:
                    c.ready = True
                elif c.probe_fail[kind] >= threshold_fail:
                    c.ready = False

    def _kill_for_restart(self, c: ContainerProc, why: str) -> None:
        log.info("Killed container %s of pod %s/%s: %s", c.name, self.ns, self.pod_name, why)
        if c.proc is not None:
            stop_pid(c.proc.pid, grace=self.grace)
            c.proc.wait()
        self._exited(c)

    def _run_probe(self, c: ContainerProc, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                h = probe["httpGet"]
                port = self._port(c, h["port"])
                req = urllib.request.Request(f"http://{self.ip}:{port}{h.get('path', '/')}")
                for hdr in h.get("httpHeaders") or []:
                    req.add_header(hdr["name"], hdr["value"])
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                with socket.create_connection((self.ip, self._port(c, probe["tcpSocket"]["port"])), timeout=timeout):
                    return True
            if "exec" in probe:
                return self._exec(c, probe["exec"]["command"], timeout) == 0
        except (OSError, ValueError):
            return False
        return False

    @staticmethod
    def _port(c: ContainerProc, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"container {c.name} has no port named {port}")

    def _exec(self, c: ContainerProc, command: list[str], timeout: float) -> int:
        if c.proc is None:
            return 1
        env = self._env(c)
        try:
            res = subprocess.run(["nsenter", "--target", str(c.proc.pid), "--mount", "--net", "--", *command],
                                 env=env, capture_output=True, timeout=timeout, cwd=str(self.dir))
        except subprocess.TimeoutExpired:
            return 1
        return res.returncode

    # -- status ----------------------------------------------------------------------------------
    def _report(self) -> None:
        ready = bool(self.containers) and all(c.ready for c in self.containers) and self.phase == "Running"
        t = now()

        def cond(kind: str, ok: bool) -> dict[str, str]:
            return {"type": kind, "status": "True" if ok else "False"}

        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.node.network.host_ip,
            "startTime": self.start_time,
            "conditions": [cond("Initialized", self.initialized), cond("Ready", ready),
                           cond("ContainersReady", ready), cond("PodScheduled", True)],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.reason:
            status["reason"] = self.reason
        if status == self._last_status:
            return
        body = {**status, "conditions": []}
        for c in status["conditions"]:
            old = self._transitions.get(c["type"])
            when = old[1] if old and old[0] == c["status"] else t
            body["conditions"].append({**c, "lastTransitionTime": when})
        try:
            self.node.kube.merge_patch(f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status",
                                       {"status": body})
        except ApiException as e:
            if e.status == 404:
                self.stop_event.set()
            else:
                log.warning("Could not update status of pod %s/%s: %s", self.ns, self.pod_name, e.reason)
            return
        self._last_status = status
        self._transitions = {c["type"]: (c["status"], c["lastTransitionTime"]) for c in body["conditions"]}

    # -- termination -----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.grace
        running = [c for c in self.inits + self.containers if c.proc is not None]
        for c in running:
            hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
            if "exec" in hook:
                self._exec(c, hook["exec"]["command"], max(deadline - time.monotonic(), 0.1))
            elif "httpGet" in hook:
                with contextlib.suppress(OSError, ValueError):
                    h = hook["httpGet"]
                    urllib.request.urlopen(f"http://{self.ip}:{self._port(c, h['port'])}{h.get('path', '/')}",
                                           timeout=max(deadline - time.monotonic(), 0.1)).close()
        for c in running:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        for c in running:
            if c.proc is not None:
                try:
                    c.proc.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait()
                log.info("Stopped container %s of pod %s/%s", c.name, self.ns, self.pod_name)
        self._delete_pod()

    def _delete_pod(self) -> None:
        if self.node.stopping:
            return  # the node goes away, the Pod object stays for the API server's owners
        with contextlib.suppress(ApiException):
            self.node.kube.core.delete_namespaced_pod(
                self.pod_name, self.ns, grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)))

    def _cleanup(self) -> None:
        for c in self.inits + self.containers:
            if c.proc is not None and c.proc.poll() is None:
                stop_pid(c.proc.pid, grace=1)
        if self.netns:
            self.node.network.remove_pod(self.netns, self.ip)
        self.node.forget(self.uid)


@dataclass
class ProcessNode:
    kube: Kube
    workdir: Path
    network: PodNetwork
    nodes: list[NodeSpec] = field(default_factory=lambda: [NodeSpec("local-cpu"), NodeSpec("local-gpu", gpus=4)])
    image_map: dict[str, list[str]] = field(default_factory=default_image_map)
    heartbeat: float = 10.0
    api_port: int = 0  # the API server's port, reachable from pods at the network's host address

    def __post_init__(self) -> None:
        self.runners: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._created_mount_points: list[Path] = []
        self.names = {n.name for n in self.nodes}

    # -- nodes -----------------------------------------------------------------------------------
    def register(self) -> None:
        for n in self.nodes:
            m = n.manifest(self.network.host_ip)
            capacity = m.pop("_capacity")
            m.pop("_host_ip")
            try:
                self.kube.core.create_node(m)
            except ApiException as e:
                if e.status != 409:
                    raise
            # The API server adds node.kubernetes.io/not-ready at creation; with no node lifecycle
            # controller nothing else removes it.
            self.kube.merge_patch(f"/api/v1/nodes/{n.name}", {"spec": {"taints": n.taints() or None}})
            self.kube.merge_patch(f"/api/v1/nodes/{n.name}/status", {"status": {
                "capacity": capacity, "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": self.network.host_ip},
                              {"type": "Hostname", "address": n.name}],
                "nodeInfo": {"kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                             "architecture": "amd64", "containerRuntimeVersion": "process://modelops-local",
                             "osImage": "modelops process node", "kernelVersion": os.uname().release,
                             "machineID": "", "systemUUID": "", "bootID": ""},
            }})
            self._beat(n.name)

    def _beat(self, name: str) -> None:
        t = now()
        conds = [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "process node is ready",
                  "lastHeartbeatTime": t, "lastTransitionTime": t}]
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
            conds.append({"type": kind, "status": "False", "reason": f"KubeletHasNo{kind}", "message": "",
                          "lastHeartbeatTime": t, "lastTransitionTime": t})
        self.kube.merge_patch(f"/api/v1/nodes/{name}/status", {"status": {"conditions": conds}})
        lease = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                          "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            self.kube.coord.create_namespaced_lease("kube-node-lease", lease)
        except ApiException as e:
            if e.status != 409:
                raise
            self.kube.merge_patch(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                                  {"spec": lease["spec"]})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            for n in self.nodes:
                try:
                    self._beat(n.name)
                except Exception as e:  # the API server may be going away during shutdown
                    log.warning("Could not renew node %s: %s", n.name, e)

    # -- pods ------------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    lst = self.kube.core.list_pod_for_all_namespaces(_preload_content=False)
                    import json

                    doc = json.loads(lst.data)
                    rv = doc["metadata"]["resourceVersion"]
                    for pod in doc["items"]:
                        self._on_pod(pod)
                w = watch.Watch()
                for ev in w.stream(self.kube.core.list_pod_for_all_namespaces, resource_version=rv,
                                   timeout_seconds=30, _preload_content=False, allow_watch_bookmarks=True):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = ev["raw_object"]
                    if ev["type"] == "ERROR":
                        rv = ""
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._on_pod(obj)
                    elif ev["type"] == "DELETED":
                        r = self.runners.get(obj["metadata"]["uid"])
                        if r:
                            r.terminate(0)
            except ApiException as e:
                if e.status == 410:
                    rv = ""
                elif not self._stop.is_set():
                    log.warning("Pod watch failed: %s", e.reason)
                    self._stop.wait(1)
            except Exception as e:
                if not self._stop.is_set():
                    log.warning("Pod watch failed: %s", e)
                    self._stop.wait(1)

    def _on_pod(self, pod: dict[str, Any]) -> None:
        if pod["spec"].get("nodeName") not in self.names:
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.get(uid)
            if runner is None:
                if pod["metadata"].get("deletionTimestamp") or self.stopping:
                    if pod["metadata"].get("deletionTimestamp") and not self.stopping:
                        with contextlib.suppress(ApiException):
                            self.kube.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                                 grace_period_seconds=0)
                    return
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                runner = PodRunner(self, pod)
                self.runners[uid] = runner
                runner.start()
                return
        if pod["metadata"].get("deletionTimestamp"):
            runner.terminate(float(pod["metadata"].get("deletionGracePeriodSeconds") or runner.grace))

    def forget(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)

    @property
    def program_paths(self) -> list[Path]:
        """Host paths the mapped programs run from: the Python environment and, for an editable install,
        the checkout holding the packages."""
        import modelops_local

        paths = [Path(sys.prefix).resolve(), Path(modelops_local.__file__).resolve().parents[2]]
        return sorted(set(paths))

    def stage_dir(self, name: str) -> Path:
        d = STAGE_ROOT / self.network.id / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def ensure_mount_point(self, target: Path, directory: bool) -> None:
        with self.lock:
            if target.exists():
                return
            missing = []
            p = target
            while not p.exists():
                missing.append(p)
                p = p.parent
            if directory:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            self._created_mount_points.extend(missing)

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> None:
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        self.register()
        for target in (self._heartbeat_loop, self._watch_loop):
            t = threading.Thread(target=target, daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops every pod's processes (preStop, SIGTERM, grace, SIGKILL), then the node's threads."""
        self.stopping = True
        self._stop.set()
        with self.lock:
            runners = list(self.runners.values())
        for r in runners:
            r.terminate(min(r.grace, 5.0))
        for r in runners:
            r.join(timeout=15)
        for t in self._threads:
            t.join(timeout=0.5)  # daemon threads; a watch may sit in its 30 s timeout
        for p in sorted(self._created_mount_points, key=lambda x: len(x.parts), reverse=True):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                elif p.is_file() and p.stat().st_size == 0:
                    p.unlink()
        # Only empty directories are removed: the staging mounts lived in private mount namespaces.
        stage = STAGE_ROOT / self.network.id
        for d in sorted(stage.glob("**/*"), key=lambda x: len(x.parts), reverse=True):
            with contextlib.suppress(OSError):
                if d.is_dir():
                    d.rmdir()
                elif d.stat().st_size == 0:
                    d.unlink()
        for d in (stage, STAGE_ROOT):
            with contextlib.suppress(OSError):
                d.rmdir()
