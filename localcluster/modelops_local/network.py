"""Pod networking for the process node: one network namespace per pod on a bridge.

Each pod gets its own namespace (so two pods can both listen on 0.0.0.0:8080), a veth pair into a
bridge, and an address in a /16 that only exists on this machine. The host end of the bridge is the
address pods use to reach servers on the host. A blackhole route for the same /16 (lower priority
than the bridge's) keeps traffic for pod addresses on this machine even after the bridge is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
import threading

from .procs import LocalClusterError


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LocalClusterError("iproute2 is not installed (apt-get install iproute2)") from e
    if check and res.returncode != 0:
        raise LocalClusterError(f"ip {' '.join(args)} failed: {res.stderr.strip()} (the process node needs root)")
    return res


class PodNetwork:
    def __init__(self) -> None:
        self.id = secrets.token_hex(3)
        self.bridge = f"mob{self.id}"
        routes = _ip("route", "show").stdout
        for second in range(200, 250):
            if f"10.{second}." not in routes:
                break
        else:
            raise LocalClusterError("no free 10.200-249.0.0/16 range for pod addresses")
        self.subnet = ipaddress.ip_network(f"10.{second}.0.0/16")
        self.host_ip = str(self.subnet.network_address + 1)
        self._next = 2
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._up = False

    def setup(self) -> None:
        _ip("route", "add", "blackhole", str(self.subnet), "metric", "4000")
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.host_ip}/16", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def teardown(self) -> None:
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            _ip("route", "del", "blackhole", str(self.subnet), "metric", "4000", check=False)
            self._up = False

    def add_pod(self, key: str) -> tuple[str, str]:
        """Creates the pod's namespace; returns (namespace name, pod IP)."""
        with self._lock:
            n = self._free.pop() if self._free else self._next
            if n == self._next:
                self._next += 1
        if n >= 65534:
            raise LocalClusterError("out of pod addresses")
        ip = str(self.subnet.network_address + n)
        ns = f"mop{self.id}{n:x}"
        host_if, pod_if = f"mh{self.id}{n:x}", f"mp{self.id}{n:x}"
        _ip("netns", "add", ns)
        try:
            _ip("link", "add", host_if, "type", "veth", "peer", "name", pod_if)
            _ip("link", "set", pod_if, "netns", ns)
            _ip("link", "set", host_if, "master", self.bridge)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{ip}/16", "dev", pod_if)
            _ip("-n", ns, "link", "set", pod_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.host_ip)
        except LocalClusterError:
            self.remove_pod(ns, ip)
            raise
        return ns, ip

    def remove_pod(self, ns: str, ip: str) -> None:
        _ip("netns", "del", ns, check=False)  # deleting the namespace deletes its veth pair
        with contextlib.suppress(ValueError), self._lock:
            self._free.append(int(ipaddress.ip_address(ip)) - int(self.subnet.network_address))
