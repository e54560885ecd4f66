"""Property-based fuzz of the infer endpoint: whatever arrives, no 5xx and no crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelops_runtime import toymodels

from tests.helpers import Http, RuntimeProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    d = tmp_path_factory.mktemp("fuzz")
    toymodels.save(toymodels.multi_io(), d / "multi.onnx")
    with RuntimeProcess(d / "multi.onnx", "multi", "--max-batch-size", "8", "--max-delay", "0.001") as rt:
        yield rt


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=5))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=20)
datatypes = st.sampled_from(["FP32", "INT64", "FP64", "BYTES", "BOOL", "FP16", "UINT8", "nope", 3])
shapes = st.lists(st.one_of(st.integers(-2, 5), st.text(max_size=2)), max_size=4)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "k", "z", ""]), "shape": shapes, "datatype": datatypes},
    optional={"data": st.one_of(json_values, st.lists(st.floats(allow_nan=False, width=32), max_size=12),
                                st.lists(st.integers(-10, 10), max_size=12)),
              "parameters": st.one_of(json_values, st.fixed_dictionaries({"binary_data_size": st.integers(-4, 64)}))})
requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensors, max_size=3), json_values)},
    optional={"id": json_values, "outputs": st.one_of(json_values, st.lists(
        st.fixed_dictionaries({"name": st.sampled_from(["a", "n", "q"])}, optional={"parameters": json_values}),
        max_size=3)), "parameters": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=requests, binary_tail=st.binary(max_size=64), use_binary=st.booleans())
def test_infer_never_answers_5xx(server: RuntimeProcess, doc: dict, binary_tail: bytes, use_binary: bool) -> None:
    head = json.dumps(doc).encode()
    c = Http("127.0.0.1", server.port, timeout=10)
    if use_binary:
        status, _, body = c.request("POST", "/v2/models/multi/infer", head + binary_tail,
                                    {"Inference-Header-Content-Length": str(len(head))})
    else:
        status, _, body = c.request("POST", "/v2/models/multi/infer", head, {"content-type": "application/json"})
    c.close()
    assert status < 500, body
    if status != 200:
        assert json.loads(body)["error"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_server(server: RuntimeProcess, raw: bytes) -> None:
    c = Http("127.0.0.1", server.port, timeout=10)
    status, _, _ = c.request("POST", "/v2/models/multi/infer", raw, {"content-type": "application/json"})
    c.close()
    assert status in (400, 413)
    assert server.ready()


def test_server_survives_the_fuzz(server: RuntimeProcess, tmp_path: Path) -> None:
    c = server.client()
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
                       {"name": "k", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}
    assert c.json("POST", "/v2/models/multi/infer", body)[0] == 200
    c.close()
