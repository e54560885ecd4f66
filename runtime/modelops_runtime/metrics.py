"""A small Prometheus registry tuned for the hot path.

Children are resolved once (``counter.labels(...)``) and then updated with plain attribute
arithmetic, so recording a request costs well under a microsecond. Rendering follows the
Prometheus text exposition format 0.0.4.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: fine below a millisecond, where this server lives.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))


def _labelstr(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}

    def _new_child(self) -> object:
        raise NotImplementedError

    def labels(self, *values: str) -> object:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
            child = self._new_child()
            self._children[key] = child
        return child

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, child in list(self._children.items()):
            yield from self._render_child(key, child)

    def _render_child(self, key: tuple[str, ...], child: object) -> Iterable[str]:
        yield f"{self.name}{_labelstr(self.labelnames, key)} {_fmt(child.value)}"  # type: ignore[attr-defined]

    def samples(self) -> dict[tuple[str, ...], object]:
        return self._children


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Counter(_Metric):
    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def labels(self, *values: str) -> CounterChild:
        return super().labels(*values)  # type: ignore[return-value]


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class Gauge(_Metric):
    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def labels(self, *values: str) -> GaugeChild:
        return super().labels(*values)  # type: ignore[return-value]


class HistogramChild:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def observe_many(self, per_bucket: Any, total: float) -> None:
        """Adds pre-bucketed counts (as numpy's searchsorted + bincount give them)."""
        counts = self.counts
        n = 0
        for i, c in enumerate(per_bucket):
            if c:
                counts[i] += int(c)
                n += int(c)
        self.count += n
        self.sum += total


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != math.inf))

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def labels(self, *values: str) -> HistogramChild:
        return super().labels(*values)  # type: ignore[return-value]

    def _render_child(self, key: tuple[str, ...], child: object) -> Iterable[str]:
        assert isinstance(child, HistogramChild)
        cumulative = 0
        for bound, c in zip((*child.bounds, math.inf), child.counts, strict=True):
            cumulative += c
            le = 'le="' + _fmt(bound) + '"'
            yield f"{self.name}_bucket{_labelstr(self.labelnames, key, le)} {cumulative}"
        yield f"{self.name}_sum{_labelstr(self.labelnames, key)} {_fmt(child.sum)}"
        yield f"{self.name}_count{_labelstr(self.labelnames, key)} {child.count}"


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        m = Counter(name, help_text, labelnames)
        self.register(m)
        return m

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        m = Gauge(name, help_text, labelnames)
        self.register(m)
        return m

    def histogram(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        m = Histogram(name, help_text, labelnames, buckets)
        self.register(m)
        return m

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self._metrics:
            lines.extend(m.render())
        return ("\n".join(lines) + "\n").encode()
