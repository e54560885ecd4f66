"""Shared fixtures: the local control plane (session-scoped), model files and a host file server."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import file_server


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    """A real Kubernetes 1.20 control plane with the process node, for the whole session."""
    from modelops_local.cluster import shutdown, spawn
    from modelops_local.procs import LocalClusterError

    workdir = Path(tempfile.mkdtemp(prefix="modelops-e2e-"))
    try:
        proc, state = spawn(workdir)
    except LocalClusterError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"the local control plane did not start: {e}")
    state["dir"] = str(workdir)
    state["pid"] = proc.pid
    try:
        yield state
    finally:
        shutdown(proc.pid, state)
        proc.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def kube(cluster: dict[str, Any]) -> Any:
    from kubernetes import config

    return config.new_client_from_config(cluster["kubeconfig"])


@pytest.fixture()
def ns(kube: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (its objects go with it)."""
    import uuid

    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def services(cluster: dict[str, Any]) -> Any:
    """Returns a function NAMESPACE/SERVICE -> host URL through the local service proxy."""
    from modelops_local.cli import service_url

    def url(ref: str) -> str | None:
        try:
            known = json.loads((Path(cluster["dir"]) / "services.json").read_text())
        except (OSError, ValueError):
            return None
        return service_url(known, ref)

    return url


@pytest.fixture(scope="session")
def model_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="modelops-models-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def model_server(model_dir: Path) -> Iterator[int]:
    """An HTTP server on the host serving model_dir; pods reach it at http://<host ip>:<port>/."""
    with file_server(model_dir) as port:
        yield port


@pytest.fixture(scope="session")
def crd(cluster: dict[str, Any]) -> None:
    """The canonical CRD applied with kubectl, as a user would."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(["kubectl", "--kubeconfig", cluster["kubeconfig"], "apply", "-f", str(root / "crds")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["kubectl", "--kubeconfig", cluster["kubeconfig"], "wait", "--for=condition=established",
                          "crd/modeldeployments.modelops.dev", "--timeout=30s"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


class OperatorProcess:
    """`modelops-operator` as a real process with its own kubeconfig; stopped by PID."""

    def __init__(self, kubeconfig: str, log_path: Path, resync: float = 2.0) -> None:
        from tests.helpers import free_port

        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.resync = resync
        self.metrics_port = free_port()
        self.proc: Any = None

    def start(self) -> OperatorProcess:
        import os
        import subprocess
        import sys

        exe = str(Path(sys.executable).parent / "modelops-operator")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([exe, "--metrics-port", str(self.metrics_port), "--resync-seconds",
                                          str(self.resync)], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "KUBECONFIG": self.kubeconfig})
        from tests.helpers import wait_until

        wait_until("the operator's health endpoint", self.healthy, timeout=60)
        return self

    def healthy(self) -> bool:
        import urllib.request

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited: {self.log_path.read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        import urllib.request

        from tests.helpers import metric

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return metric(text, name)

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def operator(cluster: dict[str, Any], crd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster["kubeconfig"], tmp_path_factory.mktemp("operator") / "operator.log").start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="session")
def prometheus(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian package) discovering and scraping the local cluster's pods every second."""
    import shutil as sh
    import subprocess
    import threading
    import urllib.request

    import yaml

    from tests.helpers import free_port, wait_until

    binary = sh.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (make test installs the Debian package)")
    d = tmp_path_factory.mktemp("prometheus")
    # Debian's Prometheus is built without kubernetes_sd, so pods are discovered into a file_sd target
    # file: the same targets and labels (namespace, pod) the usual kubernetes-pods job produces.
    targets = d / "targets.json"
    targets.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kubernetes-pods",
                            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}],
    }
    stop = threading.Event()

    def discover() -> None:
        from kubernetes import client
        from kubernetes import config as kconfig

        core = client.CoreV1Api(kconfig.new_client_from_config(cluster["kubeconfig"]))
        while not stop.wait(1.0):
            try:
                pods = core.list_pod_for_all_namespaces().items
            except Exception:
                continue
            found = [{"targets": [f"{p.status.pod_ip}:{p.metadata.annotations['prometheus.io/port']}"],
                      "labels": {"namespace": p.metadata.namespace, "pod": p.metadata.name}}
                     for p in pods if p.status.pod_ip and (p.metadata.annotations or {}).get("prometheus.io/scrape")
                     == "true" and p.status.phase == "Running"]
            tmp = targets.with_suffix(".tmp")
            tmp.write_text(json.dumps(found))
            tmp.replace(targets)

    discovery = threading.Thread(target=discover, daemon=True)
    discovery.start()
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(d / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_until("Prometheus ready", lambda: urllib.request.urlopen(f"{address}/-/ready", timeout=2).status == 200,
                   timeout=60)
        yield address
    finally:
        stop.set()
        discovery.join(timeout=10)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pytest_unconfigure(config: pytest.Config) -> None:
    """tmp_path directories are removed (tmp_path_retention_policy); remove the emptied base too."""
    import contextlib

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = getattr(factory, "_basetemp", None)  # None when no test asked for a temp dir
    if base is None:
        return
    for d in (base, base.parent):
        with contextlib.suppress(OSError):
            d.rmdir()
