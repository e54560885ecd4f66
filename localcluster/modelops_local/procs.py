"""Starting and stopping child processes by PID, with clear errors instead of hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class LocalClusterError(Exception):
    """A problem the user can fix; the message names the fix."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start(args: Sequence[str], log: Path, env: dict[str, str] | None = None, new_session: bool = True,
          **kw: object) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=new_session, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise LocalClusterError(f"cannot run {args[0]}: {e.strerror}") from e
    finally:
        out.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_pid(pid: int, grace: float = 10.0, group: bool = True) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL; signals the process group when the child leads one."""
    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    if not alive(pid):
        _reap(pid)
        return
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            return
        time.sleep(0.05)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid):
        _reap(pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def wait_for(what: str, check: Callable[[], bool], timeout: float, log: Path | None = None,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LocalClusterError(f"{what} exited with code {proc.returncode}; {_tail(log)}")
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, TLS not ready, ...
            pass
        time.sleep(0.1)
    raise LocalClusterError(f"{what} was not ready after {timeout:.0f}s; {_tail(log)}")


def _tail(log: Path | None, lines: int = 5) -> str:
    if log is None or not log.exists():
        return "no log"
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return f"last lines of {log}:\n  " + "\n  ".join(text)
