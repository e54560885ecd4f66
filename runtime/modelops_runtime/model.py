"""The model object: fetch, verify, load an ONNX Runtime session, warm up, predict."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError
from .signature import TensorSpec, spec_from_ort

log = logging.getLogger("modelops.runtime")

GRAPH_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class ModelConfig:
    name: str
    source: str
    version: str = "1"
    sha256: str | None = None
    device: str = "cpu"  # cpu | gpu
    allow_cpu_fallback: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"
    quantize: str | None = None  # None | "dynamic-int8"
    cache_dir: str | None = None
    extra_providers: list[str] = field(default_factory=list)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(source: str, dest_dir: str) -> Path:
    """Returns a local path to the model file, downloading http(s):// and s3:// sources into dest_dir."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else source)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return path
    os.makedirs(dest_dir, exist_ok=True)
    name = os.path.basename(parsed.path) or "model.onnx"
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out:
            if parsed.scheme in ("http", "https"):
                try:
                    with urllib.request.urlopen(source, timeout=60) as resp:
                        shutil.copyfileobj(resp, out, 1 << 20)
                except OSError as e:
                    raise ModelLoadError(f"could not download {source}: {e}") from e
            elif parsed.scheme == "s3":
                _fetch_s3(parsed.netloc, parsed.path.lstrip("/"), out)
            else:
                raise ModelLoadError(f"unsupported model URI scheme '{parsed.scheme}' in {source}")
        final = Path(dest_dir) / name
        os.replace(tmp, final)
        return final
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fetch_s3(bucket: str, key: str, out: Any) -> None:
    try:
        import boto3
    except ImportError as e:
        raise ModelLoadError("s3:// model URIs need the 's3' extra (pip install modelops[s3])") from e
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MODELOPS_S3_ENDPOINT") or None
    try:
        boto3.client("s3", endpoint_url=endpoint).download_fileobj(bucket, key, out)
    except Exception as e:  # boto raises many types; all mean "could not fetch"
        raise ModelLoadError(f"could not download s3://{bucket}/{key}: {e}") from e


def verify(path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected and digest != expected.lower().removeprefix("sha256:"):
        raise ModelLoadError(
            f"integrity check failed for {path}: sha256 is {digest}, expected {expected.lower()}"
        )
    return digest


class OnnxModel:
    """One ONNX Runtime session plus what the data plane needs to know about it."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.name = config.name
        self.version = config.version
        self.ready = False
        self.not_ready_reason = "loading"
        self.provider = "none"
        self.digest = ""
        self.applied: list[str] = []
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.input_by_name: dict[str, TensorSpec] = {}
        self.output_names: list[str] = []
        self.batchable = False
        self._session: Any = None

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> None:
        import onnxruntime as ort

        cfg = self.config
        workdir = cfg.cache_dir or tempfile.gettempdir()
        path = fetch(cfg.source, os.path.join(workdir, "download"))
        self.digest = verify(path, cfg.sha256)
        log.info("Verified model %s sha256 %s", path, self.digest)
        path = self._maybe_quantize(path, workdir)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.intra_op_threads
        opts.inter_op_num_threads = cfg.inter_op_threads
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization_level]
        if cfg.graph_optimization_level != "all":
            self.applied.append(f"graph-{cfg.graph_optimization_level}")

        wanted = self._wanted_providers()
        available = ort.get_available_providers()
        providers = [p for p in wanted if p in available]
        missing = [p for p in wanted if p not in available]
        if missing and not cfg.allow_cpu_fallback:
            # The session is not created: the server stays up but never reports ready.
            self.not_ready_reason = (
                f"execution provider(s) {', '.join(missing)} unavailable (available: {', '.join(available)}) "
                "and CPU fallback is not allowed"
            )
            log.error("Refused to serve model %s: %s", self.name, self.not_ready_reason)
            return
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for invalid models
            raise ModelLoadError(f"onnxruntime could not load {path}: {e}") from e
        in_use = self._session.get_providers()
        self.provider = in_use[0] if in_use else "CPUExecutionProvider"
        if wanted[0] != self.provider:
            if not cfg.allow_cpu_fallback:
                self.not_ready_reason = f"asked for {wanted[0]} but the session runs on {self.provider}"
                log.error("Refused to serve model %s: %s", self.name, self.not_ready_reason)
                self._session = None
                return
            log.warning("Fell back from %s to %s for model %s", wanted[0], self.provider, self.name)
        log.info("Loaded model %s version %s on %s", self.name, self.version, self.provider)

        try:
            self.inputs = [spec_from_ort(i) for i in self._session.get_inputs()]
            self.outputs = [spec_from_ort(o) for o in self._session.get_outputs()]
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        self.input_by_name = {s.name: s for s in self.inputs}
        self.output_names = [s.name for s in self.outputs]
        self.batchable = all(s.shape and s.shape[0] == -1 for s in self.inputs + self.outputs)

    def _wanted_providers(self) -> list[str]:
        if self.config.extra_providers:
            return list(self.config.extra_providers)
        if self.config.device == "gpu":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _maybe_quantize(self, path: Path, workdir: str) -> Path:
        if not self.config.quantize:
            return path
        if self.config.quantize != "dynamic-int8":
            raise ModelLoadError(f"unknown load-time quantization '{self.config.quantize}'")
        cache = Path(workdir) / "quantized"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / f"{self.digest}-dynamic-int8.onnx"
        if not target.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = target.with_suffix(".tmp")
            # The quantizer writes scratch files beside its input, and the model volume is read-only.
            src = cache / f"{self.digest}-source.onnx"
            shutil.copyfile(path, src)
            try:
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
            except Exception as e:
                raise ModelLoadError(f"dynamic int8 quantization of {path} failed: {e}") from e
            finally:
                src.unlink(missing_ok=True)
            os.replace(tmp, target)
            log.info("Quantized model %s to dynamic int8, cached as %s", self.name, target)
        else:
            log.info("Reused cached dynamic int8 model %s", target)
        self.applied.append("dynamic-int8")
        return target

    # -- serving ---------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._session is not None

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs every output; the data plane selects. Called from the inference thread."""
        return self._session.run(self.output_names, inputs)

    def example_inputs(self, rows: int = 1) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.inputs:
            shape = tuple(rows if (i == 0 and d == -1) else (1 if d == -1 else d) for i, d in enumerate(spec.shape))
            if spec.datatype == "BYTES":
                out[spec.name] = np.full(shape, "", dtype=object)
            else:
                out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return out

    def warm_up(self, golden: dict[str, Any] | None = None) -> None:
        """Runs a generated input (and the golden request, if any) before the model reports ready."""
        if not self.loaded:
            return
        try:
            for _ in range(3):
                self.run(self.example_inputs())
        except Exception as e:  # ORT raises its own types; the server stays up and reports why it is not ready
            self.not_ready_reason = f"warm-up inference failed: {e}"
            log.error("Kept model %s not ready: %s", self.name, self.not_ready_reason)
            return
        if golden is not None:
            problem = check_golden(self, golden)
            if problem:
                self.not_ready_reason = f"golden request failed: {problem}"
                log.error("Kept model %s not ready: %s", self.name, self.not_ready_reason)
                return
            log.info("Answered the golden request of model %s within tolerance", self.name)
        self.ready = True
        self.not_ready_reason = ""

    def metadata(self) -> dict[str, object]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [s.metadata() for s in self.inputs],
            "outputs": [s.metadata() for s in self.outputs],
            "parameters": {"execution_provider": self.provider, "sha256": self.digest, "applied": self.applied},
        }


def check_golden(model: OnnxModel, golden: dict[str, Any]) -> str:
    """Returns "" when the model's answer to the golden inputs is within tolerance, else why not.

    Golden file format: {"inputs": [{"name", "datatype", "shape", "data"}], "outputs": [{"name", "data"}],
    "tolerance": 1e-4}.
    """
    try:
        feeds = {}
        for t in golden["inputs"]:
            spec = model.input_by_name[t["name"]]
            feeds[t["name"]] = np.asarray(t["data"], dtype=spec.dtype).reshape(t["shape"])
        results = dict(zip(model.output_names, model.run(feeds), strict=True))
        tol = float(golden.get("tolerance", 1e-4))
        for t in golden["outputs"]:
            got = np.asarray(results[t["name"]], dtype=np.float64).reshape(-1)
            want = np.asarray(t["data"], dtype=np.float64).reshape(-1)
            if got.shape != want.shape:
                return f"output {t['name']} has {got.size} values, expected {want.size}"
            err = float(np.max(np.abs(got - want))) if got.size else 0.0
            if not err <= tol:
                return f"output {t['name']} differs by {err:.6g}, tolerance {tol:g}"
    except (KeyError, TypeError, ValueError) as e:
        return f"golden request is malformed or does not fit the model: {e!r}"
    return ""
