"""Standard status conditions; lastTransitionTime changes only when a condition's status does."""

from __future__ import annotations

from typing import Any


def set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str, message: str,
                  now: str) -> list[dict[str, Any]]:
    value = "True" if status else "False"
    out = []
    found = False
    for c in conditions:
        if c.get("type") == kind:
            found = True
            when = c.get("lastTransitionTime", now) if c.get("status") == value else now
            out.append({"type": kind, "status": value, "reason": reason, "message": message,
                        "lastTransitionTime": when})
        else:
            out.append(c)
    if not found:
        out.append({"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": now})
    return out


def get_condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)
