"""Stopping asyncio tasks so that a stop always ends.

``task.cancel(); await task`` waits for ever if the task swallows the cancellation,
and on Python 3.11 that happens without anyone writing ``except CancelledError``:
``asyncio.wait_for`` returns the inner result instead of raising when the inner
awaitable completes in the same loop step as the cancel (CPython gh-86296, fixed in
3.12), and client libraries catch it in places. A loop around such a call then goes
on, and a shutdown that awaits it hangs; a ``wait_for`` around a coroutine that does
not honour its cancel hangs in the same way. These helpers cancel again until the
task ends, and give up (loudly) after a deadline instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import structlog

log = structlog.get_logger("ccc.aio")

T = TypeVar("T")


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future | None], timeout: float = 5.0, *, recancel: float | None = 0.2,
) -> set[asyncio.Future]:
    """Cancel ``tasks`` and wait for them to end, cancelling again every ``recancel``
    seconds (a cancel can be swallowed). ``recancel=None`` cancels once: for tasks that
    do real work when cancelled (an agent handing its task back) and must not be
    interrupted in it. Returns the ones still running after ``timeout``; those are
    abandoned and logged. Their results and exceptions are consumed."""
    tasks = [t for t in tasks if t is not None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    first = True
    while pending:
        if first or recancel is not None:
            for t in pending:
                t.cancel()
        first = False
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=left if recancel is None else min(recancel, left))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" at exit
    if pending:
        log.warning("aio.tasks_abandoned", timeout=timeout,
                    tasks=[t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in pending])
    return pending


async def within(aw: Awaitable[T], timeout: float) -> T:
    """``asyncio.wait_for`` that cannot hang: on timeout the inner task is cancelled
    (with :func:`cancel_and_wait`, bounded) and ``TimeoutError`` raised even if it
    does not end. A cancel of the caller is passed on to the inner task."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await cancel_and_wait([task], timeout=1.0)
        raise
    if not done:
        await cancel_and_wait([task], timeout=1.0)
        raise TimeoutError(f"not done within {timeout}s")
    return task.result()


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it was set. Unlike
    ``wait_for(event.wait(), timeout)`` on 3.11, a cancel that comes in the same step
    as the event is never swallowed (a loop around it would otherwise go on after
    its stop)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)
