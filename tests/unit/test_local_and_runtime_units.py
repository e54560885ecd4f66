"""Small pure pieces: image references, service URLs, the metrics registry, feature parsing."""

from __future__ import annotations

import pytest
from modelops_local.cli import service_url
from modelops_local.node import image_repo
from modelops_runtime.metrics import Registry
from modelops_runtime.monitoring import MonitoringConfig


@pytest.mark.parametrize(("image", "repo"), [
    ("ghcr.io/modelops/runtime:0.1.0", "ghcr.io/modelops/runtime"),
    ("ghcr.io/modelops/runtime@sha256:abc", "ghcr.io/modelops/runtime"),
    ("localhost:5000/runtime:1", "localhost:5000/runtime"),
    ("localhost:5000/runtime", "localhost:5000/runtime"),
    ("busybox", "busybox"),
])
def test_image_repo_strips_tag_and_digest(image: str, repo: str) -> None:
    assert image_repo(image) == repo


def test_service_url_by_name_or_port() -> None:
    known = {"ns/a/http": "127.0.0.1:1", "ns/a/grpc": "127.0.0.1:2", "ns/b/80": "127.0.0.1:3"}
    assert service_url(known, "ns/a/grpc") == "http://127.0.0.1:2"
    assert service_url(known, "ns/a") == "http://127.0.0.1:2"  # first port by name order
    assert service_url(known, "ns/b") == "http://127.0.0.1:3"
    assert service_url(known, "ns/c") is None and service_url(known, "bad") is None


def test_registry_renders_prometheus_text() -> None:
    r = Registry()
    c = r.counter("x_total", "Things.", ("kind",))
    c.labels('a"b').inc(2)
    h = r.histogram("lat_seconds", "Latency.", (), buckets=(0.1, 1.0))
    child = h.labels()
    for v in (0.05, 0.5, 5):
        child.observe(v)
    text = r.render().decode()
    assert 'x_total{kind="a\\"b"} 2' in text
    assert 'lat_seconds_bucket{le="0.1"} 1' in text and 'lat_seconds_bucket{le="1"} 2' in text
    assert 'lat_seconds_bucket{le="+Inf"} 3' in text and "lat_seconds_count 3" in text
    assert "# TYPE lat_seconds histogram" in text


def test_monitored_features_parse_or_fail_clearly() -> None:
    fs = MonitoringConfig.parse_features("x:0, x:12,input_ids:3")
    assert [f.label for f in fs] == ["x:0", "x:12", "input_ids:3"]
    with pytest.raises(ValueError, match="INPUT:COLUMN"):
        MonitoringConfig.parse_features("x")
