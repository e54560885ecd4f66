"""`modelops optimize`: graph optimization, simplification, int8 quantization and pruning, measured and gated.

The original and the optimized model are measured in the same process on the same inputs (the user's
validation set, or generated ones): file size, latency p50/p99 at batch 1 and 32, agreement (top-1 for
classifiers; max and mean absolute error for regressors) and accuracy when labels are given. The output
is written only when the gate passes: the drop is within --max-drop and the model is not slower
(unless --allow-slower). Exit codes: 0 written, 1 refused by the gate, 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SLOWER_TOLERANCE = 1.05  # p50 noise between two measurements of the same model on a busy machine


class OptimizeError(Exception):
    """Bad input: the message says what and where."""


# -- loading and inputs ------------------------------------------------------------------------------
def load_model(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise OptimizeError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        raise OptimizeError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e)[:200]}") from None
    return model


def session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def inputs_for(sess: Any, validation: Path | None, rows: int = 256, seed: int = 0) -> tuple[dict[str, np.ndarray],
                                                                                         np.ndarray | None]:
    """Validation inputs (and labels, if the file has 'labels'), or generated standard-normal inputs."""
    specs = sess.get_inputs()
    if validation is None:
        rng = np.random.default_rng(seed)
        feeds = {}
        for s in specs:
            shape = [rows if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(s.shape)]
            if "float" not in s.type:
                raise OptimizeError(f"input {s.name} is {s.type}: generated inputs are float only; pass --validation")
            feeds[s.name] = rng.standard_normal(shape).astype(np.float16 if "16" in s.type else np.float32)
        return feeds, None
    try:
        data = np.load(validation, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OptimizeError(f"{validation}: cannot read an .npz file: {e}") from None
    feeds = {}
    for s in specs:
        if s.name not in data:
            raise OptimizeError(f"{validation}: no array '{s.name}' for model input {s.name} (has: {sorted(data)})")
        arr = data[s.name]
        want = [d if isinstance(d, int) else None for d in s.shape]
        if arr.ndim != len(want) or any(w is not None and w != a for w, a in zip(want, arr.shape, strict=True)):
            raise OptimizeError(f"{validation}: '{s.name}' has shape {list(arr.shape)}, the model takes "
                                f"{[w if w is not None else 'N' for w in want]}")
        feeds[s.name] = arr.astype(np.float32) if "float" in s.type and arr.dtype != np.float16 else arr
    labels = data.get("labels")
    n = next(iter(feeds.values())).shape[0]
    if labels is not None and labels.shape[0] != n:
        raise OptimizeError(f"{validation}: {labels.shape[0]} labels for {n} input rows")
    return feeds, labels


# -- techniques -----------------------------------------------------------------------------------
def graph_optimize(model_bytes: bytes, level: str) -> bytes:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        return out.read_bytes()


def simplify(model_bytes: bytes) -> bytes:
    import onnx
    import onnxslim

    model = onnxslim.slim(onnx.load_from_string(model_bytes))
    return bytes(model.SerializeToString())


def quantize(model_bytes: bytes, mode: str, calibration: dict[str, np.ndarray] | None) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        src.write_bytes(model_bytes)
        if mode == "int8":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        else:
            if calibration is None:
                raise OptimizeError("int8-static needs calibration inputs")
            calib = calibration
            rows = next(iter(calib.values())).shape[0]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.i = 0

                def get_next(self) -> dict[str, np.ndarray] | None:
                    if self.i >= rows:
                        return None
                    batch = {k: v[self.i:self.i + 1] for k, v in calib.items()}
                    self.i += 1
                    return batch

            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def _weights(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def prune_unstructured(model_bytes: bytes, ratio: float) -> bytes:
    """Zeros the `ratio` smallest-magnitude weights of every Gemm/MatMul weight matrix."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    inits = _weights(model)
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init).copy()
        k = int(w.size * ratio)
        if k == 0:
            continue
        cut = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        w[np.abs(w) <= cut] = 0
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    return bytes(model.SerializeToString())


def prune_structured(model_bytes: bytes, ratio: float) -> bytes:
    """Removes the `ratio` least important hidden units between consecutive Gemm layers
    (Gemm -> elementwise activation -> Gemm), shrinking both weight matrices: a smaller, faster model.
    A unit's importance is the product of its incoming and outgoing weight norms."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    g = model.graph
    inits = _weights(model)
    consumers: dict[str, list[Any]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    elementwise = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Gelu"}
    pruned = 0
    for node in g.node:
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) or attrs.get("transA", 0):
            continue
        act = consumers.get(node.output[0], [])
        if len(act) != 1 or act[0].op_type not in elementwise:
            continue
        nxt = consumers.get(act[0].output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Gemm" or nxt[0].input[0] != act[0].output[0] \
                or nxt[0].input[1] not in inits:
            continue
        nattrs = {a.name: onnx.helper.get_attribute_value(a) for a in nxt[0].attribute}
        if nattrs.get("transB", 0) or nattrs.get("transA", 0):
            continue
        w1 = numpy_helper.to_array(inits[node.input[1]])
        w2 = numpy_helper.to_array(inits[nxt[0].input[1]])
        units = w1.shape[1]
        drop = int(units * ratio)
        if drop == 0 or drop >= units:
            continue
        importance = np.linalg.norm(w1, axis=0) * np.linalg.norm(w2, axis=1)
        keep = np.sort(np.argsort(importance)[drop:])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w1[:, keep], node.input[1]))
        inits[nxt[0].input[1]].CopyFrom(numpy_helper.from_array(w2[keep, :], nxt[0].input[1]))
        if len(node.input) > 2 and node.input[2] in inits:
            b1 = numpy_helper.to_array(inits[node.input[2]])
            if b1.ndim == 1 and b1.shape[0] == units:
                inits[node.input[2]].CopyFrom(numpy_helper.from_array(b1[keep], node.input[2]))
        pruned += 1
    if pruned == 0:
        raise OptimizeError("--prune-structured found no Gemm -> activation -> Gemm chain to shrink")
    # Intermediate shapes changed: drop stale value_info so shape inference starts fresh.
    del g.value_info[:]
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# -- measurement ----------------------------------------------------------------------------------
def latency(sess: Any, feeds: dict[str, np.ndarray], batch: int, runs: int) -> tuple[float, float]:
    n = next(iter(feeds.values())).shape[0]
    take = {k: np.resize(v, (batch, *v.shape[1:])) if n < batch else v[:batch] for k, v in feeds.items()}
    for _ in range(5):
        sess.run(None, take)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, take)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000)


def measure(model_bytes: bytes, feeds: dict[str, np.ndarray], labels: np.ndarray | None,
            runs: int) -> dict[str, Any]:
    sess = session(model_bytes)
    out = sess.run(None, feeds)[0]
    p50_1, p99_1 = latency(sess, feeds, 1, runs)
    p50_32, p99_32 = latency(sess, feeds, 32, max(runs // 4, 10))
    m: dict[str, Any] = {"bytes": len(model_bytes), "p50_ms_b1": p50_1, "p99_ms_b1": p99_1, "p50_ms_b32": p50_32,
                         "p99_ms_b32": p99_32, "_out": out}
    if labels is not None:
        pred = out.reshape(out.shape[0], -1)
        m["accuracy"] = float(np.mean((pred.argmax(1) if pred.shape[1] > 1 else pred[:, 0].round()) == labels))
    return m


def compare(orig: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    a, b = orig.pop("_out"), new.pop("_out")
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    if a2.shape[1] > 1:
        agreement = float(np.mean(a2.argmax(1) == b2.argmax(1)))
        out = {"task": "classification", "top1_agreement": agreement, "drop": 1 - agreement}
    else:
        err = np.abs(a2 - b2)
        scale = float(np.mean(np.abs(a2))) or 1.0
        out = {"task": "regression", "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
               "drop": float(err.mean()) / scale}
    if "accuracy" in orig:
        out["drop"] = max(0.0, orig["accuracy"] - new["accuracy"])
    return out


def table(orig: dict[str, Any], new: dict[str, Any], cmp: dict[str, Any]) -> str:
    rows = [("file size (bytes)", f"{orig['bytes']:,}", f"{new['bytes']:,}", f"{orig['bytes'] / new['bytes']:.2f}x smaller"),
            ("latency p50 batch 1 (ms)", f"{orig['p50_ms_b1']:.3f}", f"{new['p50_ms_b1']:.3f}",
             f"{orig['p50_ms_b1'] / new['p50_ms_b1']:.2f}x faster"),
            ("latency p99 batch 1 (ms)", f"{orig['p99_ms_b1']:.3f}", f"{new['p99_ms_b1']:.3f}", ""),
            ("latency p50 batch 32 (ms)", f"{orig['p50_ms_b32']:.3f}", f"{new['p50_ms_b32']:.3f}",
             f"{orig['p50_ms_b32'] / new['p50_ms_b32']:.2f}x faster"),
            ("latency p99 batch 32 (ms)", f"{orig['p99_ms_b32']:.3f}", f"{new['p99_ms_b32']:.3f}", "")]
    if "accuracy" in orig:
        rows.append(("accuracy", f"{orig['accuracy']:.4f}", f"{new['accuracy']:.4f}", ""))
    if cmp["task"] == "classification":
        rows.append(("top-1 agreement", "", f"{cmp['top1_agreement']:.4f}", ""))
    else:
        rows.append(("max / mean abs error", "", f"{cmp['max_abs_error']:.3g} / {cmp['mean_abs_error']:.3g}", ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'original':>14}  {'optimized':>14}", *(
        f"{r[0]:{width}}  {r[1]:>14}  {r[2]:>14}  {r[3]}" for r in rows)]
    return "\n".join(lines)


# -- command ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelops optimize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the .onnx model to optimize")
    p.add_argument("-o", "--output", type=Path, required=True, help="where the optimized model is written")
    p.add_argument("--graph-level", choices=("basic", "extended", "all"), help="ONNX Runtime offline graph optimization")
    p.add_argument("--simplify", action="store_true", help="constant folding and dead-node removal (onnxslim)")
    p.add_argument("--quantize", choices=("int8", "int8-static"), help="dynamic int8, or static int8 (QDQ)")
    p.add_argument("--calibration", type=Path, help="npz of inputs for int8-static (default: the validation set)")
    p.add_argument("--prune", type=float, metavar="RATIO", help="zero this share of the smallest weights")
    p.add_argument("--prune-structured", type=float, metavar="RATIO", help="remove this share of hidden units")
    p.add_argument("--validation", type=Path, help="npz with one array per model input, and optionally 'labels'")
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="largest allowed drop: accuracy with labels, else 1 - top-1 agreement (classifiers) or "
                        "relative mean abs error (regressors); default 0.01")
    p.add_argument("--allow-slower", action="store_true", help="write the model even if batch-1 p50 got slower")
    p.add_argument("--report", type=Path, help="write the measurements as JSON")
    p.add_argument("--runs", type=int, default=200, help="timed runs per latency figure")
    return p


def run(args: argparse.Namespace) -> int:
    for name in ("prune", "prune_structured"):
        v = getattr(args, name)
        if v is not None and not 0 < v < 1:
            raise OptimizeError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
    if not any([args.graph_level, args.simplify, args.quantize, args.prune, args.prune_structured]):
        raise OptimizeError("nothing to do: choose --graph-level, --simplify, --quantize, --prune or --prune-structured")
    model = load_model(args.model)
    original = model.SerializeToString()
    feeds, labels = inputs_for(session(original), args.validation)
    calibration = None
    if args.quantize == "int8-static":
        calibration = inputs_for(session(original), args.calibration)[0] if args.calibration else feeds
        calibration = {k: v[:128] for k, v in calibration.items()}
    # In this order: simplify the graph, shrink it, sparsify, quantize, then let ONNX Runtime fuse.
    steps: list[tuple[str, Any]] = []
    if args.simplify:
        steps.append(("simplify", simplify))
    if args.prune_structured:
        steps.append((f"prune-structured {args.prune_structured}", lambda d: prune_structured(d, args.prune_structured)))
    if args.prune:
        steps.append((f"prune {args.prune}", lambda d: prune_unstructured(d, args.prune)))
    if args.quantize:
        steps.append((f"quantize {args.quantize}", lambda d: quantize(d, args.quantize, calibration)))
    if args.graph_level:
        steps.append((f"graph {args.graph_level}", lambda d: graph_optimize(d, args.graph_level)))
    data = original
    for _, step in steps:
        data = step(data)
    applied = [name for name, _ in steps]

    orig = measure(original, feeds, labels, args.runs)
    new = measure(data, feeds, labels, args.runs)
    cmp = compare(orig, new)
    slower = new["p50_ms_b1"] > orig["p50_ms_b1"] * SLOWER_TOLERANCE
    problems = []
    if cmp["drop"] > args.max_drop:
        problems.append(f"drop {cmp['drop']:.4f} exceeds --max-drop {args.max_drop}")
    if slower and not args.allow_slower:
        problems.append(f"batch-1 p50 {new['p50_ms_b1']:.3f} ms is slower than the original's "
                        f"{orig['p50_ms_b1']:.3f} ms (use --allow-slower to accept)")
    digest = hashlib.sha256(data).hexdigest()
    report = {"model": str(args.model), "output": str(args.output), "applied": applied, "original": orig,
              "optimized": new, "comparison": cmp, "sha256": digest, "written": not problems,
              "refused": problems, "inputs": "validation" if args.validation else "generated",
              "rows": int(next(iter(feeds.values())).shape[0])}
    print(f"Applied: {', '.join(applied)} ({report['rows']} {report['inputs']} rows)")
    print(table(orig, new, cmp))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    if problems:
        print("Refused, nothing written: " + "; ".join(problems), file=sys.stderr)
        return 1
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.output)
    print(f"Wrote {args.output}\nsha256: {digest}  (use it as spec.model.sha256)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs advice at WARNING on root
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except OptimizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
