"""Open Inference Protocol v2 codecs: JSON tensors and the binary tensor data extension.

Decoding validates against the model's signature before anything reaches ONNX Runtime: every
problem is a BadRequest naming the tensor.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import BadRequest
from .signature import OIP_TO_NUMPY, TensorSpec, oip_datatype

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
# Generated request ids: unique per process start (a random prefix) and cheap (a counter).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


@dataclass(slots=True)
class InferRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all outputs
    binary_outputs: set[str]
    parameters: dict[str, Any]
    rows: int


def _bytes_from_binary(raw: memoryview, count: int, name: str) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"input '{name}': truncated BYTES length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise BadRequest(f"input '{name}': BYTES element runs past the end of the data")
        items.append(bytes(raw[pos : pos + n]))
        pos += n
    if len(items) != count:
        raise BadRequest(f"input '{name}': {len(items)} BYTES elements for a shape of {count} elements")
    return np.array([i.decode("utf-8", "replace") for i in items], dtype=object)


def _bytes_to_binary(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadRequest(f"'{what}' must be a list")
    return value


def decode_request(
    body: bytes,
    header_length: int | None,
    specs: dict[str, TensorSpec],
    output_names: list[str],
    batchable: bool,
) -> InferRequest:
    """Parses an inference request and checks it against the model's inputs."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")

    req_id = doc.get("id")
    if req_id is None:
        req_id = f"{_ID_PREFIX}-{next(_ID_COUNTER)}"
    elif not isinstance(req_id, str):
        raise BadRequest("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    rows = -1
    for t in raw_inputs:
        if not isinstance(t, dict):
            raise BadRequest("each input must be an object")
        name = t.get("name")
        spec = specs.get(name) if isinstance(name, str) else None
        if spec is None or not isinstance(name, str):
            raise BadRequest(f"unknown input '{name}'; the model takes {sorted(specs)}")
        if name in inputs:
            raise BadRequest(f"input '{name}' is given twice")
        shape = t.get("shape")
        if not isinstance(shape, list):
            raise BadRequest(f"input '{name}': 'shape' must be a list of integers")
        spec.check(t.get("datatype"), shape)  # type: ignore[arg-type]
        count = 1
        for d in shape:
            count *= d
        tparams = t.get("parameters") or {}
        size = tparams.get("binary_data_size") if isinstance(tparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input '{name}': binary_data_size {size!r} runs past the binary data")
            chunk = binary[offset : offset + size]
            offset += size
            if spec.datatype == "BYTES":
                arr = _bytes_from_binary(chunk, count, name)
            else:
                itemsize = spec.dtype.itemsize
                if size != count * itemsize:
                    raise BadRequest(
                        f"input '{name}': {size} bytes of binary data for shape {shape} of {spec.datatype} "
                        f"needs {count * itemsize}"
                    )
                arr = np.frombuffer(chunk, dtype=spec.dtype)
        else:
            data = t.get("data")
            if data is None:
                raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
            arr = _json_data(data, spec, name)
            if arr.size != count:
                raise BadRequest(f"input '{name}': {arr.size} elements for shape {shape} ({count} elements)")
        inputs[name] = arr.reshape(shape)
        if batchable:
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise BadRequest(f"input '{name}': batch dimension {shape[0]} differs from the other inputs' {rows}")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}")

    outputs, binary_outputs = _decode_outputs(doc.get("outputs"), output_names, params)
    return InferRequest(req_id, inputs, outputs, binary_outputs, params, max(rows, 1))


def _json_data(data: Any, spec: TensorSpec, name: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if spec.datatype == "BYTES":
            return np.array(data, dtype=object).reshape(-1)
        arr = np.asarray(data, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input '{name}': data does not convert to {spec.datatype}: {e}") from None
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _decode_outputs(
    raw: Any, output_names: list[str], params: dict[str, Any]
) -> tuple[list[str] | None, set[str]]:
    binary_all = bool(params.get("binary_data_output", False))
    if raw is None:
        return None, set(output_names) if binary_all else set()
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for o in raw:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in output_names:
            raise BadRequest(f"unknown output '{name}'; the model gives {output_names}")
        names.append(name)
        p = o.get("parameters") or {}
        if (isinstance(p, dict) and p.get("binary_data", binary_all)) or (not isinstance(p, dict) and binary_all):
            binary.add(name)
    return names, binary


def encode_response(
    model_name: str,
    model_version: str,
    req_id: str,
    names: list[str],
    arrays: list[np.ndarray],
    binary_outputs: set[str],
) -> tuple[bytes, int | None]:
    """Returns the body and, when some outputs are binary, the JSON header's length."""
    outs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, arr in zip(names, arrays, strict=True):
        datatype = oip_datatype(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if name in binary_outputs:
            blob = _bytes_to_binary(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        outs.append(entry)
    head = orjson.dumps(
        {"model_name": model_name, "model_version": model_version, "id": req_id, "outputs": outs}, option=JSON_OPTS
    )
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def numpy_dtype(datatype: str) -> np.dtype:
    return OIP_TO_NUMPY[datatype]
