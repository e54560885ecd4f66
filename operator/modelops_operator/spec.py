"""The ModelDeployment spec: defaults (as the API server applies them) and checks the schema cannot do.

Pure functions. `validate()` returns every problem with the field it concerns; an invalid spec is
never acted on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

DEFAULT_IMAGE = "ghcr.io/modelops/runtime:0.1.0"
DEFAULT_GPU_IMAGE = "ghcr.io/modelops/runtime-gpu:0.1.0"
DEFAULT_STEPS = [{"setWeight": 20}, {"pause": {"durationSeconds": 10}}, {"setWeight": 50},
                 {"pause": {"durationSeconds": 10}}]


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with every default the CRD declares filled in (the API server does the same)."""
    s = copy.deepcopy(spec)
    model = s.setdefault("model", {})
    opt = model.setdefault("optimization", {})
    opt.setdefault("graphOptimizationLevel", "all")
    opt.setdefault("quantize", "none")
    if "golden" in model:
        model["golden"].setdefault("tolerance", 0.0001)
    rt = s.setdefault("runtime", {})
    rt.setdefault("image", DEFAULT_IMAGE)
    rt.setdefault("gpuImage", DEFAULT_GPU_IMAGE)
    rt.setdefault("device", "cpu")
    rt.setdefault("gpuCount", 1)
    rt.setdefault("allowCpuFallback", False)
    rt.setdefault("intraOpThreads", 1)
    rt.setdefault("interOpThreads", 1)
    rt.setdefault("port", 8080)
    b = rt.setdefault("batching", {})
    b.setdefault("maxBatchSize", 1)
    b.setdefault("maxDelaySeconds", 0.002)
    b.setdefault("maxQueue", 1024)
    b.setdefault("timeoutSeconds", 30)
    s.setdefault("replicas", 1)
    if "autoscaling" in s:
        s["autoscaling"].setdefault("minReplicas", 1)
        s["autoscaling"].setdefault("targetCPUUtilizationPercentage", 70)
    ro = s.setdefault("rollout", {})
    ro.setdefault("strategy", "Canary")
    mon = s.setdefault("monitoring", {})
    mon.setdefault("task", "auto")
    mon.setdefault("logSampleRate", 1)
    mon.setdefault("payloadLogSampleRate", 0)
    mon.setdefault("feedbackCacheSize", 100000)
    return s


def validate(spec: dict[str, Any]) -> list[FieldError]:
    """Checks across fields that an OpenAPI schema (without CEL, which Kubernetes 1.20 rejects) cannot express."""
    errs: list[FieldError] = []
    model = spec.get("model") or {}
    for key in ("name", "version", "uri", "sha256"):
        if not model.get(key):
            errs.append(FieldError(f"spec.model.{key}", "is required"))
    golden = model.get("golden")
    if golden:
        for i, t in enumerate(golden.get("inputs") or []):
            n = 1
            for d in t.get("shape") or []:
                n *= d
            if len(t.get("data") or []) != n:
                errs.append(FieldError(f"spec.model.golden.inputs[{i}].data",
                                       f"has {len(t.get('data') or [])} values but shape {t.get('shape')} needs {n}"))
    rt = spec.get("runtime") or {}
    providers = rt.get("executionProviders") or []
    if rt.get("device") == "cpu" and any(p != "CPUExecutionProvider" for p in providers):
        errs.append(FieldError("spec.runtime.executionProviders", "GPU providers need spec.runtime.device: gpu"))
    if rt.get("device") == "gpu" and providers and providers[0] == "CPUExecutionProvider":
        errs.append(FieldError("spec.runtime.executionProviders",
                               "device gpu must prefer a GPU provider (CPU is the fallback, see allowCpuFallback)"))
    if len(set(providers)) != len(providers):
        errs.append(FieldError("spec.runtime.executionProviders", "lists a provider twice"))
    for i, e in enumerate(rt.get("env") or []):
        if str(e.get("name", "")).startswith("MODELOPS_"):
            errs.append(FieldError(f"spec.runtime.env[{i}].name",
                                   "MODELOPS_* variables are set by the operator from the spec"))
    res = rt.get("resources") or {}
    for key, req in (res.get("requests") or {}).items():
        lim = (res.get("limits") or {}).get(key)
        if lim is not None and _quantity(req) is not None and _quantity(lim) is not None \
                and _quantity(req) > _quantity(lim):  # type: ignore[operator]
            errs.append(FieldError(f"spec.runtime.resources.requests.{key}", f"{req} exceeds the limit {lim}"))
    for key in list(res.get("requests") or {}) + list(res.get("limits") or {}):
        for where in ("requests", "limits"):
            val = (res.get(where) or {}).get(key)
            if val is not None and _quantity(val) is None:
                errs.append(FieldError(f"spec.runtime.resources.{where}.{key}", f"'{val}' is not a quantity"))
    auto = spec.get("autoscaling")
    if auto and auto.get("minReplicas", 1) > auto.get("maxReplicas", 1):
        errs.append(FieldError("spec.autoscaling.minReplicas",
                               f"{auto.get('minReplicas')} is above maxReplicas {auto.get('maxReplicas')}"))
    ro = spec.get("rollout") or {}
    last = 0
    for i, step in enumerate(ro.get("steps") or []):
        kinds = [k for k in ("setWeight", "pause") if k in step]
        if len(kinds) != 1:
            errs.append(FieldError(f"spec.rollout.steps[{i}]", "must have exactly one of setWeight or pause"))
            continue
        if "setWeight" in step:
            if step["setWeight"] < last:
                errs.append(FieldError(f"spec.rollout.steps[{i}].setWeight",
                                       f"{step['setWeight']} is below the previous step's {last}"))
            last = step["setWeight"]
    if ro.get("steps") and ro.get("strategy", "Canary") != "Canary":
        errs.append(FieldError("spec.rollout.steps", f"steps apply to the Canary strategy, not {ro.get('strategy')}"))
    analysis = ro.get("analysis") or {}
    provider = analysis.get("provider") or {}
    checks = analysis.get("checks") or {}
    if provider.get("type") == "prometheus" and not provider.get("address"):
        errs.append(FieldError("spec.rollout.analysis.provider.address", "is required for the prometheus provider"))
    if checks.get("prometheus") and provider.get("type", "pods") != "prometheus":
        errs.append(FieldError("spec.rollout.analysis.checks.prometheus", "needs provider type prometheus"))
    lat = checks.get("latency")
    if lat is not None and "maxSeconds" not in lat and "maxRatio" not in lat:
        errs.append(FieldError("spec.rollout.analysis.checks.latency", "needs maxSeconds or maxRatio"))
    for name in ("errorRate", "predictionDrift", "accuracy", "inputDrift"):
        c = checks.get(name)
        key = {"errorRate": "max", "accuracy": "min"}.get(name, "maxPSI")
        if c is not None and key not in c:
            errs.append(FieldError(f"spec.rollout.analysis.checks.{name}.{key}", "is required"))
    drift = checks.get("inputDrift")
    features = (spec.get("monitoring") or {}).get("features") or []
    if drift and drift.get("feature") not in features:
        errs.append(FieldError("spec.rollout.analysis.checks.inputDrift.feature",
                               f"'{drift.get('feature')}' is not in spec.monitoring.features"))
    buckets = (spec.get("monitoring") or {}).get("predictionBuckets") or []
    if buckets and sorted(buckets) != list(buckets):
        errs.append(FieldError("spec.monitoring.predictionBuckets", "must be in increasing order"))
    return errs


_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def _quantity(value: Any) -> float | None:
    """Parses a Kubernetes quantity ('500m', '2Gi', 3); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, suffix = text, ""
    try:
        return float(number) * _SUFFIX[suffix]
    except ValueError:
        return None
