"""The `modelops` command: `modelops local up | down | status | url NAMESPACE/SERVICE[/PORT]`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .procs import LocalClusterError, alive

POINTER = Path(os.environ.get("MODELOPS_LOCAL_STATE", Path.home() / ".cache" / "modelops" / "local-cluster.json"))


def _pointer() -> dict[str, Any]:
    try:
        return dict(json.loads(POINTER.read_text()))
    except (OSError, ValueError):
        return {}


def _state(ptr: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(json.loads((Path(ptr["dir"]) / "state.json").read_text()))
    except (OSError, ValueError, KeyError):
        return {}


def _running() -> dict[str, Any] | None:
    ptr = _pointer()
    if ptr and alive(int(ptr.get("pid", 0) or 0)):
        return ptr
    return None


def cmd_up(_: argparse.Namespace) -> int:
    from .cluster import spawn

    ptr = _running()
    if ptr:
        print(f"The local cluster is already running (pid {ptr['pid']}).")
        print(f"export KUBECONFIG={_state(ptr).get('kubeconfig')}")
        return 0
    stale = _pointer()
    if stale:
        shutil.rmtree(stale.get("dir", ""), ignore_errors=True)
        POINTER.unlink(missing_ok=True)
        print("Removed the state of a local cluster that is no longer running.", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="modelops-local-"))
    try:
        proc, state = spawn(workdir, detach=True)
    except LocalClusterError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    POINTER.parent.mkdir(parents=True, exist_ok=True)
    POINTER.write_text(json.dumps({"pid": proc.pid, "dir": str(workdir)}))
    print(f"Started the local cluster (pid {proc.pid}, logs in {workdir}).")
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    from .cluster import shutdown

    ptr = _pointer()
    if not ptr:
        print("No local cluster is running.")
        return 0
    shutdown(int(ptr.get("pid", 0)), _state(ptr))
    shutil.rmtree(ptr.get("dir", ""), ignore_errors=True)
    POINTER.unlink(missing_ok=True)
    print("Stopped the local cluster.")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    ptr = _running()
    if not ptr:
        print("No local cluster is running. Start one with `modelops local up` (or `make cluster-up`).")
        return 1
    st = _state(ptr)
    print(f"pid: {ptr['pid']}")
    print(f"kubeconfig: {st.get('kubeconfig')}")
    print(f"server: {st.get('server')}")
    print(f"host: {st.get('host_ip')}")
    print(f"nodes: {', '.join(st.get('nodes') or [])}")
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    ptr = _running()
    if not ptr:
        print("error: no local cluster is running; start one with `modelops local up`", file=sys.stderr)
        return 1
    try:
        services = json.loads((Path(ptr["dir"]) / "services.json").read_text())
    except (OSError, ValueError):
        services = {}
    url = service_url(services, args.service)
    if url is None:
        print(f"error: no Service {args.service} is proxied (known: {', '.join(sorted(services)) or 'none'})",
              file=sys.stderr)
        return 1
    print(url)
    return 0


def service_url(services: dict[str, str], ref: str) -> str | None:
    """ref is NAMESPACE/SERVICE or NAMESPACE/SERVICE/PORT (a port name or number)."""
    parts = ref.strip("/").split("/")
    if len(parts) == 3:
        addr = services.get(ref.strip("/"))
    elif len(parts) == 2:
        matches = sorted(k for k in services if k.rsplit("/", 1)[0] == ref.strip("/"))
        addr = services[matches[0]] if matches else None
    else:
        return None
    return f"http://{addr}" if addr else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modelops", description="modelops: ML model lifecycle on Kubernetes")
    sub = p.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="a local Kubernetes control plane with a process node")
    lsub = local.add_subparsers(dest="action", required=True)
    lsub.add_parser("up", help="start it in the background (builds Kubernetes first if needed: make kubernetes)")
    lsub.add_parser("down", help="stop everything it started")
    lsub.add_parser("status", help="print the kubeconfig path, the host address pods reach, the nodes")
    url = lsub.add_parser("url", help="the host URL of a Service, as kube-proxy would reach it")
    url.add_argument("service", help="NAMESPACE/SERVICE[/PORT]")
    args = p.parse_args(argv)
    handler = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "url": cmd_url}[args.action]
    try:
        return handler(args)
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
