"""Shared fixtures: the local control plane (session-scoped), model files and a host file server."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import file_server


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    """A real Kubernetes 1.20 control plane with the process node, for the whole session."""
    from modelops_local.cluster import shutdown, spawn
    from modelops_local.procs import LocalClusterError

    workdir = Path(tempfile.mkdtemp(prefix="modelops-e2e-"))
    try:
        proc, state = spawn(workdir)
    except LocalClusterError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"the local control plane did not start: {e}")
    state["dir"] = str(workdir)
    state["pid"] = proc.pid
    try:
        yield state
    finally:
        shutdown(proc.pid, state)
        proc.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def kube(cluster: dict[str, Any]) -> Any:
    from kubernetes import config

    return config.new_client_from_config(cluster["kubeconfig"])


@pytest.fixture(scope="session")
def services(cluster: dict[str, Any]) -> Any:
    """Returns a function NAMESPACE/SERVICE -> host URL through the local service proxy."""
    from modelops_local.cli import service_url

    def url(ref: str) -> str | None:
        try:
            known = json.loads((Path(cluster["dir"]) / "services.json").read_text())
        except (OSError, ValueError):
            return None
        return service_url(known, ref)

    return url


@pytest.fixture(scope="session")
def model_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="modelops-models-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def model_server(model_dir: Path) -> Iterator[int]:
    """An HTTP server on the host serving model_dir; pods reach it at http://<host ip>:<port>/."""
    with file_server(model_dir) as port:
        yield port
