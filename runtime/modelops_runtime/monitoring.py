"""What the model sees and says: input checks, feature histograms, prediction histograms, feedback.

Everything here works on whole batches with numpy and runs in the inference thread, so the event
loop pays nothing for it. Label values are bounded: classes beyond `max_classes` count as "other".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequest, NotFound
from .metrics import HistogramChild, Registry

DEFAULT_VALUE_BUCKETS = (-10.0, -5.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class FeatureSpec:
    input: str
    column: int
    buckets: tuple[float, ...] = DEFAULT_VALUE_BUCKETS

    @property
    def label(self) -> str:
        return f"{self.input}:{self.column}"


@dataclass
class MonitoringConfig:
    task: str = "auto"  # auto | classification | regression
    prediction_output: str | None = None  # default: the model's first output
    value_buckets: tuple[float, ...] = DEFAULT_VALUE_BUCKETS
    max_classes: int = 100
    features: list[FeatureSpec] = field(default_factory=list)
    # Reference profile: input name -> {"min": float | [per column], "max": float | [per column]}
    profile: dict[str, dict[str, Any]] = field(default_factory=dict)
    feedback_cache_size: int = 100_000

    @staticmethod
    def parse_features(text: str, buckets: tuple[float, ...] = DEFAULT_VALUE_BUCKETS) -> list[FeatureSpec]:
        """Parses "x:0,x:3" (input:column pairs)."""
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, col = part.rpartition(":")
            if not name or not col.isdigit():
                raise ValueError(f"feature '{part}' must be INPUT:COLUMN, e.g. x:0")
            out.append(FeatureSpec(name, int(col), buckets))
        return out


class Monitor:
    def __init__(
        self, cfg: MonitoringConfig, registry: Registry, model: str, version: str, input_names: list[str],
        output_names: list[str],
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.version = version
        self.output_index = output_names.index(cfg.prediction_output) if cfg.prediction_output else 0
        for f in cfg.features:
            if f.input not in input_names:
                raise ValueError(f"monitored feature {f.label}: the model has no input '{f.input}'")
        for name in cfg.profile:
            if name not in input_names:
                raise ValueError(f"reference profile names input '{name}', which the model does not have")
        lbl = (model, version)
        rows = registry.counter("modelops_input_rows_total", "Rows received per input.", ("model", "version", "input"))
        nan = registry.counter("modelops_input_nan_total", "NaN values received per input.",
                               ("model", "version", "input"))
        inf = registry.counter("modelops_input_inf_total", "Infinite values received per input.",
                               ("model", "version", "input"))
        oor = registry.counter(
            "modelops_input_out_of_range_total",
            "Values outside the reference profile's [min, max] per input.", ("model", "version", "input"),
        )
        self._inputs = {n: (rows.labels(*lbl, n), nan.labels(*lbl, n), inf.labels(*lbl, n), oor.labels(*lbl, n))
                        for n in input_names}
        self._profile = {
            n: (np.asarray(p.get("min", -np.inf), dtype=np.float64), np.asarray(p.get("max", np.inf), dtype=np.float64))
            for n, p in cfg.profile.items()
        }
        fh = registry.histogram("modelops_feature_value", "Values of monitored input features.",
                                ("model", "version", "feature"), buckets=DEFAULT_VALUE_BUCKETS)
        self._features: list[tuple[FeatureSpec, np.ndarray, HistogramChild]] = []
        for f in cfg.features:
            child = HistogramChild(tuple(sorted(f.buckets)))
            fh._children[(model, version, f.label)] = child
            self._features.append((f, np.asarray(child.bounds), child))
        self._classes = registry.counter(
            "modelops_prediction_class_total", "Predicted classes (top-1).", ("model", "version", "class")
        )
        self._class_children: dict[int, Any] = {}
        vh = registry.histogram("modelops_prediction_value", "Predicted values (regression).",
                                ("model", "version"), buckets=cfg.value_buckets)
        self._values = vh.labels(*lbl)
        self._value_bounds = np.asarray(self._values.bounds)
        self._fb_total = registry.counter("modelops_feedback_total", "Labels fed back and matched to a prediction.",
                                          ("model", "version")).labels(*lbl)
        self._fb_correct = registry.counter("modelops_feedback_correct_total",
                                            "Fed-back labels equal to the predicted class.",
                                            ("model", "version")).labels(*lbl)
        self._fb_abs = registry.counter("modelops_feedback_absolute_error_sum",
                                        "Sum of |label - prediction| over fed-back values (regression).",
                                        ("model", "version")).labels(*lbl)
        self._fb_unmatched = registry.counter("modelops_feedback_unmatched_total",
                                              "Feedback whose request id was unknown or expired.",
                                              ("model", "version")).labels(*lbl)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._classification: bool | None = {"classification": True, "regression": False}.get(cfg.task)

    # -- inputs ----------------------------------------------------------------------------------
    def observe_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        for name, arr in feeds.items():
            rows_c, nan_c, inf_c, oor_c = self._inputs[name]
            rows_c.value += arr.shape[0] if arr.ndim else 1
            if arr.dtype.kind != "f":
                continue
            # One reduction on the common path: NaN and Inf propagate into the sum (a float32 overflow
            # only sends us down the exact path, which then counts zero).
            if not math.isfinite(float(arr.sum())):
                nan_c.value += int(np.isnan(arr).sum())
                inf_c.value += int(np.isinf(arr).sum())
            profile = self._profile.get(name)
            if profile is not None:
                lo, hi = profile
                oor_c.value += int(np.count_nonzero((arr < lo) | (arr > hi)))
        for f, bounds, child in self._features:
            arr = feeds[f.input]
            col = arr.reshape(arr.shape[0], -1)[:, f.column] if arr.ndim > 1 else arr
            col = col[np.isfinite(col)]
            if col.size:
                child.observe_many(np.bincount(np.searchsorted(bounds, col, side="left"),
                                               minlength=len(bounds) + 1), float(col.sum()))

    # -- predictions -----------------------------------------------------------------------------
    def predictions(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Returns one prediction per row (class index or value) of the monitored output and counts it."""
        y = outputs[self.output_index]
        rows = y.shape[0] if y.ndim else 1
        flat = y.reshape(rows, -1)
        if self._classification is None:
            self._classification = y.dtype.kind in "iub" or flat.shape[1] > 1
        if self._classification:
            pred = flat[:, 0].astype(np.int64) if y.dtype.kind in "iub" else flat.argmax(axis=1)
            if rows == 1:
                self._class(int(pred[0])).value += 1
            else:
                values, counts = np.unique(pred, return_counts=True)
                for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                    self._class(v).value += c
            return pred
        vals = flat[:, 0].astype(np.float64)
        finite = vals[np.isfinite(vals)]
        self._values.observe_many(
            np.bincount(np.searchsorted(self._value_bounds, finite, side="left"), minlength=len(self._value_bounds) + 1),
            float(finite.sum()),
        )
        return vals

    def _class(self, cls: int) -> Any:
        child = self._class_children.get(cls)
        if child is None:
            label = str(cls) if len(self._class_children) < self.cfg.max_classes else "other"
            child = self._classes.labels(self.model, self.version, label)
            if label != "other":
                self._class_children[cls] = child
        return child

    # -- feedback --------------------------------------------------------------------------------
    def remember(self, req_id: str, pred: np.ndarray) -> None:
        cache = self._cache
        cache[req_id] = pred
        if len(cache) > self.cfg.feedback_cache_size:
            cache.popitem(last=False)

    def feedback(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise BadRequest("feedback must be a JSON object with a string 'id' and a 'label' (or 'labels')")
        label = doc.get("labels", doc.get("label"))
        if label is None:
            raise BadRequest("feedback needs 'label' (one value, or one per row) or 'labels'")
        pred = self._cache.get(doc["id"])
        if pred is None:
            self._fb_unmatched.value += 1
            raise NotFound(f"request id '{doc['id']}' is unknown or expired from the feedback cache")
        try:
            truth = np.asarray(label if isinstance(label, list) else [label], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise BadRequest("'label' must be a number or a list of numbers") from None
        if truth.size != pred.size:
            raise BadRequest(f"{truth.size} labels for a request of {pred.size} rows")
        del self._cache[doc["id"]]
        self._fb_total.value += int(truth.size)
        if self._classification:
            correct = int(np.count_nonzero(truth == pred))
            self._fb_correct.value += correct
            return {"id": doc["id"], "rows": int(truth.size), "correct": correct}
        err = float(np.abs(truth - pred).sum())
        self._fb_abs.value += err
        return {"id": doc["id"], "rows": int(truth.size), "absolute_error": err}
