"""Metrics providers behind one interface: each returns, per revision, a Window of counter increases
(the last interval, and since the rollout started) in the same shape, so one `assess()` judges both.

- pods: the operator scrapes each runtime pod's /metrics and diffs counters between scrapes. No
  Prometheus needed; state (the previous scrape of each pod) lives in the operator's memory.
- prometheus: PromQL `increase()` over the same windows, selecting a revision's pods by name
  (`{md}-{revision}-...`) with the usual `namespace` and `pod` target labels. User checks
  (spec.rollout.analysis.checks.prometheus) are rendered from templates and compared to min/max.

A provider never raises for missing data: unreachable pods or Prometheus give empty windows, which
`assess()` turns into Inconclusive.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from typing import Any

from .analysis import FAIL, INCONCLUSIVE, PASS, Measurement, Window

# The series the built-in checks read, and the labels each is grouped by.
SERIES = {
    "modelops_requests_total": ("code",),
    "modelops_request_duration_seconds_bucket": ("le",),
    "modelops_request_duration_seconds_count": (),
    "modelops_prediction_class_total": ("class",),
    "modelops_prediction_value_bucket": ("le",),
    "modelops_feature_value_bucket": ("feature", "le"),
    "modelops_feedback_total": (),
    "modelops_feedback_correct_total": (),
}


def render(template: str, namespace: str, name: str, revision: str, window: str) -> str:
    return (template.replace("{{namespace}}", namespace).replace("{{name}}", name)
            .replace("{{revision}}", revision).replace("{{window}}", window))


def pod_selector(namespace: str, name: str, revision: str) -> str:
    return f'namespace="{namespace}",pod=~"{name}-{revision}-.*"'


def query(address: str, promql: str, timeout: float = 5.0) -> list[dict[str, Any]] | None:
    """An instant query; None when Prometheus cannot be reached or rejects the query."""
    url = f"{address.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.load(resp)
    except (OSError, ValueError):
        return None
    if doc.get("status") != "success":
        return None
    return list(doc["data"]["result"])


def prometheus_window(address: str, namespace: str, name: str, revision: str, recent_s: float,
                      since_s: float) -> Window:
    sel = pod_selector(namespace, name, revision)
    w = Window()
    for series, by in SERIES.items():
        group = f" by ({', '.join(by)})" if by else ""
        for attr, seconds in (("recent", recent_s), ("since_start", since_s)):
            result = query(address, f"sum{group} (increase({series}{{{sel}}}[{max(int(seconds), 1)}s]))")
            for item in result or []:
                labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k in by))
                value = float(item["value"][1])
                if not math.isnan(value):
                    getattr(w, attr)[(series, labels)] = value
    return w


def prometheus_checks(address: str, checks: list[dict[str, Any]], namespace: str, name: str, revision: str,
                      window_s: float) -> list[Measurement]:
    out = []
    for chk in checks:
        promql = render(chk["query"], namespace, name, revision, f"{max(int(window_s), 1)}s")
        result = query(address, promql)
        bounds = []
        if "min" in chk:
            bounds.append(f"min {chk['min']:g}")
        if "max" in chk:
            bounds.append(f"max {chk['max']:g}")
        th = " and ".join(bounds) or "any"
        if not result:
            out.append(Measurement(chk["name"], None, th, 0, INCONCLUSIVE, f"{chk['name']}: no data from Prometheus"))
            continue
        value = float(result[0]["value"][1])
        if math.isnan(value):
            out.append(Measurement(chk["name"], None, th, 0, INCONCLUSIVE, f"{chk['name']}: NaN (no traffic?)"))
            continue
        ok = ("min" not in chk or value >= chk["min"]) and ("max" not in chk or value <= chk["max"])
        out.append(Measurement(chk["name"], value, th, 1, PASS if ok else FAIL,
                               f"{chk['name']} {value:.4g} {'within' if ok else 'breaches'} {th}"))
    return out

