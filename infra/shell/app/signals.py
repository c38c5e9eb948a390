"""Signals for every command that runs until stopped (``server``, ``up``, ``agent``,
``api``, ``webhook``, ``events --follow``): one helper, :class:`StopSignals`, and
:func:`until_signal` on top of it for a command with nothing to hand back.

The first SIGINT/SIGTERM starts a graceful stop; the second says "now" (running
tasks are handed back at once); any later one also prints what the stop is still
waiting on (every pending asyncio task with where it is suspended), as does a stop
still running after its deadline, so a shutdown that does not finish tells the
operator, and a failed CI run, why."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

import click


class StopSignals:
    """SIGINT/SIGTERM for the whole life of a long-running command.

    The first signal ends :meth:`wait`, or cancels the start-up if it comes earlier.
    Later ones, and any during :meth:`cleanup`, call ``hurry`` (running tasks are
    handed back now instead of after the grace period) and never interrupt the
    cleanup: a second Ctrl-C must not abandon the shutdown half way, leaving the
    nats-server (in its own session) and workspace commands running, and nats.url
    pointing at them."""

    def __init__(self, hurry: Callable[[], None] | None = None) -> None:
        self.hurry = hurry
        self.received = 0
        self._phase = "starting"  # -> "running" (in wait) -> "stopping" (in cleanup)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._installed: list[int] = []

    def __enter__(self) -> StopSignals:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal)
                self._installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._forget_own_cancel()

    def _forget_own_cancel(self) -> None:
        """The first signal cancelled the start-up (and the code caught it): the task
        goes on as if never cancelled, so a later ``asyncio.timeout`` works as usual."""
        if self.received and self._task is not None and self._task.cancelling():
            self._task.uncancel()

    def _on_signal(self) -> None:
        self.received += 1
        if self.received == 1 and self._phase != "stopping":
            self._stop.set()
            if self._phase == "starting" and self._task is not None:
                self._task.cancel()
            return
        if self.hurry is not None:
            click.echo("stopping now: running tasks are handed back", err=True)
            self.hurry()
        if self.received >= 3 or (self.hurry is None and self._phase == "stopping"):
            click.echo("still stopping; waiting on:\n" + pending_tasks_report(), err=True)

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the first signal (True), or for at most ``timeout`` seconds (False):
        a command that watches something else meanwhile waits in slices."""
        self._phase = "running"
        if timeout is None:
            await self._stop.wait()
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._stop.wait()
        return self._stop.is_set()

    async def cleanup(self, coro: Awaitable, report_after: float = 15.0) -> None:
        """Run the shutdown in full. If it is still running after ``report_after``
        seconds (and every so often after that), say what it is waiting on."""
        self._phase = "stopping"
        self._forget_own_cancel()  # our own cancel of the start-up: the cleanup runs in full
        watchdog = asyncio.create_task(_report_stall(report_after), name="shutdown-watchdog")
        try:
            await coro
        finally:
            watchdog.cancel()


async def until_signal(coro: Awaitable) -> bool:
    """Run ``coro`` until it ends, or until the first SIGINT/SIGTERM cancels it (then
    True). Later signals, while ``coro`` unwinds, do not cut its clean-up short."""
    with StopSignals() as signals:  # never in wait(): the first signal cancels coro
        try:
            await coro
        except asyncio.CancelledError:
            if not signals.received:
                raise  # not a signal of ours
    return signals.received > 0


async def _report_stall(after: float) -> None:
    started = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(after)
        waited = asyncio.get_running_loop().time() - started
        click.echo(f"still stopping after {waited:.0f}s; waiting on:\n{pending_tasks_report()}", err=True)


async def settle(task: asyncio.Future | None, then: Awaitable) -> None:
    """Let a cancelled task finish its own cleanup, then run ``then``."""
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await then


def suspended_at(coro: object, depth: int = 3) -> list[str]:
    """Where a coroutine is suspended, innermost last: follows ``cr_await`` down the
    chain of awaited coroutines (``Task.get_stack`` stops at the outermost frame)."""
    where: list[str] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            where.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where[-depth:]


def pending_tasks_report(depth: int = 3) -> str:
    """One line per pending asyncio task: its name and where it waits."""
    lines = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task.done():
            continue
        chain = " <- ".join(reversed(suspended_at(task.get_coro(), depth))) or "?"
        lines.append(f"  {task.get_name()}: {chain}")
    return "\n".join(lines) or "  (nothing)"
