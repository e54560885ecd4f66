"""Tensor signatures: ONNX Runtime types <-> Open Inference Protocol datatypes, and request checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadRequest

# ONNX Runtime's type strings to OIP datatypes and numpy dtypes.
ORT_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_OIP = {v: k for k, v in OIP_TO_NUMPY.items() if k != "BYTES"}


def oip_datatype(array: np.ndarray) -> str:
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return NUMPY_TO_OIP[array.dtype]
    except KeyError:
        raise BadRequest(f"unsupported output dtype {array.dtype}") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 where the model leaves a dimension free

    @property
    def dtype(self) -> np.dtype:
        return OIP_TO_NUMPY[self.datatype]

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def check(self, datatype: str, shape: list[int] | tuple[int, ...]) -> None:
        """Raises BadRequest naming the tensor when a request's datatype or shape does not fit."""
        if datatype != self.datatype:
            raise BadRequest(f"input '{self.name}': datatype {datatype} does not match the model's {self.datatype}")
        if len(shape) != len(self.shape):
            raise BadRequest(
                f"input '{self.name}': rank {len(shape)} (shape {list(shape)}) does not match the model's "
                f"rank {len(self.shape)} (shape {list(self.shape)})"
            )
        for i, (got, want) in enumerate(zip(shape, self.shape, strict=True)):
            if not isinstance(got, int) or got < 0:
                raise BadRequest(f"input '{self.name}': dimension {i} must be a non-negative integer, got {got!r}")
            if want != -1 and got != want:
                raise BadRequest(
                    f"input '{self.name}': dimension {i} is {got} but the model expects {want} "
                    f"(shape {list(self.shape)})"
                )


def spec_from_ort(node: object) -> TensorSpec:
    """Builds a TensorSpec from an onnxruntime NodeArg (symbolic or unknown dims become -1)."""
    type_str: str = node.type  # type: ignore[attr-defined]
    if type_str not in ORT_TO_OIP:
        raise ValueError(f"tensor {node.name} has unsupported type {type_str}")  # type: ignore[attr-defined]
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)  # type: ignore[attr-defined]
    return TensorSpec(node.name, ORT_TO_OIP[type_str], dims)  # type: ignore[attr-defined]
