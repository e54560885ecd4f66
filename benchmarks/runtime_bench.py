"""Benchmark of modelops-runtime against onnxruntime called in-process on the same model, same run.

The server runs pinned to CPU 0 with one ONNX Runtime thread; wrk (one thread) runs pinned to CPU 1.
Server CPU per request is the server process's user+system time over the run divided by the requests
answered. Figures are printed as ratios to the in-process baseline measured first.

Usage: benchmarks/runtime_bench.sh [--seconds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from modelops_runtime import toymodels

TICK = os.sysconf("SC_CLK_TCK")
RUNTIME = str(Path(sys.executable).parent / "modelops-runtime")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def in_process(path: Path, rows: int, seconds: float, with_json: bool) -> tuple[float, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32", "data": x.ravel().tolist()}]})
    for _ in range(50):
        s.run(None, {"x": x})
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if with_json:
            doc = orjson.loads(body)
            inp = doc["inputs"][0]
            feed = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
            (y,) = s.run(None, {"x": feed})
            orjson.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel()}]},
                         option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            s.run(None, {"x": x})
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, cpu / n * 1000


def batch32_ms(path: Path) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)
    for _ in range(3):
        s.run(None, {"x": x})
    t0 = time.perf_counter()
    for _ in range(20):
        s.run(None, {"x": x})
    return (time.perf_counter() - t0) / 20 * 1000


def start_server(path: Path, port: int, batching: bool) -> subprocess.Popen[bytes]:
    args = ["taskset", "-c", "0", RUNTIME, "--model", str(path), "--name", "m", "--host", "127.0.0.1",
            "--port", str(port), "--intra-op-threads", "1", "--inter-op-threads", "1"]
    if batching:
        args += ["--max-batch-size", "32", "--max-delay", "0.002"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the runtime did not become ready")


def lua_script(d: Path, binary: bool, rows: int) -> Path:
    x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float32)
    if binary:
        head = json.dumps({"inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        body, headers = head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                             "Content-Type": "application/octet-stream"}
    else:
        body = json.dumps({"inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        headers = {"Content-Type": "application/json"}
    (d / "body.bin").write_bytes(body)
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = d / f"post-{'bin' if binary else 'json'}.lua"
    script.write_text(f'wrk.method = "POST"\nlocal f = io.open("{d / "body.bin"}", "rb")\n'
                      f"wrk.body = f:read(\"*a\")\nf:close()\n{hdrs}\n")
    return script


def to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def run_wrk(port: int, script: Path, conns: int, seconds: float, pid: int) -> dict[str, float]:
    c0 = cpu_seconds(pid)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{max(int(seconds), 1)}s", "--latency", "-s",
                          str(script), f"http://127.0.0.1:{port}/v2/models/m/infer"],
                         capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - c0
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {"rps": reqs / seconds, "cpu_ms": cpu / max(reqs, 1) * 1000, "p50": to_ms(lat.get("50", "")),
            "p99": to_ms(lat.get("99", "")), "non2xx": int(bad.group(1)) if bad else 0,
            "sock_errors": 1 if errors else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="only the MLP, JSON, concurrency 1 and 16")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="modelops-bench-"))
    try:
        run(args, d)
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def run(args: argparse.Namespace, d: Path) -> None:
    models = {"mlp": d / "mlp.onnx", "heavy": d / "heavy.onnx"}
    toymodels.save(toymodels.mlp(), models["mlp"])
    toymodels.save(toymodels.heavy(width=2048, depth=4), models["heavy"])

    print("# Baseline: onnxruntime in-process, 1 thread, batch 1")
    base: dict[str, tuple[float, float]] = {}
    for name, path in models.items():
        rps, cpu = in_process(path, 1, args.seconds, with_json=False)
        rps_j, cpu_j = in_process(path, 1, args.seconds, with_json=True)
        base[name] = (rps, cpu)
        print(f"{name:6s} in-process: {rps:9.0f} req/s {cpu:7.3f} ms CPU/req | + V2 JSON codec: {rps_j:9.0f} req/s "
              f"{cpu_j:7.3f} ms CPU/req")
    print()
    print(f"{'model':6s} {'enc':4s} {'batch':5s} {'conc':>4s} {'req/s':>9s} {'x base':>7s} {'CPU ms/req':>10s} "
          f"{'overhead ms':>11s} {'p50 ms':>8s} {'p99 ms':>8s} {'non-2xx':>7s}")
    results: dict[tuple[str, str, bool, int], dict[str, float]] = {}
    plan = [("mlp", "json")] if args.quick else [("mlp", "json"), ("mlp", "bin"), ("heavy", "json"), ("heavy", "bin")]
    for name, enc in plan:
        for batching in (False, True):
            port = 20000 + len(results)
            proc = start_server(models[name], port, batching)
            try:
                script = lua_script(d, enc == "bin", 1)
                conc_list = (1, 16) if args.quick else ((1, 16, 32, 64) if name == "heavy" else (1, 16, 64))
                for conc in conc_list:
                    r = run_wrk(port, script, conc, args.seconds, proc.pid)
                    results[(name, enc, batching, conc)] = r
                    b_rps, b_cpu = base[name]
                    print(f"{name:6s} {enc:4s} {'on' if batching else 'off':5s} {conc:4d} {r['rps']:9.0f} "
                          f"{r['rps'] / b_rps:7.3f} {r['cpu_ms']:10.3f} {r['cpu_ms'] - b_cpu:11.3f} {r['p50']:8.2f} "
                          f"{r['p99']:8.2f} {r['non2xx']:7d}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print()
    mlp1 = results.get(("mlp", "json", False, 1))
    if mlp1:
        verdict = "PASS" if mlp1["cpu_ms"] <= 0.2 else "FAIL"
        print(f"target: MLP batch 1 JSON, server CPU/request <= 0.200 ms: {mlp1['cpu_ms']:.3f} ms ({verdict}); "
              f"{mlp1['cpu_ms'] / base['mlp'][1]:.1f}x onnxruntime in-process")
    on, off = results.get(("heavy", "json", True, 32)), results.get(("heavy", "json", False, 32))
    if on and off:
        ratio = on["rps"] / off["rps"]
        single_ms = base["heavy"][1]
        batch_ms = batch32_ms(models["heavy"])
        bound = 2.0 + 2 * batch_ms  # maxDelay + twice the compute time of a full 32-row batch
        print(f"target: heavy model (single row {single_ms:.2f} ms), concurrency 32, batching on/off rows/s: "
              f"{ratio:.2f}x ({'PASS' if ratio >= 2.5 else 'FAIL'} >= 2.5x); p99 {on['p99']:.1f} ms "
              f"({'PASS' if on['p99'] <= bound else 'FAIL'} <= maxDelay 2 ms + 2 x {batch_ms:.1f} ms batch = "
              f"{bound:.1f} ms)")


if __name__ == "__main__":
    main()
