"""Reaching Services from the host as kube-proxy would: one loopback address per Service port.

Each new connection goes to the next ready endpoint in turn, so traffic splits between the pods of
a Service in proportion to their ready replicas (stable and canary alike). A Service with no ready
endpoint refuses connections at once, as kube-proxy's REJECT rule does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import threading
from pathlib import Path
from typing import Any

from kubernetes import watch

from .node import Kube

log = logging.getLogger("modelops.local.proxy")


class ServiceProxy:
    def __init__(self, kube: Kube, state_file: Path, host: str = "127.0.0.1") -> None:
        self.kube = kube
        self.state_file = state_file
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.endpoints: dict[tuple[str, str, str], list[tuple[str, int]]] = {}
        self.listeners: dict[tuple[str, str, str], tuple[asyncio.Server, int]] = {}
        self.ports: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._rr: dict[tuple[str, str, str], itertools.count[int]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        t = threading.Thread(target=self.loop.run_forever, daemon=True, name="proxy-loop")
        t.start()
        self._threads.append(t)
        for target in (self._watch_services, self._watch_endpoints):
            w = threading.Thread(target=target, daemon=True, name=target.__name__)
            w.start()
            self._threads.append(w)

    def stop(self) -> None:
        self._stop.set()

        async def close_all() -> None:
            for server, _ in self.listeners.values():
                server.close()
            self.listeners.clear()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        for t in self._threads:
            t.join(timeout=0.5)  # daemon threads; a watch may sit in its 30 s timeout
        with contextlib.suppress(RuntimeError):
            self.loop.close()

    # -- watches ---------------------------------------------------------------------------------
    def _watch(self, list_fn: Any, on_event: Any) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    doc = json.loads(list_fn(_preload_content=False).data)
                    rv = doc["metadata"]["resourceVersion"]
                    for item in doc["items"]:
                        on_event("ADDED", item)
                w = watch.Watch()
                for ev in w.stream(list_fn, resource_version=rv, timeout_seconds=30, _preload_content=False):
                    if self._stop.is_set():
                        w.stop()
                        break
                    if ev["type"] == "ERROR":
                        rv = ""
                        break
                    obj = ev["raw_object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    on_event(ev["type"], obj)
            except Exception as e:
                if not self._stop.is_set():
                    log.debug("Watch restarted: %s", e)
                    rv = ""
                    self._stop.wait(1)

    def _watch_services(self) -> None:
        self._watch(self.kube.core.list_service_for_all_namespaces, self._on_service)

    def _watch_endpoints(self) -> None:
        self._watch(self.kube.core.list_endpoints_for_all_namespaces, self._on_endpoints)

    def _on_service(self, kind: str, svc: dict[str, Any]) -> None:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        ports = [] if kind == "DELETED" else (svc["spec"].get("ports") or [])
        if svc["spec"].get("clusterIP") == "None" or (ns, name) == ("default", "kubernetes"):
            ports = []
        self.ports[(ns, name)] = ports
        wanted = {(ns, name, str(p.get("name") or p["port"])) for p in ports}
        fut = asyncio.run_coroutine_threadsafe(self._sync_listeners(ns, name, wanted, ports), self.loop)
        fut.result(timeout=10)
        self._write_state()

    def _on_endpoints(self, kind: str, ep: dict[str, Any]) -> None:
        ns, name = ep["metadata"]["namespace"], ep["metadata"]["name"]
        found: dict[str, list[tuple[str, int]]] = {}
        if kind != "DELETED":
            for subset in ep.get("subsets") or []:
                addrs = [a["ip"] for a in subset.get("addresses") or []]
                for p in subset.get("ports") or []:
                    key = str(p.get("name") or "")
                    found.setdefault(key, []).extend((ip, int(p["port"])) for ip in addrs)
        for k in [k for k in self.endpoints if k[:2] == (ns, name)]:
            self.endpoints[k] = []
        for port in self.ports.get((ns, name), []):
            pname = str(port.get("name") or "")
            self.endpoints[(ns, name, str(port.get("name") or port["port"]))] = sorted(found.get(pname, []))

    async def _sync_listeners(self, ns: str, name: str, wanted: set[tuple[str, str, str]],
                              ports: list[dict[str, Any]]) -> None:
        for key in [k for k in self.listeners if k[:2] == (ns, name) and k not in wanted]:
            server, _ = self.listeners.pop(key)
            server.close()
        for key in wanted:
            if key in self.listeners:
                continue
            server = await asyncio.start_server(functools.partial(self._handle, key), self.host, 0)
            self.listeners[key] = (server, server.sockets[0].getsockname()[1])
            log.info("Proxied Service %s/%s port %s on %s:%d", ns, name, key[2], self.host, self.listeners[key][1])

    def _write_state(self) -> None:
        state = {f"{k[0]}/{k[1]}/{k[2]}": f"{self.host}:{port}" for k, (_, port) in list(self.listeners.items())
                 if k[1] != "forward"}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)

    def forward(self, host: str, port: int, target_host: str, target_port: int) -> None:
        """A plain TCP forward, e.g. for pods to reach the API server."""
        key = ("", "forward", f"{host}:{port}")

        async def open_forward() -> None:
            self.endpoints[key] = [(target_host, target_port)]
            server = await asyncio.start_server(functools.partial(self._handle, key), host, port)
            self.listeners[key] = (server, port)

        asyncio.run_coroutine_threadsafe(open_forward(), self.loop).result(timeout=10)

    # -- data path -------------------------------------------------------------------------------
    async def _handle(self, key: tuple[str, str, str], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        targets = self.endpoints.get(key) or []
        if not targets:
            writer.close()
            return
        rr = self._rr.setdefault(key, itertools.count())
        ip, port = targets[next(rr) % len(targets)]
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
        except (OSError, TimeoutError):
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if dst.can_write_eof():
                        dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()
