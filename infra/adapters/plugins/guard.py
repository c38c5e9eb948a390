"""How a plugin's code is run so that it cannot stop the cluster: isolated, timed out,
counted, and switched off for a while when it keeps failing.

* **Isolated**: each plugin gets its own thread running its own event loop
  (:class:`Worker`). A sync hook runs there (one at a time: plugin code need not be
  thread-safe), an ``async def`` hook on that loop; neither ever runs on the cluster's
  loop, so a plugin that blocks, sleeps or spins blocks only itself.
* **Timed out**: the caller waits at most the call's timeout. A call still queued behind
  a stuck one when its time is up is abandoned (it never runs late: a stale policy
  question or event is worth nothing); one already running cannot be killed (Python
  threads cannot be), it finishes in its own thread and its answer is dropped.
* **Bounded**: at most ``max_in_flight`` calls may be queued or running in a plugin's
  thread; beyond that a call is refused at once (``busy``), so a stuck plugin costs no
  more than that.
* **Circuit breaker** (:class:`Breaker`): after ``failures`` failures in a row (error,
  timeout, bad value, busy) the plugin is skipped for ``cooldown`` seconds (``open``);
  then one call may try again (half open): a success closes the circuit, a failure opens
  it for another ``cooldown``.
* **Counted**: every call ends in one outcome (:data:`OUTCOMES`) on
  ``claude_plugin_calls_total{plugin,hook,outcome}``, its duration on
  ``claude_plugin_call_duration_seconds``, and in :class:`Counts` for the health record.
  Errors are logged with the plugin's name, hook and traceback (bounded).
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import structlog

from infra.adapters.obs.masking import mask
from infra.adapters.plugins.metrics import PluginMetrics

log = structlog.get_logger("ccc.plugins")

OUTCOMES = ("ok", "error", "timeout", "invalid", "busy", "open", "dropped")
FAILURES = frozenset({"error", "timeout", "invalid", "busy"})  # what the breaker counts
MAX_ERROR = 500  # characters of an error kept for the health record


class CallResult(NamedTuple):
    """One guarded call (satisfies :class:`actors.plugins.Answer`)."""

    plugin: str
    value: Any
    fault: str  # "" when the plugin answered and the answer passed its check


class Counts(msgspec.Struct, kw_only=True):
    """A plugin's calls in this process, by outcome, and the last failure."""

    calls: int = 0
    ok: int = 0
    error: int = 0
    timeout: int = 0
    invalid: int = 0
    busy: int = 0
    open: int = 0
    dropped: int = 0
    last_error: str = ""
    last_error_at: datetime | None = None


# -- the plugin's own thread -----------------------------------------------------------------
class _Call:
    """A call handed to the worker: it runs unless the caller abandoned it first."""

    __slots__ = ("lock", "started", "abandoned")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = False
        self.abandoned = False


class Worker:
    """A daemon thread with its own event loop, where one plugin's code runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self.in_flight = 0  # queued (not abandoned) or running
        self.running_since: dict[int, float] = {}  # call id -> monotonic start, while it runs
        self._ids = 0
        self.thread = threading.Thread(target=self._run, name=f"ccc-plugin-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, fn: Callable[..., Any], args: tuple) -> tuple[_Call, asyncio.Future]:
        """Run ``fn(*args)`` (awaited if it returns an awaitable) in the worker; the
        future (of the caller's loop) gets ``(True, value)`` or ``(False, exception)``."""
        call = _Call()
        with self._lock:
            self.in_flight += 1
            self._ids += 1
            call_id = self._ids

        async def run() -> tuple[bool, Any]:
            with call.lock:
                if call.abandoned:
                    return False, None
                call.started = True
            self.running_since[call_id] = time.monotonic()
            try:
                result = fn(*args)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
                return True, result
            except BaseException as e:  # noqa: BLE001 - the plugin's, reported to the caller
                return False, e
            finally:
                self.running_since.pop(call_id, None)
                with self._lock:
                    self.in_flight -= 1

        return call, asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop))

    def abandon(self, call: _Call) -> None:
        """The caller gave up: a call not started yet never will (and stops counting)."""
        with call.lock:
            if call.started or call.abandoned:
                return
            call.abandoned = True
        with self._lock:
            self.in_flight -= 1

    def stuck(self, older_than: float) -> int:
        """Calls running for more than ``older_than`` seconds."""
        now = time.monotonic()
        return sum(1 for t in list(self.running_since.values()) if now - t > older_than)

    def stop(self, timeout: float = 0.0) -> None:
        """Cancel what is pending on the plugin's loop, then stop it; the thread closes
        its loop and ends. Waits at most ``timeout`` seconds for that (a blocking wait: 0
        on the cluster's loop; a stuck sync call keeps the daemon thread until it returns)."""

        async def shutdown() -> None:
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.loop.stop()

        try:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(shutdown()))
        except RuntimeError:
            return  # stopped already
        if timeout:
            self.thread.join(timeout)


# -- the breaker --------------------------------------------------------------------------------
class Breaker:
    def __init__(self, failures: int = 5, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("failures must be >= 1 and cooldown >= 0")
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0  # in a row
        self.open_until: float | None = None

    @property
    def is_open(self) -> bool:
        return self.open_until is not None and self.clock() < self.open_until

    def success(self) -> None:
        self.failures = 0
        self.open_until = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.cooldown

    def seconds_left(self) -> float:
        return max(0.0, self.open_until - self.clock()) if self.open_until is not None else 0.0


# -- one plugin behind its guard ------------------------------------------------------------------
class GuardSettings(msgspec.Struct, frozen=True, kw_only=True):
    timeout: float = 2.0  # a policy point's call
    event_timeout: float = 10.0  # an event hook's call
    queue: int = 1000  # events waiting for the plugin; beyond: dropped
    failures: int = 5  # failures in a row that open the circuit
    cooldown: float = 30.0  # seconds the circuit stays open
    max_in_flight: int = 8  # calls queued or running in the plugin's thread; beyond: busy

    def validate(self, plugin: str) -> "GuardSettings":
        for field, value in (("timeout", self.timeout), ("event_timeout", self.event_timeout),
                             ("cooldown", self.cooldown)):
            if not 0 < value <= 3600 and not (field == "cooldown" and value == 0):
                raise ValueError(f"plugin {plugin}: {field} must be in (0, 3600] seconds, got {value}")
        if not (1 <= self.queue <= 1_000_000 and 1 <= self.failures <= 1000
                and 1 <= self.max_in_flight <= 1000):
            raise ValueError(f"plugin {plugin}: queue, failures and max_in_flight must be >= 1")
        return self


class Guarded:
    """One loaded plugin: its object, its worker, its breaker and its counts."""

    def __init__(self, name: str, obj: Any, hooks: tuple[str, ...], settings: GuardSettings,
                 metrics: PluginMetrics, worker: Worker, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.obj = obj
        self.hooks = hooks
        self.settings = settings
        self.metrics = metrics
        self.worker = worker
        self.breaker = Breaker(settings.failures, settings.cooldown, clock)
        self.counts = Counts()
        self.queue: asyncio.Queue | None = None  # the event hooks' (started by the host)

    def _count(self, hook: str, outcome: str, seconds: float | None = None, error: str = "") -> None:
        c = self.counts
        c.calls += 1
        setattr(c, outcome, getattr(c, outcome) + 1)
        self.metrics.calls.labels(self.name, hook, outcome).inc()
        if seconds is not None:
            self.metrics.duration.labels(self.name, hook).observe(seconds)
        if outcome in FAILURES:
            self.breaker.failure()
            c.last_error = mask(f"{hook}: {error}")[:MAX_ERROR]
            c.last_error_at = datetime.now(UTC)
        elif outcome == "ok":
            self.breaker.success()
        self.metrics.healthy.labels(self.name).set(0 if self.breaker.is_open else 1)

    def dropped(self, hook: str) -> None:
        """An event the full queue could not take."""
        self._count(hook, "dropped")

    async def call(self, hook: str, args: tuple, *, timeout: float,
                   check: Callable[[Any], Any] | None = None) -> CallResult:
        """``hook(*args)`` in the plugin's thread, at most ``timeout`` seconds; never
        raises for the plugin's sake (the caller's own cancellation propagates)."""
        if self.breaker.is_open:
            self._count(hook, "open")
            return CallResult(self.name, None, f"circuit open for {self.breaker.seconds_left():.0f}s more "
                                               f"after {self.breaker.failures} failures in a row")
        if self.worker.in_flight >= self.settings.max_in_flight:
            self._count(hook, "busy", error=f"{self.worker.in_flight} calls have not returned")
            return CallResult(self.name, None,
                              f"busy: {self.worker.in_flight} earlier calls have not returned")
        fn = getattr(self.obj, hook)
        start = time.perf_counter()
        call, future = self.worker.submit(fn, args)
        try:
            ok, value = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.worker.abandon(call)
            self._count(hook, "timeout", time.perf_counter() - start, f"no answer within {timeout:g}s")
            log.warning("plugin.timeout", plugin=self.name, hook=hook, timeout=timeout)
            return CallResult(self.name, None, f"timeout after {timeout:g}s")
        except asyncio.CancelledError:
            self.worker.abandon(call)
            raise
        seconds = time.perf_counter() - start
        if not ok:
            if value is None:  # abandoned meanwhile (cannot happen before the timeout)
                self._count(hook, "timeout", seconds, "abandoned")
                return CallResult(self.name, None, "abandoned")
            error = f"{type(value).__name__}: {value}"
            self._count(hook, "error", seconds, error)
            where = "".join(traceback.format_exception(value)[-3:])
            log.warning("plugin.error", plugin=self.name, hook=hook, error=mask(error)[:MAX_ERROR],
                        where=mask(where)[-1500:])
            return CallResult(self.name, None, f"error: {mask(error)[:200]}")
        if check is not None:
            try:
                value = check(value)
            except (TypeError, ValueError) as e:
                self._count(hook, "invalid", seconds, f"bad return value: {e}")
                log.warning("plugin.invalid", plugin=self.name, hook=hook, error=str(e)[:MAX_ERROR])
                return CallResult(self.name, None, f"bad return value: {str(e)[:200]}")
        self._count(hook, "ok", seconds)
        return CallResult(self.name, value, "")

    def state(self) -> str:
        """``ok``; ``degraded`` (its last call failed); ``open`` (skipped for a while);
        ``stuck`` (a call has run for more than ten of its timeouts)."""
        if self.worker.stuck(10 * max(self.settings.timeout, self.settings.event_timeout)):
            return "stuck"
        if self.breaker.is_open:
            return "open"
        return "degraded" if self.breaker.failures else "ok"
