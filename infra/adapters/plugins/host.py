"""The hook plugins of one process: enabled by configuration, loaded behind their guards,
their events delivered off the hot path, their health published.

:class:`PluginHost` satisfies the actors' :class:`actors.plugins.PluginHost` (without
importing it: adapters sit below the actors). Built by the composition root from the
settings (``CCC_PLUGINS`` / ``--plugin``, ``CCC_PLUGIN_<NAME>_<KEY>``):

* a name that is not installed in ``ccc.hooks`` is a :class:`ConfigError` at start (a
  typo must not pass for a policy in force);
* a plugin that is installed but cannot be loaded (its import fails, its factory raises,
  hangs past the load timeout, or returns an object with none of the hooks) is reported
  ``failed`` with the reason, and the process runs without it;
* each loaded plugin runs behind a :class:`~infra.adapters.plugins.guard.Guarded`; its
  event hook gets a bounded queue and a delivery task of its own, so a slow one never
  holds the projection or the scheduler (a full queue drops, counted).

The guard's settings per plugin come from its reserved options (``CCC_PLUGIN_<NAME>_TIMEOUT``
seconds for a policy point, ``_EVENT_TIMEOUT``, ``_QUEUE``, ``_FAILURES``, ``_COOLDOWN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from events.errors import CccError, ConfigError
from events.subjects import Namespace
from infra.adapters.obs.masking import mask
from infra.adapters.plugins import discovery
from infra.adapters.plugins.guard import MAX_ERROR, Counts, Guarded, GuardSettings, Worker
from infra.adapters.plugins.health import HoldRecord, PluginHealth, ProcessHealth, write_health
from infra.adapters.plugins.metrics import PluginMetrics

log = structlog.get_logger("ccc.plugins")

HOOKS = ("on_event", "assignment", "pull_request", "tracking_comment")  # actors.plugins.HOOKS
LOAD_TIMEOUT = 10.0  # seconds a plugin's factory may take
CLOSE_TIMEOUT = 5.0  # seconds a plugin's close() may take
PUBLISH_INTERVAL = 5.0  # seconds between two writes of the health entry (sooner after a change)


def _bounded(fn, timeout: float) -> None:
    """``fn()`` on a daemon thread, waited for at most ``timeout`` seconds, errors logged."""
    def run() -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a plugin's close must not stop the stop
            log.warning("plugin.close_failed", error=f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=run, name="ccc-plugin-close", daemon=True)
    thread.start()
    thread.join(timeout)


def process_key(role: str, name: str | None = None) -> str:
    """The health entry's key: ``agent.<id>``, or ``coordinator.<host>-<pid>`` (a
    ``ccc up`` per machine may share a NATS)."""
    if name is None:
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "host"
        name = f"{host}-{os.getpid()}"
    return f"{role}.{name}"


def guard_settings(plugin: str, options: Mapping[str, str]) -> GuardSettings:
    values: dict[str, Any] = {}
    for key, kind in (("timeout", float), ("event_timeout", float), ("cooldown", float), ("queue", int),
                      ("failures", int)):
        if key in options:
            try:
                values[key] = kind(options[key])
            except ValueError:
                variable = f"CCC_PLUGIN_{discovery.env_name(plugin)}_{key.upper()}"
                raise ConfigError(f"{variable}: expected a number, got {options[key]!r}") from None
    try:
        return GuardSettings(**values).validate(plugin)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class PluginHost:
    """The enabled hook plugins of this process. :meth:`start` loads them (and starts
    delivering events and, given a connection, publishing the health entry);
    :meth:`stop` ends all of it. Never raises for a plugin's sake once started."""

    def __init__(self, names: Sequence[str], plugin_env: Iterable[tuple[str, str]] = (), *,
                 role: str = "coordinator", key: str | None = None, registry: CollectorRegistry | None = None,
                 load_timeout: float = LOAD_TIMEOUT, publish_interval: float = PUBLISH_INTERVAL) -> None:
        self.names = tuple(names)
        self.plugin_env = tuple(plugin_env)
        self.role = role
        self.key = key or process_key(role)
        self.metrics = PluginMetrics(registry)
        self.load_timeout = load_timeout
        self.publish_interval = publish_interval
        installed = {ep.name: ep for ep in discovery.entry_points(discovery.GROUPS["hook"])}
        missing = [n for n in self.names if n not in installed]
        if missing:
            raise ConfigError(f"plugin {', '.join(missing)}: not installed (entry point group ccc.hooks: "
                              f"{', '.join(installed) or 'none'}); CCC_PLUGINS / --plugin name installed "
                              "plugins")
        self._eps = {n: installed[n] for n in self.names}
        self.info = {n: discovery.installed_of(installed[n]) for n in self.names}
        self._known = list(installed)
        self.options = {n: discovery.options_for(n, self.plugin_env, self._known) for n in self.names}
        # (a bad value fails here, before anything starts)
        self.guard_settings = {n: guard_settings(n, self.options[n]) for n in self.names}
        self.loaded: dict[str, Guarded] = {}
        self.failed: dict[str, str] = {}  # name -> why it did not load
        self._by_hook: dict[str, tuple[str, ...]] = {h: () for h in HOOKS}
        self._tasks: list[asyncio.Task] = []
        self._holds: tuple[HoldRecord, ...] = ()
        self._changed = asyncio.Event()
        self._nc: Client | None = None
        self._ns: Namespace | None = None
        self.started_at: datetime | None = None
        self.closed = False

    @classmethod
    def from_settings(cls, settings: Any, **kw: Any) -> "PluginHost":
        """From :class:`~infra.adapters.nats.settings.Settings` (``plugins``, ``plugin_env``)."""
        return cls(settings.plugins, settings.plugin_env, **kw)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, nc: Client | None = None, ns: Namespace | None = None) -> None:
        """Load the plugins (each factory in the plugin's own thread, within the load
        timeout), start the event deliveries and, given ``nc``, the health entry."""
        self.started_at = datetime.now(UTC)
        for name in self.names:
            await self._load(name)
        self._by_hook = {h: tuple(n for n in self.names if n in self.loaded and h in self.loaded[n].hooks)
                         for h in HOOKS}
        for name in self._by_hook["on_event"]:
            guarded = self.loaded[name]
            guarded.queue = asyncio.Queue(maxsize=guarded.settings.queue)
            self._tasks.append(asyncio.create_task(self._deliver(guarded), name=f"plugin-events-{name}"))
        if nc is not None and ns is not None:
            self._nc, self._ns = nc, ns
            await self._publish_once()
            self._tasks.append(asyncio.create_task(self._publish_loop(), name="plugin-health"))
        if self.names:
            log.info("plugins.started", enabled=list(self.names), loaded=list(self.loaded),
                     failed=self.failed)

    async def _load(self, name: str) -> None:
        ep = self._eps[name]
        worker = Worker(name)
        try:
            factory = discovery.load(ep)
            options = discovery.plugin_options(self.options[name])
            call, future = worker.submit(factory, (options,))
            try:
                ok, obj = await asyncio.wait_for(future, self.load_timeout)
            except TimeoutError:
                worker.abandon(call)
                raise ConfigError(f"its factory did not return within {self.load_timeout:g}s") from None
            if not ok:
                raise ConfigError(f"its factory {ep.value} raised {type(obj).__name__}: {obj}")
            hooks = tuple(h for h in HOOKS if callable(getattr(obj, h, None)))
            if not hooks:
                raise ConfigError(f"{type(obj).__name__} implements none of the hooks ({', '.join(HOOKS)})")
        except CccError as e:
            worker.stop()
            error = mask(str(e))[:MAX_ERROR]
            self.failed[name] = error
            self.metrics.healthy.labels(name).set(0)
            log.error("plugin.load_failed", plugin=name, error=error)
            return
        self.loaded[name] = Guarded(name, obj, hooks, self.guard_settings[name], self.metrics, worker)
        self.metrics.healthy.labels(name).set(1)

    async def stop(self) -> None:
        """Stop delivering and publishing (a last health entry says ``closed``), call each
        plugin's ``close()`` if it has one (bounded), end the plugins' threads."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        for guarded in self.loaded.values():
            close = getattr(guarded.obj, "close", None)
            if callable(close):  # on a thread of its own: it may have to release a stuck hook
                await asyncio.get_running_loop().run_in_executor(None, _bounded, close, CLOSE_TIMEOUT)
            await asyncio.to_thread(guarded.worker.stop, 1.0)  # (its join off the loop)
        if self._nc is not None and self._ns is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish_once(), 5.0)

    # -- the actors' PluginHost -------------------------------------------------------------------
    def implementing(self, hook: str) -> tuple[str, ...]:
        return self._by_hook.get(hook, ())

    async def call(self, plugin: str, hook: str, args: tuple, check=None):
        guarded = self.loaded[plugin]
        before = guarded.state()
        result = await guarded.call(hook, args, timeout=guarded.settings.timeout, check=check)
        if result.fault or guarded.state() != before:
            self._changed.set()
        return result

    def post(self, hook: str, args: tuple) -> None:
        for name in self._by_hook.get(hook, ()):
            guarded = self.loaded[name]
            if guarded.queue is None:
                continue
            try:
                guarded.queue.put_nowait((hook, args))
            except asyncio.QueueFull:
                guarded.dropped(hook)
                self._changed.set()
            self.metrics.queue_depth.labels(name).set(guarded.queue.qsize())

    def report_holds(self, holds: Sequence[Any]) -> None:
        records = tuple(HoldRecord(task_id=h.task_id, plugin=h.plugin, kind=h.kind, reason=h.reason,
                                   until=h.until, words=h.words) for h in holds)
        if records != self._holds:
            self._holds = records
            self._changed.set()

    # -- events, off the hot path -------------------------------------------------------------------
    async def _deliver(self, guarded: Guarded) -> None:
        assert guarded.queue is not None
        while True:
            hook, args = await guarded.queue.get()
            self.metrics.queue_depth.labels(guarded.name).set(guarded.queue.qsize())
            try:
                result = await guarded.call(hook, args, timeout=guarded.settings.event_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the delivery must outlive anything
                log.error("plugin.delivery_failed", plugin=guarded.name, error=f"{type(e).__name__}: {e}")
                continue
            if result.fault:
                self._changed.set()

    # -- health ---------------------------------------------------------------------------------------
    def health(self) -> ProcessHealth:
        plugins = []
        for name in self.names:
            info = self.info[name]
            if name in self.failed:
                plugins.append(PluginHealth(name=name, state="failed", error=self.failed[name],
                                            distribution=info.distribution, version=info.version))
                continue
            g = self.loaded.get(name)
            if g is None:  # not started yet
                plugins.append(PluginHealth(name=name, state="not loaded", distribution=info.distribution,
                                            version=info.version))
                continue
            counts = msgspec.structs.replace(g.counts)
            plugins.append(PluginHealth(
                name=name, state="closed" if self.closed else g.state(), hooks=g.hooks,
                distribution=info.distribution, version=info.version, error=counts.last_error, counts=counts,
                failures_in_a_row=g.breaker.failures, open_for=round(g.breaker.seconds_left(), 1),
                queued=g.queue.qsize() if g.queue else 0))
        host = socket.gethostname()
        return ProcessHealth(process=self.key, role=self.role, host=host, pid=os.getpid(),
                             started_at=self.started_at, updated_at=datetime.now(UTC), enabled=self.names,
                             plugins=tuple(plugins), holds=self._holds)

    def counts(self, plugin: str) -> Counts:
        return self.loaded[plugin].counts

    async def _publish_once(self) -> None:
        assert self._nc is not None and self._ns is not None
        await write_health(self._nc, self._ns, self.health())

    async def _publish_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.publish_interval)
            self._changed.clear()
            try:
                await self._publish_once()
            except CccError as e:
                log.warning("plugins.health_not_published", error=str(e))
            await asyncio.sleep(0.2)  # changes within this time go in the next write
