"""Small real ONNX models built with onnx.helper, for tests, benchmarks and the demo.

Nothing is downloaded: weights come from a seeded generator, so a model and its sha256 are the
same on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def mlp(
    sizes: Sequence[int] = (256, 512, 512, 512, 10),
    seed: int = 0,
    input_name: str = "x",
    output_name: str = "y",
    scale: float = 1.0,
    bias_shift: float = 0.0,
    softmax: bool = False,
    opset: int = 17,
) -> bytes:
    """A ReLU MLP classifier with a free batch dimension; `scale`/`bias_shift` make a drifted twin."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = input_name
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in) * scale).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.01 + bias_shift * (np.arange(n_out) == 0)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        out = (output_name if not softmax else "logits") if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out]))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        prev = out
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], [output_name], axis=-1))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def heavy(seed: int = 1, width: int = 1024, depth: int = 12) -> bytes:
    """An MLP whose single-row inference costs about a millisecond or more on one core."""
    return mlp((256, *([width] * depth), 10), seed=seed)


def linear_regressor(n_features: int = 4, seed: int = 0, offset: float = 0.0) -> bytes:
    """y = x @ w + offset, one output value per row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_features, 1)).astype(np.float32)
    b = np.array([offset], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "linreg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def multi_io() -> bytes:
    """Two inputs of different types and two outputs: a = x * 2 (float), n = k + 1 (int64), fixed width 3."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Add", ["k", "one"], ["n"])],
        "multi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 3])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 3])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
         numpy_helper.from_array(np.array(1, dtype=np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def failing_mlp(sizes: Sequence[int] = (256, 512, 512, 512, 10), seed: int = 0) -> bytes:
    """The MLP of `mlp(sizes, seed)` plus a Gather whose index is max(x) * 1000: an all-zero input (the
    runtime's warm-up) passes, real inputs fail inside ONNX Runtime. A release that breaks on traffic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(mlp(sizes, seed=seed, output_name="y0"))
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.zeros(4, dtype=np.float32), "table"),
                          numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"),
                          numpy_helper.from_array(np.array(1000.0, dtype=np.float32), "thousand")])
    g.node.extend([
        helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
        helper.make_node("Mul", ["xmax", "thousand"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["picked"]),
        helper.make_node("Mul", ["picked", "zero_f"], ["nothing"]),
        helper.make_node("Add", ["y0", "nothing"], ["y"]),
    ])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def save(data: bytes, path: str | Path) -> str:
    """Writes the model and returns its sha256."""
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()
