"""Runs argocd/health.lua the way Argo CD does: Lua 5.1, `obj` as a global table, returns {status, message}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCRIPT = (Path(__file__).resolve().parent.parent / "argocd" / "health.lua").read_text()


def health(obj: dict[str, Any]) -> tuple[str, str]:
    from lupa.lua51 import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    fn = lua.eval("function(obj) " + SCRIPT + " end")
    hs = fn(lua.table_from(_plain(obj), recursive=True))
    return str(hs["status"]), str(hs["message"])


def _plain(value: Any) -> Any:
    # Lua tables are 1-indexed: lists become sequences via table_from(recursive=True).
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
