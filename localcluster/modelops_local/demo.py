"""`make demo`: modelops end to end on the local control plane.

Starts Kubernetes 1.20 (etcd, API server, controller manager, scheduler, process node), installs the
operator with its Helm chart (it runs as a pod under the chart's ServiceAccount), deploys a model,
sends steady traffic, scales, rolls out a good version and then a bad one, and shows the automatic
rollback as it happens. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .procs import LocalClusterError

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "modelops.dev", "v1alpha1", "modeldeployments"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, cluster: dict[str, Any]) -> None:
        from kubernetes import client, config

        self.cluster = cluster
        self.api = client.CustomObjectsApi(config.new_client_from_config(cluster["kubeconfig"]))
        self.t0 = time.monotonic()
        self.timeline: list[dict[str, Any]] = []
        self.marks: list[tuple[float, str]] = []

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run(["kubectl", "--kubeconfig", self.cluster["kubeconfig"], *args], input=stdin,
                             capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            raise LocalClusterError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
        return "\n".join(line for line in res.stdout.splitlines() if "version difference" not in line)

    def md(self) -> dict[str, Any]:
        return dict(self.api.get_namespaced_custom_object(GROUP, VERSION, "demo", PLURAL, "fraud"))

    def apply(self, doc: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", "demo", "-f", "-", stdin=yaml.safe_dump(doc))

    def follow(self, done: Any, timeout: float = 240) -> dict[str, Any]:
        """Prints a line whenever the phase, weight, step or verdict changes, until done(status)."""
        last = ""
        st: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = self.md()
            st = obj.get("status") or {}
            ro = st.get("rollout") or {}
            a = ro.get("analysis") or {}
            t = time.monotonic() - self.t0
            self.timeline.append({"t": t, "weight": st.get("canaryWeight", 0), "phase": st.get("phase")})
            parts = [f"{st.get('phase', '-'):11s}", f"stable v{(st.get('stable') or {}).get('modelVersion', '-')}",
                     f"ready {(st.get('replicas') or {}).get('summary', '-')}"]
            if st.get("canary"):
                parts.append(f"canary v{st['canary']['modelVersion']} weight {st.get('canaryWeight', 0)}% "
                             f"step {ro.get('step', 0) + 1}")
            if a.get("verdict"):
                parts.append(f"{a['verdict']}: " + "; ".join(m["message"] for m in a.get("measurements") or []))
            line = " | ".join(parts)
            if line != last:
                print(f"[{t:6.1f}s] {line}", flush=True)
                last = line
            if done(st):
                return obj
            time.sleep(0.5)
        raise LocalClusterError(f"timed out; last status: {json.dumps(st)[:600]}")

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic() - self.t0, label))


def model_spec(uri: str, digest: str, version: str, replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": "fraud"},
            "spec": {"model": {"name": "fraud", "version": version, "uri": uri, "sha256": digest},
                     "runtime": {"intraOpThreads": 1}, "replicas": replicas,
                     "monitoring": {"task": "classification"},
                     "rollout": {"strategy": "Canary",
                                 "steps": [{"setWeight": 25}, {"pause": {"durationSeconds": 6}}, {"setWeight": 50},
                                           {"pause": {"durationSeconds": 6}}],
                                 "analysis": {"intervalSeconds": 2, "failureLimit": 2, "minSamples": 10,
                                              "checks": {"errorRate": {"max": 0.01},
                                                         "latency": {"quantile": 0.99, "maxRatio": 3},
                                                         "predictionDrift": {"maxPSI": 0.25}}}}}}


def scenario(demo: Demo, uri: Any, digests: dict[str, str], services: Path) -> Any:
    from .traffic import Load

    say("Deploying model version 1 (kubectl apply)")
    demo.apply(model_spec(uri("v1"), digests["v1"], "1"))
    demo.follow(lambda st: st.get("phase") == "Ready")
    print(demo.kubectl("get", "modeldeployments", "-n", "demo"))

    def service_addr() -> str | None:
        try:
            return json.loads(services.read_text()).get("demo/fraud/http")
        except (OSError, ValueError):
            return None

    deadline = time.monotonic() + 30
    while not service_addr() and time.monotonic() < deadline:
        time.sleep(0.2)
    addr = service_addr()
    if not addr:
        raise LocalClusterError("the Service proxy never published demo/fraud")
    say(f"Serving: POST http://{addr}/v2/models/fraud/infer (steady traffic starts, 40 requests/s)")
    out = subprocess.run(["curl", "-s", "-H", "content-type: application/json", "-d",
                          json.dumps({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                                                  "data": [0.1] * 256}]}), f"http://{addr}/v2/models/fraud/infer"],
                         capture_output=True, text=True, timeout=30).stdout
    print(out[:300])
    load = Load(f"http://{addr}").__enter__()

    say("Scaling to 3 replicas (no new revision)")
    demo.apply(model_spec(uri("v1"), digests["v1"], "1", replicas=3))
    demo.follow(lambda st: (st.get("replicas") or {}).get("ready") == 3 and st.get("phase") == "Ready")

    say("Rolling out version 2 (a good model): canary steps 25% -> 50% -> 100%, judged on live metrics")
    demo.mark("v2 applied")
    demo.apply(model_spec(uri("v2"), digests["v2"], "2", replicas=3))
    demo.follow(lambda st: st.get("phase") == "Ready" and (st.get("stable") or {}).get("modelVersion") == "2")
    demo.mark("v2 promoted")

    say("Rolling out version 3 (a bad model: its predictions drift) - watch the automatic rollback")
    demo.mark("v3 applied")
    demo.apply(model_spec(uri("v3"), digests["v3"], "3", replicas=3))
    obj = demo.follow(lambda st: st.get("phase") == "RolledBack" and
                      "rollbackSeconds" in ((st.get("history") or [{}])[-1]))
    demo.mark("v3 rolled back")
    h = obj["status"]["history"][-1]
    print(f"\nRolled back version 3: {h['message']}")
    back = "within the same second" if h["rollbackSeconds"] < 1 else f"{h['rollbackSeconds']:.0f}s later"
    print(f"Time to detect: {h['detectSeconds']:.0f}s after the canary got traffic; back to 0% {back} "
          f"(status timestamps have 1 s resolution). Version {obj['status']['stable']['modelVersion']} "
          "kept serving throughout.")
    time.sleep(2)
    load.stop()
    print(f"Client requests: {sum(load.codes.values())}, by result: {dict(load.codes)}")
    say("Events")
    print(demo.kubectl("get", "events", "-n", "demo", "--field-selector", "involvedObject.kind=ModelDeployment",
                       "--sort-by=.lastTimestamp", "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message"))
    return load


def write_svg(demo: Demo, path: Path) -> None:
    """The canary weight over time, with the demo's milestones: the picture in the README."""
    if not demo.timeline:
        return
    t_end = demo.timeline[-1]["t"]
    t_start = min((t for t, _ in demo.marks), default=0) - 3
    w, h, pad = 860, 260, 50

    def x(t: float) -> float:
        return pad + (t - t_start) / max(t_end - t_start, 1) * (w - 2 * pad)

    def y(v: float) -> float:
        return h - pad - v / 100 * (h - 2 * pad)

    pts = " ".join(f"{x(p['t']):.1f},{y(p['weight']):.1f}" for p in demo.timeline if p["t"] >= t_start)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{pad}" y="20" font-size="14">Canary weight during the demo: v2 promoted, v3 rolled back '
             'automatically</text>']
    for v in (0, 25, 50, 100):
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(v)}" y2="{y(v)}" stroke="#ddd"/>'
                     f'<text x="{pad - 8}" y="{y(v) + 4}" text-anchor="end">{v}%</text>')
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2.5"/>')
    for t, label in demo.marks:
        color = "#d62728" if "rolled back" in label else "#2ca02c" if "promoted" in label else "#555"
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{pad - 10}" y2="{h - pad}" stroke="{color}" '
                     f'stroke-dasharray="4 3"/><text x="{x(t) + 3:.1f}" y="{pad}" fill="{color}">{label}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">seconds since the start of the demo '
                 f'(rollback: {demo.marks[-1][0] - demo.marks[-2][0]:.0f}s from apply to 0%)</text></svg>')
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelops_local.demo", description=__doc__)
    p.add_argument("--svg", type=Path, default=None, help="write the canary-weight timeline as an SVG chart")
    args = p.parse_args(argv)
    # SIGTERM cleans up like Ctrl-C does (the finally below), instead of leaving the cluster running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import helm_python as helm
    import modelops_runtime.toymodels as toymodels

    from .cluster import shutdown, spawn
    from .files import file_server

    workdir = Path(tempfile.mkdtemp(prefix="modelops-demo-"))
    models = workdir / "models"
    models.mkdir()
    digests = {
        "v1": toymodels.save(toymodels.mlp(seed=0), models / "v1.onnx"),
        "v2": toymodels.save(toymodels.mlp(seed=0, scale=1.0005), models / "v2.onnx"),
        "v3": toymodels.save(toymodels.mlp(seed=0, bias_shift=50.0), models / "v3.onnx"),
    }
    say("Starting a local Kubernetes 1.20 control plane with a process node")
    try:
        proc, cluster = spawn(workdir / "cluster")
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    cfg = None
    load = None
    try:
        print(f"kubeconfig: {cluster['kubeconfig']}  nodes: {', '.join(cluster['nodes'])}")
        demo = Demo(cluster)
        say("Installing the operator with Helm (it runs as a pod under the chart's ServiceAccount)")
        demo.kubectl("apply", "-f", str(ROOT / "crds"))
        demo.kubectl("create", "namespace", "demo")
        cfg = helm.Config(kubeconfig_path=cluster["kubeconfig"], namespace="modelops-system")
        cfg.install(str(ROOT / "charts" / "modelops"), "modelops", {"operator": {"resyncSeconds": 2}},
                    namespace="modelops-system", create_namespace=True, timeout=120)
        print(demo.kubectl("-n", "modelops-system", "rollout", "status", "deploy/modelops", "--timeout=180s"))
        with file_server(models) as port:
            def uri(name: str) -> str:
                return f"http://{cluster['host_ip']}:{port}/{name}.onnx"

            load = scenario(demo, uri, digests, workdir / "cluster" / "services.json")
        if args.svg:
            write_svg(demo, args.svg)
            print(f"Wrote {args.svg}")
        say("Done. Cleaning up: helm uninstall, then every process the demo started")
        return 0
    except (LocalClusterError, helm.HelmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if load is not None:
            load.stop()
        if cfg is not None:
            try:
                cfg.uninstall("modelops", ignore_not_found=True, timeout=60)
            except helm.HelmError as e:
                print(f"warning: helm uninstall: {e}", file=sys.stderr)
        shutdown(proc.pid, cluster)
        proc.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
