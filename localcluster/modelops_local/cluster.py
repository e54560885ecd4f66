"""The whole local cluster in one process: control plane children, process node, service proxy.

`python -m modelops_local.cluster --dir D` runs it in the foreground until SIGTERM/SIGINT, then
stops everything it started by PID. `modelops local up` and the e2e fixture start it that way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .procs import LocalClusterError, alive, stop_pid

log = logging.getLogger("modelops.local")


class LocalCluster:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.state_file = workdir / "state.json"

    def run(self, watch_parent: bool = False) -> int:
        from kubernetes import config

        from .controlplane import ControlPlane
        from .network import PodNetwork
        from .node import Kube, ProcessNode
        from .proxy import ServiceProxy

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        net = PodNetwork()
        cp = ControlPlane(self.dir, pod_visible_ip=net.host_ip)
        node: ProcessNode | None = None
        proxy: ServiceProxy | None = None
        try:
            cp.start()
            self._write(pid=os.getpid(), ready=False, pids=cp.pids, kubeconfig=str(cp.kubeconfig))
            net.setup()
            api = config.new_client_from_config(str(cp.kubeconfig))
            kube = Kube(api)
            node = ProcessNode(kube, self.dir, net, api_port=cp.api_port)
            node.start()
            proxy = ServiceProxy(kube, self.dir / "services.json")
            proxy.start()
            # In-cluster clients (the operator as a pod) reach the API server at the node's host address,
            # as they would reach the kubernetes Service's ClusterIP.
            proxy.forward(net.host_ip, cp.api_port, "127.0.0.1", cp.api_port)
            self._write(pid=os.getpid(), ready=True, pids=cp.pids, kubeconfig=str(cp.kubeconfig),
                        server=cp.server, host_ip=net.host_ip, nodes=[n.name for n in node.nodes],
                        pod_subnet=str(net.subnet))
            log.info("Started local cluster: KUBECONFIG=%s", cp.kubeconfig)
            parent = os.getppid()
            while not stop.wait(1.0):
                if watch_parent and os.getppid() != parent:
                    log.info("The process that started the cluster is gone")
                    break
            return 0
        except LocalClusterError as e:
            self._write(pid=os.getpid(), ready=False, error=str(e))
            log.error("%s", e)
            return 1
        finally:
            log.info("Stopping local cluster")
            if node is not None:
                node.stop()
            if proxy is not None:
                proxy.stop()
            cp.stop()
            net.teardown()
            log.info("Stopped local cluster")

    def _write(self, **state: Any) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def read(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}


def spawn(workdir: Path, timeout: float = 90, detach: bool = False) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Starts the cluster process in its own session and waits until it is ready. Unless `detach`
    (`modelops local up`), the cluster stops by itself when the calling process dies."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "cluster.log"
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        args = [sys.executable, "-m", "modelops_local.cluster", "--dir", str(workdir)]
        proc = subprocess.Popen(args + ([] if detach else ["--watch-parent"]),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        out.close()
    lc = LocalCluster(workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = lc.read()
        if state.get("ready"):
            return proc, state
        if state.get("error") or proc.poll() is not None:
            stop_pid(proc.pid, grace=30)
            raise LocalClusterError(state.get("error") or f"the local cluster exited; see {log_path}")
        time.sleep(0.1)
    stop_pid(proc.pid, grace=30)
    raise LocalClusterError(f"the local cluster was not ready after {timeout:.0f}s; see {log_path}")


def shutdown(pid: int, state: dict[str, Any], grace: float = 60) -> None:
    """Stops the cluster process; then anything it recorded that is somehow still alive."""
    stop_pid(pid, grace=grace, group=False)
    for child in (state.get("pids") or {}).values():
        if alive(int(child)):
            stop_pid(int(child), grace=5)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m modelops_local.cluster")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--watch-parent", action="store_true", help="stop when the starting process dies")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return LocalCluster(args.dir).run(watch_parent=args.watch_parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
