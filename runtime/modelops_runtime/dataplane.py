"""The data plane: validate, queue, batch, run, split, encode. Transports stay thin adapters over it.

One inference thread per model takes whole batches; the event loop never runs ONNX Runtime, so health
checks and metrics answer while a batch computes. With batching on, requests with the same non-batch
shape are merged along dimension 0 while the thread is busy or until `max_delay` passes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codec import InferRequest, decode_request, encode_response
from .errors import DeadlineExceeded, NotReady, TooManyRequests
from .metrics import BATCH_BUCKETS, Registry
from .model import OnnxModel
from .monitoring import Monitor

log = logging.getLogger("modelops.runtime")


@dataclass
class BatchingConfig:
    max_batch_size: int = 1  # rows; 1 turns batching off
    max_delay: float = 0.002  # seconds the oldest request may wait for a batch to fill
    max_queue: int = 1024  # requests waiting; beyond it requests get 503 + Retry-After
    timeout: float = 30.0  # seconds from arrival to answer; then 504
    # Models whose single-row run takes less than this run on the event loop itself when batching is
    # off: a thread hand-off costs more than such a model's inference, and health checks wait at most
    # this long. Slower models always run on the inference thread.
    inline_below: float = 0.001


class _Pending:
    __slots__ = ("batch_size", "deadline", "enqueued", "future", "key", "req", "started")

    def __init__(self, req: InferRequest, future: asyncio.Future[Any], now: float, deadline: float) -> None:
        self.req = req
        self.future = future
        self.enqueued = now
        self.deadline = deadline
        self.key = tuple((n, a.shape[1:], a.dtype.str) for n, a in req.inputs.items())
        self.started = 0.0
        self.batch_size = 0


@dataclass(slots=True)
class Result:
    outputs: list[np.ndarray]
    prediction: np.ndarray
    queue_wait: float
    inference: float
    batch_size: int


class Batcher:
    def __init__(self, model: OnnxModel, monitor: Monitor, cfg: BatchingConfig, registry: Registry) -> None:
        self.model = model
        self.monitor = monitor
        self.cfg = cfg
        self.pending: deque[_Pending] = deque()
        self.busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"infer-{model.name}", daemon=True)
        lbl = (model.name, model.version)
        self._queue_wait = registry.histogram(
            "modelops_queue_wait_seconds", "Time requests waited in the queue.", ("model", "version")).labels(*lbl)
        self._infer_time = registry.histogram(
            "modelops_inference_duration_seconds", "ONNX Runtime time per batch.", ("model", "version")).labels(*lbl)
        self._batch_size = registry.histogram(
            "modelops_batch_size", "Rows per executed batch.", ("model", "version"), buckets=BATCH_BUCKETS
        ).labels(*lbl)
        self._queue_depth = registry.gauge(
            "modelops_queue_depth", "Requests waiting for the inference thread.", ("model", "version")).labels(*lbl)
        self._sweeper: asyncio.Task[None] | None = None
        self.inline = False

    @property
    def batching(self) -> bool:
        return self.cfg.max_batch_size > 1 and self.model.batchable

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self.batching and self.model.loaded and self.cfg.inline_below > 0:
            feeds = self.model.example_inputs()
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                self.model.run(feeds)
                runs.append(time.perf_counter() - t0)
            self.inline = max(runs) < self.cfg.inline_below
            log.info("Measured model %s at %.3f ms per row; inference runs %s", self.model.name, max(runs) * 1000,
                     "on the event loop" if self.inline else "on its own thread")
        self._thread.start()
        self._sweeper = loop.create_task(self._sweep())

    def stop(self) -> None:
        self._jobs.put(None)
        if self._sweeper:
            self._sweeper.cancel()
        self._thread.join(timeout=10)

    def idle(self) -> bool:
        return not self.busy and not self.pending

    # -- loop side -------------------------------------------------------------------------------
    def submit(self, req: InferRequest, timeout: float | None = None) -> asyncio.Future[Result] | Result:
        """A Result at once when the model runs inline and nothing waits; else a future."""
        if self.inline and not self.pending and not self.busy:
            now = time.perf_counter()
            outputs, pred, elapsed = self._execute_one(req.inputs)
            if isinstance(outputs, BaseException):
                raise outputs
            assert pred is not None
            self._infer_time.observe(elapsed)
            self._batch_size.observe(req.rows)
            self._queue_wait.observe(0.0)
            return Result(outputs, pred, 0.0, elapsed, req.rows)
        if len(self.pending) >= self.cfg.max_queue:
            raise TooManyRequests(f"queue is full ({self.cfg.max_queue} requests waiting); retry later")
        loop = self._loop
        assert loop is not None
        now = time.perf_counter()
        fut: asyncio.Future[Result] = loop.create_future()
        self.pending.append(_Pending(req, fut, now, now + (timeout or self.cfg.timeout)))
        self._queue_depth.value = len(self.pending)
        self._dispatch()
        return fut

    def _dispatch(self) -> None:
        if self.busy or not self.pending:
            return
        now = time.perf_counter()
        pending = self.pending
        while pending and pending[0].deadline <= now:
            self._expire(pending.popleft())
        if not pending:
            self._queue_depth.value = 0
            return
        if not self.batching:
            batch = [pending.popleft()]
        else:
            first = pending[0]
            queued_rows = sum(p.req.rows for p in pending)
            if queued_rows < self.cfg.max_batch_size and now - first.enqueued < self.cfg.max_delay:
                if self._timer is None:
                    assert self._loop is not None
                    self._timer = self._loop.call_at(
                        self._loop.time() + (first.enqueued + self.cfg.max_delay - now), self._on_timer)
                return
            batch = self._take_batch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue_depth.value = len(pending)
        self.busy = True
        for p in batch:
            p.started = now
        if self.inline:
            self._complete(batch, *self._execute(batch))
        else:
            self._jobs.put(batch)

    def _take_batch(self) -> list[_Pending]:
        first = self.pending.popleft()
        batch = [first]
        rows = first.req.rows
        keep: deque[_Pending] = deque()
        while self.pending and rows < self.cfg.max_batch_size:
            p = self.pending.popleft()
            if p.key == first.key and rows + p.req.rows <= self.cfg.max_batch_size:
                batch.append(p)
                rows += p.req.rows
            else:
                keep.append(p)
        keep.extend(self.pending)
        self.pending = keep
        return batch

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _expire(self, p: _Pending) -> None:
        if not p.future.done():
            p.future.set_exception(DeadlineExceeded(
                f"request {p.req.id} waited {time.perf_counter() - p.enqueued:.3f}s, past its deadline"))

    async def _sweep(self) -> None:
        # Expired requests still in the queue are answered 504 without waiting for the thread.
        while True:
            await asyncio.sleep(0.05)
            if not self.pending:
                continue
            now = time.perf_counter()
            if any(p.deadline <= now for p in self.pending):
                live: deque[_Pending] = deque()
                for p in self.pending:
                    if p.deadline <= now:
                        self._expire(p)
                    else:
                        live.append(p)
                self.pending = live
                self._queue_depth.value = len(live)

    def _complete(self, batch: list[_Pending], outputs: list[np.ndarray] | BaseException,
                  pred: np.ndarray | None, elapsed: float) -> None:
        self.busy = False
        rows_total = sum(p.req.rows for p in batch)
        if isinstance(outputs, BaseException):
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(outputs)
        else:
            assert pred is not None
            self._infer_time.observe(elapsed)
            self._batch_size.observe(rows_total)
            offset = 0
            for p in batch:
                self._queue_wait.observe(p.started - p.enqueued)
                if len(batch) == 1:
                    outs, pr = outputs, pred
                else:
                    n = p.req.rows
                    outs = [o[offset:offset + n] for o in outputs]
                    pr = pred[offset:offset + n]
                    offset += n
                if not p.future.done():
                    p.future.set_result(Result(outs, pr, p.started - p.enqueued, elapsed, rows_total))
        self._dispatch()

    # -- inference thread ------------------------------------------------------------------------
    def _execute(self, batch: list[_Pending]) -> tuple[list[np.ndarray] | BaseException, np.ndarray | None, float]:
        if len(batch) == 1:
            return self._execute_one(batch[0].req.inputs)
        names = list(batch[0].req.inputs)
        return self._execute_one({n: np.concatenate([p.req.inputs[n] for p in batch]) for n in names})

    def _execute_one(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray] | BaseException,
                                                                  np.ndarray | None, float]:
        pred: np.ndarray | None = None
        t0 = time.perf_counter()
        try:
            outputs: list[np.ndarray] | BaseException = self.model.run(feeds)
            elapsed = time.perf_counter() - t0
            assert isinstance(outputs, list)
            self.monitor.observe_inputs(feeds)
            pred = self.monitor.predictions(outputs)
        except Exception as e:  # reported to each waiting request, never kills the thread or the loop
            log.exception("Failed inference of model %s", self.model.name)
            outputs = e
            elapsed = time.perf_counter() - t0
        return outputs, pred, elapsed

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            batch = jobs.get()
            if batch is None:
                return
            result = self._execute(batch)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._complete, batch, *result)


class DataPlane:
    def __init__(self, model: OnnxModel, monitor: Monitor, batcher: Batcher) -> None:
        self.model = model
        self.monitor = monitor
        self.batcher = batcher
        self.draining = False

    def ready(self) -> bool:
        return self.model.ready and not self.draining

    def submit(self, body: bytes, header_length: int | None) -> tuple[InferRequest, asyncio.Future[Result] | Result]:
        if not self.model.ready:
            raise NotReady(f"model {self.model.name} is not ready: {self.model.not_ready_reason}")
        m = self.model
        req = decode_request(body, header_length, m.input_by_name, m.output_names, m.batchable)
        timeout = req.parameters.get("timeout")
        return req, self.batcher.submit(req, float(timeout) if isinstance(timeout, (int, float)) and timeout > 0
                                        else None)

    def respond(self, req: InferRequest, result: Result) -> tuple[bytes, int | None]:
        m = self.model
        self.monitor.remember(req.id, result.prediction)
        if req.outputs is None:
            names, arrays = m.output_names, result.outputs
        else:
            index = {n: i for i, n in enumerate(m.output_names)}
            names, arrays = req.outputs, [result.outputs[index[n]] for n in req.outputs]
        return encode_response(m.name, m.version, req.id, names, arrays, req.binary_outputs)
