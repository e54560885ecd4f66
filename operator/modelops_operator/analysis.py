"""Canary analysis as values: parse scrapes, diff them, estimate quantiles and PSI, assess checks.

Pure. A measurement never raises for missing data: it carries a sample count, and `assess()`
applies minSamples and the no-data policy. The worst verdict of all checks wins (Argo Rollouts).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

PASS, INCONCLUSIVE, FAIL = "Pass", "Inconclusive", "Fail"
_ORDER = {PASS: 0, INCONCLUSIVE: 1, FAIL: 2}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_prometheus(text: str) -> Samples:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: list[tuple[str, str]] = []
        if brace:
            body = rest.rsplit("}", 1)[0]
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq].strip().lstrip(",").strip()
                j = eq + 2
                val = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                        val.append({"n": "\n"}.get(body[j], body[j]))
                    else:
                        val.append(body[j])
                    j += 1
                labels.append((key, "".join(val)))
                i = j + 1
        try:
            out[(name, tuple(sorted(labels)))] = float(value)
        except ValueError:
            continue
    return out


def diff(now: Samples, before: Samples | None) -> Samples:
    """Counter increase between two scrapes of one pod (a reset counts from zero)."""
    if before is None:
        return dict(now)
    out: Samples = {}
    for k, v in now.items():
        prev = before.get(k, 0.0)
        out[k] = v - prev if v >= prev else v
    return out


def add(a: Samples, b: Samples) -> Samples:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + v
    return out


def total(s: Samples, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in s.items() if n == name and all((k, val) in labels for k, val in match.items()))


def by_label(s: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in s.items():
        if n == name:
            d = dict(labels)
            if label in d:
                out[d[label]] += v
    return dict(out)


def histogram_quantile(q: float, s: Samples, name: str) -> float | None:
    """Like PromQL's histogram_quantile over summed buckets: linear within the bucket."""
    buckets: dict[float, float] = defaultdict(float)
    for (n, labels), v in s.items():
        if n == f"{name}_bucket":
            le = dict(labels).get("le", "+Inf")
            buckets[math.inf if le == "+Inf" else float(le)] += v
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if b == math.inf:
                return prev_bound
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / (c - prev_count) if c > prev_count else 0)
        prev_bound, prev_count = b, c
    return prev_bound


def psi(expected: dict[str, float], actual: dict[str, float], smoothing: float = 0.5) -> float | None:
    """Population stability index of `actual` against `expected` over the union of their bins.

    Counts get `smoothing` added per bin, so a bin empty on one side by chance does not explode the value.
    """
    bins = set(expected) | set(actual)
    te = sum(expected.values()) + smoothing * len(bins)
    ta = sum(actual.values()) + smoothing * len(bins)
    if sum(expected.values()) <= 0 or sum(actual.values()) <= 0:
        return None
    value = 0.0
    for k in bins:
        pe = (expected.get(k, 0.0) + smoothing) / te
        pa = (actual.get(k, 0.0) + smoothing) / ta
        value += (pa - pe) * math.log(pa / pe)
    return value


def drift(expected: dict[str, float], actual: dict[str, float]) -> float | None:
    """PSI less what sampling alone gives two equal distributions: n_eff * PSI is about chi-square with
    (bins - 1) degrees of freedom, so its expectation (bins - 1) * (1/n1 + 1/n2) is subtracted. Small
    windows then do not fail a good version, and a real shift still shows at full size."""
    value = psi(expected, actual)
    if value is None:
        return None
    bins = len([k for k in set(expected) | set(actual) if expected.get(k, 0) + actual.get(k, 0) > 0])
    floor = (bins - 1) * (1 / sum(expected.values()) + 1 / sum(actual.values()))
    return max(0.0, value - floor)


def bucket_counts(s: Samples, name: str, **match: str) -> dict[str, float]:
    """Cumulative histogram buckets -> per-bucket counts keyed by upper bound."""
    cum: dict[float, float] = defaultdict(float)
    for (n, labels), v in s.items():
        d = dict(labels)
        if n == f"{name}_bucket" and all(d.get(k) == val for k, val in match.items()):
            le = d.get("le", "+Inf")
            cum[math.inf if le == "+Inf" else float(le)] += v
    out: dict[str, float] = {}
    prev = 0.0
    for b in sorted(cum):
        out[str(b)] = cum[b] - prev
        prev = cum[b]
    return out


@dataclass
class Window:
    """Metrics of one revision: `recent` since the previous measurement, `since_start` since the rollout began."""

    recent: Samples = field(default_factory=dict)
    since_start: Samples = field(default_factory=dict)


@dataclass
class Measurement:
    metric: str
    value: float | None
    threshold: str
    samples: float
    verdict: str
    message: str

    def as_status(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": None if self.value is None else round(self.value, 6),
                "threshold": self.threshold, "samples": int(self.samples), "verdict": self.verdict,
                "message": self.message}


def _no_data(metric: str, threshold: str, samples: float, need: float, on_no_data: str) -> Measurement:
    verdict = {"pause": INCONCLUSIVE, "fail": FAIL, "pass": PASS}[on_no_data]
    return Measurement(metric, None, threshold, samples, verdict,
                       f"{metric}: {int(samples)} samples, need {int(need)} (onNoData: {on_no_data})")


def _judge(metric: str, value: float, ok: bool, threshold: str, samples: float) -> Measurement:
    verdict = PASS if ok else FAIL
    sign = "within" if ok else "breaches"
    return Measurement(metric, value, threshold, samples, verdict, f"{metric} {value:.4g} {sign} {threshold}")


def _drift_check(metric: str, limit: float, what: str, stable: dict[str, float], canary: dict[str, float],
                 min_samples: int, on_no_data: str) -> Measurement:
    n = sum(canary.values())
    th = f"max PSI {limit:g}{what}"
    d = drift(stable, canary)
    if n < min_samples or sum(stable.values()) < min_samples or d is None:
        return _no_data(metric, th, n, min_samples, on_no_data)
    return _judge(metric, d, d <= limit, th, n)


def assess(checks: dict[str, Any], canary: Window, stable: Window, min_samples: int,
           on_no_data: str) -> tuple[str, list[Measurement]]:
    """Measures every configured check of the canary (against the stable revision where relative)."""
    out: list[Measurement] = []
    c_req = total(canary.recent, "modelops_requests_total")
    if "errorRate" in checks:
        limit = float(checks["errorRate"]["max"])
        th = f"max {limit:g}"
        if c_req < min_samples:
            out.append(_no_data("errorRate", th, c_req, min_samples, on_no_data))
        else:
            errors = sum(v for (n, labels), v in canary.recent.items()
                         if n == "modelops_requests_total" and dict(labels).get("code", "").startswith("5"))
            out.append(_judge("errorRate", errors / c_req, errors / c_req <= limit, th, c_req))
    if "latency" in checks:
        lat = checks["latency"]
        q = float(lat.get("quantile", 0.99))
        # Since the rollout started, for both revisions (the same window): a high quantile of a few
        # seconds of traffic is just its slowest request. And at least 1/(1-q) samples, so the quantile
        # is not the maximum.
        need = max(min_samples, math.ceil(1 / (1 - q)))
        n = total(canary.since_start, "modelops_request_duration_seconds_count")
        th_parts = []
        if "maxSeconds" in lat:
            th_parts.append(f"max {lat['maxSeconds']:g}s")
        if "maxRatio" in lat:
            th_parts.append(f"max {lat['maxRatio']:g}x stable")
        th = f"p{q * 100:g} " + " and ".join(th_parts)
        s_n = total(stable.since_start, "modelops_request_duration_seconds_count")
        if n < need or ("maxRatio" in lat and s_n < need):
            out.append(_no_data("latency", th, min(n, s_n) if "maxRatio" in lat else n, need, on_no_data))
        else:
            cq = histogram_quantile(q, canary.since_start, "modelops_request_duration_seconds") or 0.0
            ok = "maxSeconds" not in lat or cq <= float(lat["maxSeconds"])
            detail = f"p{q * 100:g} {cq * 1000:.2f}ms"
            value = cq
            if "maxRatio" in lat:
                sq = histogram_quantile(q, stable.since_start, "modelops_request_duration_seconds") or 0.0
                value = cq / sq if sq > 0 else (1.0 if cq == 0 else math.inf)
                ok = ok and value <= float(lat["maxRatio"])
                detail += f", {value:.2f}x stable's {sq * 1000:.2f}ms"
            out.append(Measurement("latency", value, th, n, PASS if ok else FAIL,
                                   f"latency {detail} {'within' if ok else 'breaches'} {th}"))
    if "predictionDrift" in checks:
        def outputs(w: Window) -> dict[str, float]:
            return by_label(w.since_start, "modelops_prediction_class_total", "class") or \
                bucket_counts(w.since_start, "modelops_prediction_value")

        out.append(_drift_check("predictionDrift", float(checks["predictionDrift"]["maxPSI"]), "",
                                outputs(stable), outputs(canary), min_samples, on_no_data))
    if "inputDrift" in checks:
        chk = checks["inputDrift"]

        def feature(w: Window) -> dict[str, float]:
            return bucket_counts(w.since_start, "modelops_feature_value", feature=chk["feature"])

        out.append(_drift_check("inputDrift", float(chk["maxPSI"]), f" on {chk['feature']}", feature(stable),
                                feature(canary), min_samples, on_no_data))
    if "accuracy" in checks:
        chk = checks["accuracy"]
        need = int(chk.get("minLabels", 20))
        labels = total(canary.since_start, "modelops_feedback_total")
        th = f"min {float(chk['min']):g}"
        if labels < need:
            out.append(_no_data("accuracy", th, labels, need, on_no_data))
        else:
            acc = total(canary.since_start, "modelops_feedback_correct_total") / labels
            out.append(_judge("accuracy", acc, acc >= float(chk["min"]), th, labels))
    verdict = max((m.verdict for m in out), key=_ORDER.__getitem__, default=PASS)
    return verdict, out
