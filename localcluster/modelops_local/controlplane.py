"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler on free loopback ports."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .procs import LocalClusterError, free_port, start, stop_pid, wait_for

log = logging.getLogger("modelops.local")

K8S_VERSION = "1.20.2"
CACHE = Path(os.environ.get("MODELOPS_CACHE", Path.home() / ".cache" / "modelops"))
BIN_DIR = CACHE / f"kubernetes-{K8S_VERSION}" / "bin"
SERVICE_CIDR = "10.96.0.0/16"


def binary(name: str) -> str:
    if name == "etcd":
        path = shutil.which("etcd")
        if not path:
            raise LocalClusterError("etcd is not installed; run `make kubernetes` (it installs etcd-server)")
        return path
    path_ = BIN_DIR / name
    if not (path_.is_file() and os.access(path_, os.X_OK) and path_.stat().st_size > 0):
        raise LocalClusterError(f"{path_} is missing; run `make kubernetes` to build Kubernetes {K8S_VERSION}")
    return str(path_)


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)
    except FileNotFoundError as e:
        raise LocalClusterError("openssl is not installed (apt-get install openssl)") from e
    except subprocess.CalledProcessError as e:
        raise LocalClusterError(f"openssl {args[0]} failed: {e.stderr.decode(errors='replace')}") from e


def make_pki(d: Path, extra_ips: tuple[str, ...] = ()) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=modelops-local-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=d)
    extra = "".join(f",IP:{ip}" for ip in extra_ips)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,"
                               f"DNS:kubernetes.default,DNS:kubernetes.default.svc{extra}\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, user: str = "admin") -> None:
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "modelops-local", "preferences": {},
        "clusters": [{"name": "modelops-local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "modelops-local", "context": {"cluster": "modelops-local", "user": user,
                                                            "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)


@dataclass
class ControlPlane:
    dir: Path
    api_port: int = 0
    etcd_port: int = 0
    token: str = ""
    pod_visible_ip: str = ""  # where pods reach the API server (the node's host address); in the cert
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        bins = {n: binary(n) for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")}
        pki = self.dir / "pki"
        logs = self.dir / "logs"
        make_pki(pki, (self.pod_visible_ip,) if self.pod_visible_ip else ())
        self.token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self.etcd_port = free_port()
        self.api_port = free_port()
        write_kubeconfig(self.kubeconfig, self.server, pki / "ca.crt", self.token)

        etcd = start([bins["etcd"], "--data-dir", str(self.dir / "etcd"), "--name", "modelops-local",
                      "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                      "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
                      "--listen-peer-urls", f"http://127.0.0.1:{free_port()}",
                      "--initial-advertise-peer-urls", "http://127.0.0.1:2380"], logs / "etcd.log")
        self.pids["etcd"] = etcd.pid
        wait_for("etcd", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{self.etcd_port}/health", timeout=1).status == 200, 30, logs / "etcd.log", etcd)

        api = start([bins["kube-apiserver"], f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                     "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
                     "--insecure-port=0", f"--tls-cert-file={pki / 'apiserver.crt'}",
                     f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
                     f"--token-auth-file={pki / 'tokens.csv'}", "--authorization-mode=Node,RBAC",
                     f"--service-account-key-file={pki / 'sa.key'}",
                     f"--service-account-signing-key-file={pki / 'sa.key'}",
                     "--service-account-issuer=https://kubernetes.default.svc",
                     f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
                     f"--cert-dir={pki}", "--event-ttl=1h"], logs / "kube-apiserver.log")
        self.pids["kube-apiserver"] = api.pid
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def readyz() -> bool:
            req = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"})
            return bool(urllib.request.urlopen(req, context=ctx, timeout=2).status == 200)

        wait_for("kube-apiserver", readyz, 60, logs / "kube-apiserver.log", api)

        cm = start([bins["kube-controller-manager"], f"--kubeconfig={self.kubeconfig}",
                    f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                    "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--port=0",
                    "--use-service-account-credentials=false", "--concurrent-deployment-syncs=10",
                    "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route"],
                   logs / "kube-controller-manager.log")
        self.pids["kube-controller-manager"] = cm.pid
        sched = start([bins["kube-scheduler"], f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                       "--bind-address=127.0.0.1", "--secure-port=0", "--port=0"], logs / "kube-scheduler.log")
        self.pids["kube-scheduler"] = sched.pid

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            pid = self.pids.pop(name, None)
            if pid:
                t = time.monotonic()
                # The API server waits for open watches on SIGTERM; a throwaway cluster need not.
                stop_pid(pid, grace=3 if name == "kube-apiserver" else 10)
                log.info("Stopped %s (pid %d) in %.1fs", name, pid, time.monotonic() - t)
