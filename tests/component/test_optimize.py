"""`modelops optimize` on real models made in the test: every technique, the gate, the report, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modelops_runtime import toymodels
from onnx import numpy_helper

MODELOPS = str(Path(sys.executable).parent / "modelops")


def optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELOPS, "optimize", *args, "--runs", "40"], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("opt") / "mlp.onnx"
    toymodels.save(toymodels.mlp(), path)
    return path


def loads_and_runs(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ones((2, 256), dtype=np.float32)})[0]


def test_dynamic_int8_is_3x_smaller_and_reported(mlp: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    res = optimize(str(mlp), "-o", str(out), "--quantize", "int8", "--max-drop", "0.2", "--allow-slower",
                   "--report", str(report))
    assert res.returncode == 0, res.stderr
    assert loads_and_runs(out).shape == (2, 10)
    r = json.loads(report.read_text())
    assert r["original"]["bytes"] / r["optimized"]["bytes"] >= 3
    assert r["optimized"]["bytes"] == out.stat().st_size
    assert 0.8 <= r["comparison"]["top1_agreement"] <= 1.0
    for key in ("p50_ms_b1", "p99_ms_b1", "p50_ms_b32", "p99_ms_b32"):
        assert 0 < r["original"][key] < 1000 and r["original"]["p99_ms_b1"] >= r["original"]["p50_ms_b1"]
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert r["sha256"] == digest and f"sha256: {digest}" in res.stdout
    assert "file size" in res.stdout and "top-1 agreement" in res.stdout


def test_static_int8_with_a_calibration_set(mlp: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32))
    out = tmp_path / "qs.onnx"
    res = optimize(str(mlp), "-o", str(out), "--quantize", "int8-static", "--calibration", str(calib),
                   "--max-drop", "0.3", "--allow-slower")
    assert res.returncode == 0, res.stderr
    assert loads_and_runs(out).shape == (2, 10)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_graph_optimization_and_simplification_keep_outputs(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.onnx"
    res = optimize(str(mlp), "-o", str(out), "--graph-level", "extended", "--simplify", "--max-drop", "0.0",
                   "--allow-slower")
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(loads_and_runs(out), loads_and_runs(mlp), rtol=1e-4, atol=1e-5)


def test_unstructured_pruning_zeroes_the_share_asked(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    res = optimize(str(mlp), "-o", str(out), "--prune", "0.5", "--max-drop", "1", "--allow-slower")
    assert res.returncode == 0, res.stderr
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer if i.name.startswith("w")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert 0.49 <= zeros <= 0.51
    loads_and_runs(out)


def test_structured_pruning_really_shrinks_the_model(mlp: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.onnx"
    res = optimize(str(mlp), "-o", str(out), "--prune-structured", "0.25", "--max-drop", "1", "--allow-slower")
    assert res.returncode == 0, res.stderr
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert shapes["w0"] == (256, 384) and shapes["w1"] == (384, 384) and shapes["w3"] == (384, 10)
    assert out.stat().st_size < mlp.stat().st_size * 0.7
    assert loads_and_runs(out).shape == (2, 10)


def test_gate_refuses_a_bad_result_and_writes_nothing(mlp: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "bad.onnx", tmp_path / "bad.json"
    res = optimize(str(mlp), "-o", str(out), "--prune-structured", "0.9", "--max-drop", "0.01", "--report",
                   str(report))
    assert res.returncode == 1
    assert "Refused, nothing written" in res.stderr and "exceeds --max-drop" in res.stderr
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    r = json.loads(report.read_text())
    assert r["written"] is False and r["refused"]


def test_labels_give_accuracy(mlp: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((100, 256)).astype(np.float32)
    labels = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(1)
    val = tmp_path / "val.npz"
    np.savez(val, x=x, labels=labels)
    report = tmp_path / "r.json"
    res = optimize(str(mlp), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8", "--validation", str(val),
                   "--max-drop", "0.2", "--allow-slower", "--report", str(report))
    assert res.returncode == 0, res.stderr
    r = json.loads(report.read_text())
    assert r["original"]["accuracy"] == 1.0 and 0.8 <= r["optimized"]["accuracy"] <= 1.0 and r["rows"] == 100


@pytest.mark.parametrize(("setup", "needle"), [
    ("not-onnx", "is not a valid ONNX model"),
    ("missing-input", "no array 'x'"),
    ("bad-shape", "has shape [10, 3]"),
    ("label-count", "5 labels for 10 input rows"),
    ("nothing", "nothing to do"),
    ("ratio", "between 0 and 1"),
    ("no-file", "no such file"),
])
def test_bad_input_gives_a_clear_error_and_exit_2(mlp: Path, tmp_path: Path, setup: str, needle: str) -> None:
    model, extra = str(mlp), ["--quantize", "int8"]
    val = tmp_path / "v.npz"
    if setup == "not-onnx":
        (tmp_path / "x.onnx").write_text("hello")
        model = str(tmp_path / "x.onnx")
    elif setup == "missing-input":
        np.savez(val, y=np.zeros((10, 256), np.float32))
        extra += ["--validation", str(val)]
    elif setup == "bad-shape":
        np.savez(val, x=np.zeros((10, 3), np.float32))
        extra += ["--validation", str(val)]
    elif setup == "label-count":
        np.savez(val, x=np.zeros((10, 256), np.float32), labels=np.zeros(5))
        extra += ["--validation", str(val)]
    elif setup == "nothing":
        extra = []
    elif setup == "ratio":
        extra = ["--prune", "1.5"]
    elif setup == "no-file":
        model = str(tmp_path / "absent.onnx")
    out = tmp_path / "out.onnx"
    res = optimize(model, "-o", str(out), *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
