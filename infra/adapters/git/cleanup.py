"""Retention cleanup of an agent's finished task workspaces (:func:`cleanup_expired`)
and the tree removal it shares with :class:`~infra.adapters.git.workspace.Workspace`
(:func:`remove_tree`)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("ccc.workspace")


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only trees (Go's module cache is chmod -w)."""

    def onerror(func: Any, p: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(p), stat.S_IRWXU)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, stat.S_IRWXU)
        func(p)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    return None


def cleanup_expired(
    root: Path | str,
    agent_id: str,
    retention_seconds: float,
    now: datetime | float | None = None,
) -> list[Path]:
    """Remove this agent's finished task workspaces whose ``finished_at`` is older than
    the retention; returns the removed paths. Unfinished workspaces (no ``finished_at``,
    or unreadable metadata) are kept: an attempt may still be running, or a crashed one
    may be worth inspecting; deleting on a guess would be worse than using disk."""
    if isinstance(now, datetime):
        now_ts = (now if now.tzinfo else now.replace(tzinfo=UTC)).timestamp()
    else:
        now_ts = time.time() if now is None else float(now)
    tasks = Path(root) / agent_id / "tasks"
    removed: list[Path] = []
    if not tasks.is_dir():
        return removed
    for entry in sorted(tasks.iterdir()):
        if not entry.name.startswith("task-") or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            meta = json.loads((entry / "metadata.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        finished = _timestamp(meta.get("finished_at")) if isinstance(meta, dict) else None
        if finished is None or now_ts - finished < retention_seconds:
            continue
        try:
            remove_tree(entry)
        except OSError as exc:
            log.warning("workspace_cleanup_failed", path=str(entry), error=str(exc))
            continue
        removed.append(entry)
    if removed:
        log.info("workspaces_cleaned", agent_id=agent_id, count=len(removed))
    return removed
