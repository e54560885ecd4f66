"""Validation the schema cannot do, and defaults: table-driven."""

from __future__ import annotations

import pytest
from modelops_operator.spec import validate, with_defaults

BASE = {"model": {"name": "m", "version": "1", "uri": "http://h/m.onnx", "sha256": "a" * 64}}


def spec(**changes: object) -> dict:
    s = with_defaults(BASE)
    for path, value in changes.items():
        node = s
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return s


def test_a_minimal_spec_is_valid_and_defaulted() -> None:
    s = with_defaults(BASE)
    assert validate(s) == []
    assert s["runtime"]["device"] == "cpu" and s["replicas"] == 1 and s["rollout"]["strategy"] == "Canary"
    assert s["runtime"]["batching"]["maxBatchSize"] == 1


@pytest.mark.parametrize(("changes", "field"), [
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
    ({"runtime__executionProviders": ["CUDAExecutionProvider"]}, "spec.runtime.executionProviders"),
    ({"runtime__device": "gpu", "runtime__executionProviders": ["CPUExecutionProvider"]},
     "spec.runtime.executionProviders"),
    ({"runtime__env": [{"name": "MODELOPS_PORT", "value": "1"}]}, "spec.runtime.env[0].name"),
    ({"runtime__resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}}}, "spec.runtime.resources.requests.cpu"),
    ({"runtime__resources": {"limits": {"memory": "lots"}}}, "spec.runtime.resources.limits.memory"),
    ({"rollout__steps": [{"setWeight": 50}, {"setWeight": 20}]}, "spec.rollout.steps[1].setWeight"),
    ({"rollout__steps": [{"setWeight": 50, "pause": {}}]}, "spec.rollout.steps[0]"),
    ({"rollout__strategy": "Recreate", "rollout__steps": [{"setWeight": 10}]}, "spec.rollout.steps"),
    ({"rollout__analysis": {"provider": {"type": "prometheus"}}}, "spec.rollout.analysis.provider.address"),
    ({"rollout__analysis": {"checks": {"latency": {"quantile": 0.99}}}}, "spec.rollout.analysis.checks.latency"),
    ({"rollout__analysis": {"checks": {"accuracy": {"minLabels": 5}}}}, "spec.rollout.analysis.checks.accuracy.min"),
    ({"rollout__analysis": {"checks": {"inputDrift": {"feature": "x:1", "maxPSI": 0.2}}}},
     "spec.rollout.analysis.checks.inputDrift.feature"),
    ({"monitoring__predictionBuckets": [1, 0]}, "spec.monitoring.predictionBuckets"),
    ({"model__golden": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}],
                        "outputs": [{"name": "y", "data": [0]}]}}, "spec.model.golden.inputs[0].data"),
])
def test_invalid_specs_name_the_field(changes: dict, field: str) -> None:
    errors = validate(spec(**changes))
    assert [e.field for e in errors] == [field], errors


@pytest.mark.parametrize("changes", [
    {"runtime__device": "gpu", "runtime__executionProviders": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    {"runtime__resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": 1, "memory": "2Gi"}}},
    {"rollout__steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 10}, {"setWeight": 100}]},
    {"monitoring__features": ["x:1"], "rollout__analysis": {"checks": {"inputDrift": {"feature": "x:1", "maxPSI": 1}}}},
    {"autoscaling": {"minReplicas": 2, "maxReplicas": 2}},
])
def test_valid_specs_pass(changes: dict) -> None:
    assert validate(spec(**changes)) == []
