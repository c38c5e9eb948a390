"""The plugin guard (infra.adapters.plugins.guard): a plugin that raises, hangs, is slow
or answers nonsense is isolated in its own thread, timed out, counted (in its counts and
on the prometheus metrics), and skipped for a while once it keeps failing. The caller's
event loop never waits on plugin code."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from actors.plugins import ALLOW, Delay, Veto, check_assignment
from infra.adapters.plugins.guard import Breaker, Guarded, GuardSettings, Worker
from infra.adapters.plugins.metrics import PluginMetrics

pytestmark = pytest.mark.timeout(30)


class Plugin:
    """A plugin whose hooks do what the test says."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.threads: set[str] = set()

    def assignment(self, task, agent):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return {"raise": lambda: 1 / 0, "hang": self.release.wait, "allow": lambda: ALLOW,
                "veto": lambda: Veto("no"), "nonsense": lambda: "yes please",
                "slow": lambda: time.sleep(0.3), "bad_delay": lambda: Delay(-1)}[task]()

    async def on_event(self, seq, event, state):
        self.calls += 1
        await asyncio.sleep(event)


def guarded(plugin, **settings) -> Guarded:
    registry = CollectorRegistry()
    g = Guarded("p", plugin, ("assignment", "on_event"), GuardSettings(**settings), PluginMetrics(registry),
                Worker("p"))
    g.registry = registry  # (for the assertions)
    return g


def metric(g: Guarded, outcome: str, hook: str = "assignment") -> float:
    return g.registry.get_sample_value("claude_plugin_calls_total",
                                       {"plugin": "p", "hook": hook, "outcome": outcome}) or 0.0


async def test_an_answer_is_checked_and_counted_and_runs_in_the_plugins_own_thread() -> None:
    plugin = Plugin()
    g = guarded(plugin)
    try:
        result = await g.call("assignment", ("veto", None), timeout=1.0, check=check_assignment)
        assert result == ("p", Veto("no"), "")
        assert (await g.call("assignment", ("allow", None), timeout=1.0, check=check_assignment)).value == ALLOW
        assert plugin.threads == {"ccc-plugin-p"}  # never the caller's thread
        assert g.counts.ok == 2 and g.counts.calls == 2 and metric(g, "ok") == 2
        assert g.registry.get_sample_value("claude_plugin_call_duration_seconds_count",
                                           {"plugin": "p", "hook": "assignment"}) == 2
        assert g.state() == "ok"
    finally:
        g.worker.stop()


async def test_a_plugin_that_raises_is_an_error_counted_and_logged_not_a_crash() -> None:
    g = guarded(Plugin())
    try:
        result = await g.call("assignment", ("raise", None), timeout=1.0, check=check_assignment)
        assert result.value is None and result.fault.startswith("error: ZeroDivisionError")
        assert g.counts.error == 1 and metric(g, "error") == 1
        assert "ZeroDivisionError" in g.counts.last_error and g.counts.last_error_at is not None
        assert g.state() == "degraded"  # its last call failed; the circuit is still closed
    finally:
        g.worker.stop()


async def test_a_bad_return_value_is_invalid_not_an_answer() -> None:
    g = guarded(Plugin())
    try:
        for task in ("nonsense", "bad_delay"):
            result = await g.call("assignment", (task, None), timeout=1.0, check=check_assignment)
            assert result.value is None and result.fault.startswith("bad return value")
        assert g.counts.invalid == 2 and metric(g, "invalid") == 2
    finally:
        g.worker.stop()


async def test_a_hanging_plugin_times_out_and_never_blocks_the_callers_loop() -> None:
    plugin = Plugin()
    g = guarded(plugin)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.create_task(ticker())
    try:
        start = time.monotonic()
        result = await g.call("assignment", ("hang", None), timeout=0.2, check=check_assignment)
        took = time.monotonic() - start
        assert result.fault == "timeout after 0.2s" and 0.19 < took < 0.6
        assert ticks >= 8  # the loop kept running while the plugin hung
        assert g.counts.timeout == 1 and metric(g, "timeout") == 1
        # the next call queues behind the stuck one, is abandoned at its timeout, never runs
        result = await g.call("assignment", ("allow", None), timeout=0.1, check=check_assignment)
        assert result.fault == "timeout after 0.1s" and plugin.calls == 1 and g.worker.in_flight == 1
    finally:
        running.cancel()
        plugin.release.set()
        g.worker.stop()


async def test_calls_beyond_the_in_flight_bound_are_refused_at_once() -> None:
    plugin = Plugin()
    g = guarded(plugin, max_in_flight=3, failures=100)
    try:
        results = await asyncio.gather(*(g.call("assignment", ("hang", None), timeout=0.3) for _ in range(6)))
        faults = sorted(r.fault.split(":")[0] for r in results)
        assert faults == ["busy"] * 3 + ["timeout after 0.3s"] * 3
        assert g.counts.busy == 3 and metric(g, "busy") == 3
    finally:
        plugin.release.set()
        g.worker.stop()


async def test_a_slow_plugin_is_cut_at_its_timeout_and_its_late_answer_dropped() -> None:
    plugin = Plugin()
    g = guarded(plugin)
    try:
        result = await g.call("assignment", ("slow", None), timeout=0.05, check=check_assignment)
        assert result.fault == "timeout after 0.05s"
        await asyncio.sleep(0.4)  # it finished in its thread meanwhile: nothing more is counted
        assert g.counts.calls == 1 and g.worker.in_flight == 0
    finally:
        g.worker.stop()


async def test_an_async_hook_runs_on_the_plugins_loop_and_is_cancelled_at_its_timeout() -> None:
    plugin = Plugin()
    g = guarded(plugin)
    try:
        assert (await g.call("on_event", (1, 0.0, None), timeout=1.0)).fault == ""
        result = await g.call("on_event", (2, 30.0, None), timeout=0.1)
        assert result.fault == "timeout after 0.1s" and metric(g, "timeout", "on_event") == 1
        await asyncio.sleep(0.1)
        assert g.worker.in_flight == 0  # cancelled on its own loop, not left sleeping
    finally:
        g.worker.stop()


async def test_the_circuit_opens_after_failures_in_a_row_skips_then_half_opens() -> None:
    plugin = Plugin()
    g = guarded(plugin, failures=3, cooldown=0.3)
    try:
        for _ in range(3):
            await g.call("assignment", ("raise", None), timeout=1.0)
        assert g.state() == "open" and plugin.calls == 3
        skipped = await g.call("assignment", ("allow", None), timeout=1.0)
        assert skipped.fault.startswith("circuit open") and plugin.calls == 3  # not even called
        assert g.counts.open == 1 and metric(g, "open") == 1
        assert g.registry.get_sample_value("claude_plugin_healthy", {"plugin": "p"}) == 0
        await asyncio.sleep(0.35)
        # half open: one failure opens it again at once
        await g.call("assignment", ("raise", None), timeout=1.0)
        assert g.state() == "open" and plugin.calls == 4
        await asyncio.sleep(0.35)
        assert (await g.call("assignment", ("allow", None), timeout=1.0, check=check_assignment)).fault == ""
        assert g.state() == "ok" and g.breaker.failures == 0
        assert g.registry.get_sample_value("claude_plugin_healthy", {"plugin": "p"}) == 1
    finally:
        g.worker.stop()


def test_the_breaker_counts_failures_in_a_row_only() -> None:
    now = [0.0]
    b = Breaker(failures=2, cooldown=10, clock=lambda: now[0])
    b.failure()
    b.success()
    b.failure()
    assert not b.is_open
    b.failure()
    assert b.is_open and b.seconds_left() == 10
    now[0] = 10.5
    assert not b.is_open  # half open: the next call may try
    with pytest.raises(ValueError):
        Breaker(failures=0)


def test_guard_settings_are_checked() -> None:
    assert GuardSettings(timeout=0.2).validate("p").timeout == 0.2
    for bad in ({"timeout": 0}, {"event_timeout": -1}, {"queue": 0}, {"failures": 0}):
        with pytest.raises(ValueError, match="plugin p"):
            GuardSettings(**bad).validate("p")
