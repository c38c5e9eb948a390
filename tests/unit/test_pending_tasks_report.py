"""The report of pending asyncio tasks a stuck stop prints: where each task waits, innermost first."""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.timeout(10)
async def test_pending_tasks_report_says_where_each_task_waits():
    """A stop that does not finish tells the operator what it waits on: the innermost
    awaits of every pending task, not just the outermost frame."""
    from infra.shell.app.signals import pending_tasks_report

    gate = asyncio.Event()

    async def leaf() -> None:
        await gate.wait()

    async def middle() -> None:
        await leaf()

    task = asyncio.create_task(middle(), name="stuck-stop")
    await asyncio.sleep(0)
    report = pending_tasks_report(depth=4)
    line = next(line for line in report.splitlines() if "stuck-stop" in line)
    assert "leaf" in line and "middle" in line and "wait" in line
    assert line.index("wait") < line.index("leaf") < line.index("middle")  # innermost first
    gate.set()
    await task
    assert "stuck-stop" not in pending_tasks_report()
