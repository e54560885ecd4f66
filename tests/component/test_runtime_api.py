"""The runtime's V2 endpoints and every rejection, against a real process serving real ONNX models."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from modelops_runtime import toymodels

from tests.helpers import Http, RuntimeProcess, infer_body, metric


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, data in {"mlp": toymodels.mlp(), "multi": toymodels.multi_io(),
                       "reg": toymodels.linear_regressor()}.items():
        out[name] = (d / f"{name}.onnx", toymodels.save(data, d / f"{name}.onnx"))
    return out


@pytest.fixture(scope="module")
def mlp(models: dict[str, tuple[Path, str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    path, digest = models["mlp"]
    with RuntimeProcess(path, "mlp", "--version", "3", "--sha256", digest, "--max-body-bytes", "200000",
                        log_dir=tmp_path_factory.mktemp("logs")) as rt:
        yield rt


@pytest.fixture(scope="module")
def multi(models: dict[str, tuple[Path, str]]) -> Iterator[RuntimeProcess]:
    with RuntimeProcess(models["multi"][0], "multi") as rt:
        yield rt


@pytest.fixture()
def c(mlp: RuntimeProcess) -> Iterator[Http]:
    client = mlp.client()
    yield client
    client.close()


def reference(models: dict[str, tuple[Path, str]], name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(str(models[name][0]), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def test_health_and_metadata(c: Http, models: dict[str, tuple[Path, str]]) -> None:
    assert c.json("GET", "/v2/health/live") == (200, {"live": True})
    assert c.json("GET", "/v2/health/ready") == (200, {"ready": True})
    status, server = c.json("GET", "/v2")
    assert status == 200 and server["name"] == "modelops-runtime" and "binary_tensor_data" in server["extensions"]
    status, meta = c.json("GET", "/v2/models/mlp")
    assert status == 200
    assert meta["name"] == "mlp" and meta["versions"] == ["3"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 256]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["sha256"] == models["mlp"][1]
    assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert c.json("GET", "/v2/models/mlp/versions/3")[0] == 200
    assert c.json("GET", "/v2/models/mlp/ready") == (200, {"ready": True})
    assert c.json("GET", "/v2/models/mlp/versions/3/ready")[0] == 200


def test_infer_json_matches_onnxruntime(c: Http, models: dict[str, tuple[Path, str]]) -> None:
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    status, out = c.json("POST", "/v2/models/mlp/infer",
                         {"id": "req-1", "inputs": [{"name": "x", "shape": [3, 256], "datatype": "FP32",
                                                     "data": x.tolist()}]})
    assert status == 200
    assert out["id"] == "req-1" and out["model_name"] == "mlp" and out["model_version"] == "3"
    (y,) = out["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(y["data"]).reshape(3, 10), reference(models, "mlp", {"x": x})[0], rtol=1e-5,
                               atol=1e-6)
    # The versioned path answers too, and a missing id is generated.
    status, out2 = c.json("POST", "/v2/models/mlp/versions/3/infer", infer_body("x", x[:1].tolist()))
    _, out3 = c.json("POST", "/v2/models/mlp/infer", infer_body("x", x[:1].tolist()))
    assert status == 200 and out2["id"] and out3["id"] and out2["id"] != out3["id"]


def test_infer_binary_tensors_both_ways(c: Http, models: dict[str, tuple[Path, str]]) -> None:
    x = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = c.request("POST", "/v2/models/mlp/infer", header + x.tobytes(), {
        "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert status == 200, body
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    y = np.frombuffer(body[n:], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(y, reference(models, "mlp", {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_multiple_inputs_datatypes_and_output_selection(multi: RuntimeProcess) -> None:
    c = multi.client()
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]},
                       {"name": "k", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 4, 5, 6]}],
            "outputs": [{"name": "n"}]}
    status, out = c.json("POST", "/v2/models/multi/infer", body)
    assert status == 200
    assert [o["name"] for o in out["outputs"]] == ["n"]
    assert out["outputs"][0] == {"name": "n", "datatype": "INT64", "shape": [2, 3], "data": [2, 3, 4, 5, 6, 7]}
    status, out = c.json("POST", "/v2/models/multi/infer", {**body, "outputs": None})
    assert status == 200 and [o["name"] for o in out["outputs"]] == ["a", "n"]
    assert out["outputs"][0]["data"] == [2, 4, 6, 8, 10, 12]
    c.close()


@pytest.mark.parametrize(("doc", "needle"), [
    ({"inputs": [{"name": "z", "shape": [1, 256], "datatype": "FP32", "data": [0] * 256}]}, "unknown input 'z'"),
    ({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP64", "data": [0] * 256}]}, "datatype FP64"),
    ({"inputs": [{"name": "x", "shape": [256], "datatype": "FP32", "data": [0] * 256}]}, "rank 1"),
    ({"inputs": [{"name": "x", "shape": [1, 255], "datatype": "FP32", "data": [0] * 255}]}, "dimension 1 is 255"),
    ({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0] * 200}]}, "200 elements"),
    ({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": ["a"] * 256}]}, "does not convert"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0] * 256}],
      "outputs": [{"name": "nope"}]}, "unknown output 'nope'"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_requests_get_400_with_a_message(c: Http, doc: object, needle: str) -> None:
    status, out = c.json("POST", "/v2/models/mlp/infer", doc)
    assert status == 400
    assert needle in out["error"]


def test_transport_level_rejections(c: Http) -> None:
    status, _, body = c.request("POST", "/v2/models/mlp/infer", b"{not json", {"content-type": "application/json"})
    assert status == 400 and b"malformed JSON" in body
    status, _, body = c.request("POST", "/v2/models/mlp/infer", b"a=1",
                                {"content-type": "application/x-www-form-urlencoded"})
    assert status == 415
    status, _, body = c.request("GET", "/v2/models/mlp/infer")
    assert status == 405
    status, _, body = c.request("GET", "/v2/models/other")
    assert status == 404 and b"not served here" in body
    status, _, body = c.request("GET", "/v2/models/mlp/versions/9")
    assert status == 404 and b"no version '9'" in body
    header = b'{"inputs":[{"name":"x","shape":[1,256],"datatype":"FP32","parameters":{"binary_data_size":1024}}]}'
    status, _, body = c.request("POST", "/v2/models/mlp/infer", header + b"\0" * 100,
                                {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"runs past" in body


def test_body_limits_count_decompressed_bytes(mlp: RuntimeProcess) -> None:
    # Too large as sent: 413 before the body is read, and the connection closes.
    c = mlp.client()
    status, _, body = c.request("POST", "/v2/models/mlp/infer", b"x" * 300_000, {"content-type": "application/json"})
    assert status == 413 and b"exceeds the limit" in body
    c.close()
    # Small on the wire, too large decompressed.
    bomb = gzip.compress(b" " * 1_000_000)
    c = mlp.client()
    status, _, body = c.request("POST", "/v2/models/mlp/infer", bomb,
                                {"content-type": "application/json", "content-encoding": "gzip"})
    assert status == 413 and b"decompressed" in body
    # A gzip body within the limit works.
    doc = json.dumps(infer_body("x", [[0.1] * 256])).encode()
    status, _, body = c.request("POST", "/v2/models/mlp/infer", gzip.compress(doc),
                                {"content-type": "application/json", "content-encoding": "gzip"})
    assert status == 200, body
    c.close()


def test_metrics_count_what_was_sent(mlp: RuntimeProcess) -> None:
    c = mlp.client()
    before = c.request("GET", "/metrics")[2].decode()
    rows = [[float(i)] * 256 for i in range(4)]
    for _ in range(5):
        assert c.json("POST", "/v2/models/mlp/infer", infer_body("x", rows))[0] == 200
    assert c.json("POST", "/v2/models/mlp/infer", {"inputs": []})[0] == 400
    nan_rows = [[float("nan")] + [0.0] * 255]
    status, _, _ = c.request("POST", "/v2/models/mlp/infer",
                             json.dumps(infer_body("x", nan_rows)).replace("NaN", "NaN").encode(),
                             {"content-type": "application/json"})
    status2, headers, text = c.request("GET", "/metrics")
    after = text.decode()
    assert status2 == 200 and headers["content-type"].startswith("text/plain")

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("modelops_requests_total", model="mlp", version="3", code="200") == 5 + (status == 200)
    assert delta("modelops_requests_total", code="400") >= 1
    assert delta("modelops_input_rows_total", input="x") == 20 + (status == 200)
    assert delta("modelops_prediction_class_total") == 20 + (status == 200)
    assert delta("modelops_request_duration_seconds_count") == 5 + (status == 200)
    assert delta("modelops_batch_size_sum") == 20 + (status == 200)
    if status == 200:  # orjson reads NaN literals; then the NaN must be counted
        assert delta("modelops_input_nan_total", input="x") == 1
    assert metric(after, "modelops_model_info", provider="CPUExecutionProvider") == 1
    c.close()


def test_feedback_updates_accuracy_of_the_answering_version(mlp: RuntimeProcess) -> None:
    c = mlp.client()
    x = np.random.default_rng(5).standard_normal((1, 256)).astype(np.float32)
    _, out = c.json("POST", "/v2/models/mlp/infer", {"id": "fb-1", **infer_body("x", x.tolist())})
    predicted = int(np.argmax(out["outputs"][0]["data"]))
    c.json("POST", "/v2/models/mlp/infer", {"id": "fb-2", **infer_body("x", x.tolist())})
    before = c.request("GET", "/metrics")[2].decode()
    assert c.json("POST", "/v2/models/mlp/feedback", {"id": "fb-1", "label": predicted}) == (
        200, {"id": "fb-1", "rows": 1, "correct": 1})
    assert c.json("POST", "/v2/models/mlp/feedback", {"id": "fb-2", "label": (predicted + 1) % 10})[1]["correct"] == 0
    # A second feedback for the same id, or an unknown id, is a 404 that changes nothing.
    status, err = c.json("POST", "/v2/models/mlp/feedback", {"id": "fb-1", "label": predicted})
    assert status == 404 and "unknown or expired" in err["error"]
    assert c.json("POST", "/v2/models/mlp/feedback", {"label": 1})[0] == 400
    after = c.request("GET", "/metrics")[2].decode()
    assert metric(after, "modelops_feedback_total", version="3") - metric(before, "modelops_feedback_total") == 2
    assert metric(after, "modelops_feedback_correct_total") - metric(before, "modelops_feedback_correct_total") == 1
    c.close()


def test_regression_feedback_and_prediction_histogram(models: dict[str, tuple[Path, str]]) -> None:
    with RuntimeProcess(models["reg"][0], "reg", "--prediction-buckets=-1,0,1") as rt:
        c = rt.client()
        _, out = c.json("POST", "/v2/models/reg/infer", {"id": "r1", **infer_body("x", [[1, 2, 3, 4], [0, 0, 0, 0]])})
        y = out["outputs"][0]["data"]
        status, fb = c.json("POST", "/v2/models/reg/feedback", {"id": "r1", "labels": [y[0] + 0.5, y[1] - 0.25]})
        assert status == 200 and fb["absolute_error"] == pytest.approx(0.75, abs=1e-5)
        text = c.request("GET", "/metrics")[2].decode()
        assert metric(text, "modelops_prediction_value_count") == 2
        assert metric(text, "modelops_feedback_absolute_error_sum") == pytest.approx(0.75, abs=1e-5)
        c.close()


def test_bytes_length_prefix_codec_roundtrip() -> None:
    from modelops_runtime.codec import _bytes_from_binary, _bytes_to_binary

    arr = np.array(["a", "héllo", ""], dtype=object)
    raw = _bytes_to_binary(arr)
    assert raw[:4] == struct.pack("<I", 1)
    assert list(_bytes_from_binary(memoryview(raw), 3, "s")) == ["a", "héllo", ""]
