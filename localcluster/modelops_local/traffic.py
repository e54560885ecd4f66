"""Steady client traffic through a Service address, as users send it: for the demo and the e2e tests.

A new connection per request, so connections spread over pods the way kube-proxy spreads them; with a
labeller, the true label is fed back on the same connection (so it reaches the pod that answered).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np


class Load:
    def __init__(self, url: str, model: str = "fraud", labeller: Any = None, rate: float = 40,
                 threads: int = 4, width: int = 256) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.model = model
        self.labeller = labeller  # an onnxruntime session whose argmax is the "true" label
        self.period = threads / rate
        self.width = width
        self.codes: Counter[Any] = Counter()
        self.latencies: list[float] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)

    def _run(self, i: int) -> None:
        rng = np.random.default_rng(i)
        path = f"/v2/models/{self.model}"
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            x = rng.standard_normal((1, self.width)).astype(np.float32)
            rid = uuid.uuid4().hex
            body = json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, self.width], "datatype": "FP32",
                                                      "data": x.ravel().tolist()}]})
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=10)
                c.request("POST", f"{path}/infer", body, {"content-type": "application/json"})
                r = c.getresponse()
                r.read()
                self.codes[r.status] += 1
                self.latencies.append(time.monotonic() - t0)
                if r.status == 200 and self.labeller is not None:
                    label = int(np.argmax(self.labeller.run(None, {"x": x})[0]))
                    c.request("POST", f"{path}/feedback", json.dumps({"id": rid, "label": label}),
                              {"content-type": "application/json"})
                    c.getresponse().read()
                c.close()
            except OSError as e:
                self.codes[type(e).__name__] += 1
            time.sleep(max(0.0, self.period - (time.monotonic() - t0)))
