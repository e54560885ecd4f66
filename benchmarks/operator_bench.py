"""Operator benchmark on the local control plane: apply-to-Ready latency, and N ModelDeployments created
at once converging (time, operator memory, API write calls per object).

The mass test uses replicas: 0, so it measures the operator and the API server, not 200 model servers
starting on a 2-core machine; apply-to-Ready uses one real pod serving a real model.

Usage: .venv/bin/python benchmarks/operator_bench.py [--count 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    from kubernetes import client, config
    from modelops_local.cluster import shutdown, spawn
    from modelops_local.files import file_server
    from modelops_runtime import toymodels

    from tests.conftest import OperatorProcess

    work = Path(tempfile.mkdtemp(prefix="modelops-opbench-"))
    proc, st = spawn(work / "cluster")
    try:
        subprocess.run(["kubectl", "--kubeconfig", st["kubeconfig"], "apply", "-f", str(ROOT / "crds")],
                       check=True, capture_output=True)
        time.sleep(2)
        op = OperatorProcess(st["kubeconfig"], work / "operator.log", resync=10).start()
        api = client.CustomObjectsApi(config.new_client_from_config(st["kubeconfig"]))
        models = work / "models"
        models.mkdir()
        digest = toymodels.save(toymodels.mlp(), models / "m.onnx")

        def body(name: str, uri: str, replicas: int) -> dict:
            return {"apiVersion": "modelops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
                    "spec": {"model": {"name": "m", "version": "1", "uri": uri, "sha256": digest},
                             "replicas": replicas}}

        def phase(name: str) -> str | None:
            obj = api.get_namespaced_custom_object("modelops.dev", "v1alpha1", "default", "modeldeployments", name)
            return (obj.get("status") or {}).get("phase")

        with file_server(models) as port:
            uri = f"http://{st['host_ip']}:{port}/m.onnx"
            latencies = []
            for i in range(5):
                t0 = time.monotonic()
                api.create_namespaced_custom_object("modelops.dev", "v1alpha1", "default", "modeldeployments",
                                                    body(f"lat-{i}", uri, 1))
                while phase(f"lat-{i}") != "Ready":
                    time.sleep(0.05)
                latencies.append(time.monotonic() - t0)
                api.delete_namespaced_custom_object("modelops.dev", "v1alpha1", "default", "modeldeployments",
                                                    f"lat-{i}")
            print(f"apply-to-Ready (1 replica, real model server), 5 runs: median {statistics.median(latencies):.2f}s, "
                  f"min {min(latencies):.2f}s, max {max(latencies):.2f}s")
            time.sleep(3)
            writes0 = metric(op.metrics_port, "modelops_operator_api_writes")
            rec0 = metric(op.metrics_port, "modelops_operator_reconciles_total")
            rss0 = rss_mb(op.proc.pid)
            names = [f"bulk-{i:03d}" for i in range(args.count)]
            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: api.create_namespaced_custom_object(
                    "modelops.dev", "v1alpha1", "default", "modeldeployments", body(n, uri, 0)), names))
            created = time.monotonic() - t0
            pending = set(names)
            while pending:
                objs = api.list_namespaced_custom_object("modelops.dev", "v1alpha1", "default", "modeldeployments")
                ready = {o["metadata"]["name"] for o in objs["items"] if (o.get("status") or {}).get("phase") == "Ready"}
                pending -= ready
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"{len(pending)} not converged after 600 s")
                time.sleep(0.2)
            converge = time.monotonic() - t0
            writes = metric(op.metrics_port, "modelops_operator_api_writes") - writes0
            recs = metric(op.metrics_port, "modelops_operator_reconciles_total") - rec0
            time.sleep(25)  # two resyncs in steady state
            idle_writes = metric(op.metrics_port, "modelops_operator_api_writes") - writes0 - writes
            print(f"{args.count} ModelDeployments created at once (replicas 0; creation took {created:.1f}s): "
                  f"all Ready after {converge:.1f}s ({args.count / converge:.1f} objects/s)")
            print(f"operator API writes: {writes:.0f} ({writes / args.count:.1f} per object: Deployment, Service, "
                  f"status, events); reads per reconcile: 0 (watch cache); reconciles: {recs:.0f} "
                  f"({recs / args.count:.1f} per object)")
            print(f"operator memory: {rss0:.0f} MiB before, {rss_mb(op.proc.pid):.0f} MiB with {args.count} objects; "
                  f"writes during 25 s of steady state: {idle_writes:.0f}")
        op.stop()
    finally:
        shutdown(proc.pid, st)
        proc.wait()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
