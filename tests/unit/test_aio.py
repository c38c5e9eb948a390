"""Stopping tasks always ends: swallowed cancels are repeated, a stuck task is given
up on after a deadline, and waiting for an event never eats a cancel."""

from __future__ import annotations

import asyncio
import sys

import pytest

from events.aio import cancel_and_wait, wait_event, within

pytestmark = pytest.mark.timeout(15)


async def swallows_cancels(times: int, started: asyncio.Event, log: list[str]) -> None:
    """A loop that catches the first ``times`` cancels (as a loop around 3.11's
    ``wait_for`` does when the cancel meets a completion)."""
    started.set()
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("swallowed")
            if len(log) > times:
                raise


async def test_a_swallowed_cancel_is_repeated_until_the_task_ends():
    started, log = asyncio.Event(), []
    task = asyncio.create_task(swallows_cancels(2, started, log))
    await started.wait()
    assert await cancel_and_wait([task], timeout=5.0) == set()
    assert task.cancelled() and log == ["swallowed"] * 3


async def test_a_task_that_never_ends_is_given_up_after_the_deadline():
    started, log = asyncio.Event(), []
    task = asyncio.create_task(swallows_cancels(10_000, started, log), name="stubborn")
    await started.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await cancel_and_wait([task, None], timeout=0.5) == {task}
    assert 0.5 <= loop.time() - t0 < 2.0 and len(log) >= 2
    log.extend(["x"] * 10_000)  # let it go: the next cancel is honoured
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_once_work_that_winds_up_is_not_cut_short():
    wound_up = []

    async def hands_back() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # e.g. appending "handed back"
            wound_up.append(True)
            raise

    task = asyncio.create_task(hands_back())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], timeout=5.0, recancel=None) == set()
    assert wound_up == [True]


async def test_results_and_errors_of_finished_tasks_are_consumed():
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task]) == set()
    assert isinstance(task.exception(), RuntimeError)


async def test_within_raises_timeout_even_if_the_inner_task_ignores_its_cancel():
    started, log = asyncio.Event(), []
    with pytest.raises(TimeoutError):
        await within(swallows_cancels(10_000, started, log), 0.2)
    assert log  # it was cancelled (and ignored it): we did not wait for ever
    stubborn = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "swallows_cancels"]
    log.extend(["x"] * 10_000)  # let it go: the next cancel is honoured
    assert await cancel_and_wait(stubborn) == set()


async def test_within_returns_the_result_and_passes_a_cancel_on():
    assert await within(asyncio.sleep(0, result=7), 1.0) == 7
    inner_cancelled = asyncio.Event()

    async def inner() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            inner_cancelled.set()
            raise

    outer = asyncio.create_task(within(inner(), 10.0))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner_cancelled.is_set()


async def test_wait_event_never_swallows_a_cancel_that_meets_the_event():
    """The shape that hung the coordinator's stop: its scheduler waits for a kick with
    a timeout; the stop cancels it in the very step a hand-back sets the kick."""
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 30.0))
    await asyncio.sleep(0)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was rewritten in 3.12")
async def test_wait_for_on_311_does_swallow_that_cancel():
    """Why :func:`wait_event` exists (CPython gh-86296): the same race with wait_for."""
    event = asyncio.Event()
    task = asyncio.create_task(asyncio.wait_for(event.wait(), 30.0))
    await asyncio.sleep(0)
    event.set()
    await asyncio.sleep(0)  # the inner wait completes ...
    task.cancel()  # ... and the cancel arrives before wait_for looked
    assert await task is True  # swallowed: the caller would go on as if nothing happened


async def test_wait_event_times_out_and_sees_a_set_event():
    event = asyncio.Event()
    assert await wait_event(event, 0.05) is False
    event.set()
    assert await wait_event(event, 0.05) is True
