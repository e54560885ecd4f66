"""Loading, integrity, providers, batching, back-pressure, deadlines and graceful drain of the runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from modelops_runtime import toymodels

from tests.helpers import RUNTIME, Http, RuntimeProcess, file_server, free_port, infer_body, metric, wait_until


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("m")
    return d / "mlp.onnx", toymodels.save(toymodels.mlp(), d / "mlp.onnx")


@pytest.fixture(scope="module")
def heavy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("h")
    toymodels.save(toymodels.heavy(width=1024, depth=6), d / "heavy.onnx")
    return d / "heavy.onnx"


def readiness(rt: RuntimeProcess) -> tuple[int, dict] | None:
    """The readiness answer of a server that may not be listening yet."""
    try:
        c = rt.client()
        r = c.json("GET", "/v2/health/ready")
        c.close()
        return r
    except OSError:
        return None


def test_integrity_mismatch_refuses_to_start(mlp_path: tuple[Path, str]) -> None:
    res = subprocess.run([RUNTIME, "--model", str(mlp_path[0]), "--name", "m", "--sha256", "0" * 64,
                          "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "integrity check failed" in res.stderr and mlp_path[1] in res.stderr
    assert "Traceback" not in res.stderr


def test_not_an_onnx_file_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    res = subprocess.run([RUNTIME, "--model", str(bad), "--name", "m", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "could not load" in res.stderr and "Traceback" not in res.stderr


def test_options_come_from_environment_variables(mlp_path: tuple[Path, str]) -> None:
    env = {"MODELOPS_MODEL": str(mlp_path[0]), "MODELOPS_NAME": "envmodel", "MODELOPS_VERSION": "7",
           "MODELOPS_SHA256": mlp_path[1]}
    port = free_port()
    proc = subprocess.Popen([RUNTIME, "--host", "127.0.0.1", "--port", str(port)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def meta() -> dict | None:
            c = Http("127.0.0.1", port, timeout=2)
            status, doc = c.json("GET", "/v2/models/envmodel")
            c.close()
            return doc if status == 200 else None

        assert wait_until("metadata", meta, timeout=60)["versions"] == ["7"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gpu_without_cuda_is_not_ready_unless_fallback_is_allowed(mlp_path: tuple[Path, str]) -> None:
    with RuntimeProcess(mlp_path[0], "g", "--device", "gpu").start(wait_ready=False) as rt:
        status, body = wait_until("an answer", lambda: readiness(rt), timeout=60)
        assert status == 503 and "CUDAExecutionProvider" in body["reason"]
    with RuntimeProcess(mlp_path[0], "g", "--device", "gpu", "--allow-cpu-fallback") as rt:
        c = rt.client()
        _, meta = c.json("GET", "/v2/models/g")
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        text = c.request("GET", "/metrics")[2].decode()
        assert metric(text, "modelops_model_info", provider="CPUExecutionProvider") == 1
        c.close()


def test_golden_request_gates_readiness(mlp_path: tuple[Path, str], tmp_path: Path) -> None:
    import onnxruntime as ort

    x = np.ones((1, 256), dtype=np.float32)
    y = ort.InferenceSession(str(mlp_path[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 256], "data": x.ravel().tolist()}],
            "outputs": [{"name": "y", "data": y.ravel().tolist()}], "tolerance": 1e-4}
    bad = {**good, "outputs": [{"name": "y", "data": (y + 1).ravel().tolist()}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with RuntimeProcess(mlp_path[0], "m", "--golden", str(tmp_path / "good.json")) as rt:
        assert rt.ready()
    with RuntimeProcess(mlp_path[0], "m", "--golden", str(tmp_path / "bad.json")).start(wait_ready=False) as rt:
        status, body = wait_until("an answer", lambda: readiness(rt), timeout=60)
        assert status == 503 and "golden request failed" in body["reason"]


def test_loads_over_http_and_quantizes_at_load(mlp_path: tuple[Path, str], tmp_path: Path) -> None:
    with file_server(mlp_path[0].parent, host="127.0.0.1") as port, RuntimeProcess(
            f"http://127.0.0.1:{port}/mlp.onnx", "m", "--sha256", mlp_path[1], "--quantize", "dynamic-int8",
            "--cache-dir", str(tmp_path)) as rt:
        c = rt.client()
        _, meta = c.json("GET", "/v2/models/m")
        assert meta["parameters"]["applied"] == ["dynamic-int8"]
        status, out = c.json("POST", "/v2/models/m/infer", infer_body("x", [[0.2] * 256]))
        assert status == 200 and len(out["outputs"][0]["data"]) == 10
        c.close()
    cached = list((tmp_path / "quantized").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].stat().st_size < mlp_path[0].stat().st_size / 3


def test_batched_answers_equal_unbatched(heavy_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((48, 256)).astype(np.float32)
    with RuntimeProcess(heavy_path, "h") as plain:
        c = plain.client()
        expected = [c.json("POST", "/v2/models/h/infer", infer_body("x", [r.tolist()]))[1]["outputs"][0]["data"]
                    for r in rows]
        c.close()
    with RuntimeProcess(heavy_path, "h", "--max-batch-size", "16", "--max-delay", "0.02") as batched:
        def one(i: int) -> list[float]:
            cl = batched.client()
            status, out = cl.json("POST", "/v2/models/h/infer", infer_body("x", [rows[i].tolist()]))
            cl.close()
            assert status == 200
            return out["outputs"][0]["data"]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, range(len(rows))))
        c = batched.client()
        text = c.request("GET", "/metrics")[2].decode()
        c.close()
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)
    batches = metric(text, "modelops_batch_size_count")
    assert metric(text, "modelops_batch_size_sum") == 48
    assert batches < 48, "requests were never merged"


def test_full_queue_answers_503_with_retry_after_and_deadline_504(heavy_path: Path) -> None:
    # Inference on its own thread (not inline on the loop), so that a queue can build up.
    with RuntimeProcess(heavy_path, "h", "--max-queue", "2", "--request-timeout", "5", "--inline-below-ms", "0") as rt:
        big = infer_body("x", [[0.1] * 256] * 256)
        codes: list[int] = []
        retry: list[str] = []
        lock = threading.Lock()

        def send(_: int) -> None:
            c = rt.client()
            status, headers, _ = c.request("POST", "/v2/models/h/infer", json.dumps(big).encode(),
                                           {"content-type": "application/json"})
            c.close()
            with lock:
                codes.append(status)
                if status == 503:
                    retry.append(headers.get("retry-after", ""))

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(send, range(12)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        assert all(r.isdigit() for r in retry)
        # A request whose own deadline passes while it waits gets 504, and the server still answers after.
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(lambda: rt.client().json("POST", "/v2/models/h/infer",
                                                         {**big, "parameters": {"timeout": 0.001}}))
                    for _ in range(3)]
            results = [f.result()[0] for f in futs]
        assert 504 in results
        assert rt.client().json("POST", "/v2/models/h/infer", infer_body("x", [[0.1] * 256]))[0] == 200


def test_sigterm_drains_in_flight_requests_without_failures(heavy_path: Path, tmp_path: Path) -> None:
    rt = RuntimeProcess(heavy_path, "h", "--drain-delay", "1", log_dir=tmp_path).start()
    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        # A client that, like a load balancer, stops sending once readiness turns false.
        c = rt.client()
        while not stop.is_set():
            try:
                status, _ = c.json("POST", "/v2/models/h/infer", infer_body("x", [[0.3] * 256] * 8))
                with lock:
                    results.append(status)
                s, _ = Http("127.0.0.1", rt.port, timeout=5).json("GET", "/v2/health/ready")
                if s != 200:
                    break
            except OSError as e:
                with lock:
                    errors.append(repr(e))
                break
        c.close()

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until("some traffic", lambda: len(results) >= 20)
    assert rt.proc is not None
    rt.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    stop.set()
    assert rt.proc.wait(timeout=30) == 0
    assert errors == [] and set(results) == {200}
    assert "Stopped serving" in rt.stderr()


def test_loads_from_s3_compatible_server(mlp_path: tuple[Path, str], tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    moto = subprocess.Popen([str(Path(RUNTIME).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        s3 = boto3.client("s3", endpoint_url=creds["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        wait_until("the S3 server", lambda: s3.list_buckets() is not None)
        s3.create_bucket(Bucket="models")
        s3.upload_file(str(mlp_path[0]), "models", "fraud/mlp.onnx")
        with RuntimeProcess("s3://models/fraud/mlp.onnx", "m", "--sha256", mlp_path[1], "--cache-dir", str(tmp_path),
                            env=creds) as rt:
            c = rt.client()
            assert c.json("POST", "/v2/models/m/infer", infer_body("x", [[0.0] * 256]))[0] == 200
            c.close()
        res = subprocess.run([RUNTIME, "--model", "s3://models/missing.onnx", "--name", "m", "--cache-dir",
                              str(tmp_path), "--port", str(free_port())], capture_output=True, text=True,
                             env={**os.environ, **creds}, timeout=60)
        assert res.returncode == 2 and "could not download s3://models/missing.onnx" in res.stderr
    finally:
        moto.terminate()
        moto.wait(timeout=30)


def test_load_time_quantization_works_from_a_read_only_model_directory(mlp_path: tuple[Path, str],
                                                                       tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "m.onnx").write_bytes(mlp_path[0].read_bytes())
    ro.chmod(0o555)
    try:
        with RuntimeProcess(ro / "m.onnx", "m", "--quantize", "dynamic-int8", "--cache-dir", str(tmp_path / "c"),
                            env={"HOME": str(tmp_path)}) as rt:
            c = rt.client()
            assert c.json("GET", "/v2/models/m")[1]["parameters"]["applied"] == ["dynamic-int8"]
            c.close()
        assert sorted(p.name for p in ro.iterdir()) == ["m.onnx"]
    finally:
        ro.chmod(0o755)
