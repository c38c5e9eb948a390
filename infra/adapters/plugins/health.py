"""The plugins' health on the bus: each process running plugins keeps one entry of the
KV bucket ``<ns>_plugins`` (:func:`~infra.adapters.nats.provisioning.plugins_bucket`),
``coordinator.<process>`` or ``agent.<agent id>`` (its credentials may write that key
only), rewritten every few seconds and soon after a change; the bucket's TTL drops the
entry of a process that is gone. ``ccc plugins`` reads them all.

An entry says what the process enabled, what loaded (or why not), each plugin's state
and counts, and — the coordinator's — which queued tasks a plugin's assignment policy
holds back now, with the words of their wait reason (:func:`plugin_waits`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from events.errors import StoreUnavailable
from events.subjects import Namespace
from infra.adapters.nats.kv_follow import KVFollower
from infra.adapters.nats.provisioning import plugins_bucket
from infra.adapters.plugins.guard import Counts


class PluginHealth(msgspec.Struct, kw_only=True):
    """One enabled plugin in one process."""

    name: str
    state: str  # ok, degraded, open, stuck, failed (not loaded), closed (stopped)
    hooks: tuple[str, ...] = ()
    distribution: str = ""
    version: str = ""
    error: str = ""  # why it did not load; else its last failure
    counts: Counts = msgspec.field(default_factory=Counts)
    failures_in_a_row: int = 0
    open_for: float = 0.0  # seconds the circuit stays open
    queued: int = 0  # events waiting for its event hook


class HoldRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A queued task an assignment policy holds back (``actors.plugins.PluginHold``)."""

    task_id: str
    plugin: str
    kind: str
    reason: str
    until: datetime
    words: str


class ProcessHealth(msgspec.Struct, kw_only=True):
    process: str  # the key
    role: str
    host: str = ""
    pid: int = 0
    started_at: datetime | None = None
    updated_at: datetime | None = None
    enabled: tuple[str, ...] = ()
    plugins: tuple[PluginHealth, ...] = ()
    holds: tuple[HoldRecord, ...] = ()


async def _bucket(nc: Client, ns: Namespace, timeout: float):
    return await nc.jetstream(timeout=timeout).key_value(plugins_bucket(ns))


async def write_health(nc: Client, ns: Namespace, record: ProcessHealth, *, timeout: float = 5.0) -> None:
    try:
        kv = await _bucket(nc, ns, timeout)
        await kv.put(record.process, msgspec.json.encode(record))
    except (nats.errors.Error, TimeoutError) as e:
        raise StoreUnavailable(f"writing the plugins' health ({record.process}): "
                               f"{type(e).__name__}: {e}") from None


async def read_health(nc: Client, ns: Namespace, *, timeout: float = 5.0) -> list[ProcessHealth]:
    """Every process's entry (an entry that does not decode is shown as such, not skipped)."""
    try:
        kv = await _bucket(nc, ns, timeout)
    except nats.js.errors.BucketNotFoundError:
        return []  # provisioned before plugins existed: nobody has reported
    except (nats.errors.Error, TimeoutError) as e:
        raise StoreUnavailable(f"reading the plugins' health: {type(e).__name__}: {e}") from None
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    except (nats.errors.Error, TimeoutError) as e:
        raise StoreUnavailable(f"reading the plugins' health: {type(e).__name__}: {e}") from None
    records = []
    for key in sorted(keys):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # expired meanwhile
        except (nats.errors.Error, TimeoutError) as e:
            raise StoreUnavailable(f"reading the plugins' health ({key}): {type(e).__name__}: {e}") from None
        if not entry.value:
            continue
        try:
            records.append(msgspec.json.decode(entry.value, type=ProcessHealth))
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            records.append(ProcessHealth(process=key, role="?", plugins=(
                PluginHealth(name="?", state="unreadable", error=f"{type(e).__name__}: {e}"),)))
    return records


def plugin_waits(records: list[ProcessHealth], now: datetime | None = None) -> dict[str, str]:
    """``{task id: wait reason}`` of the holds in force at ``now`` (for the task board:
    ``projections.waits.Waits(..., plugins=...)``)."""
    now = now or datetime.now(UTC)
    waits: dict[str, str] = {}
    for record in records:
        for hold in record.holds:
            if hold.until > now:
                waits.setdefault(hold.task_id, hold.words)
    return waits


async def read_plugin_waits(nc: Client, ns: Namespace, *, timeout: float = 5.0) -> dict[str, str]:
    return plugin_waits(await read_health(nc, ns, timeout=timeout))


class HealthWatch:
    """Every process's entry, followed live (for a status API in another process than
    the coordinator): :meth:`plugin_waits` is the holds in force now."""

    def __init__(self, nc: Client, ns: Namespace, *, timeout: float = 2.0) -> None:
        self.records: dict[str, ProcessHealth] = {}
        self._follower = KVFollower(nc, plugins_bucket(ns), self._entry, name="plugins-health", timeout=timeout)

    async def start(self, *, wait: float = 2.0) -> bool:
        return await self._follower.start(wait=wait)

    async def stop(self) -> None:
        await self._follower.stop()

    def plugin_waits(self) -> dict[str, str]:
        return plugin_waits(list(self.records.values()))

    def _entry(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.records.pop(key, None)
            return
        try:
            self.records[key] = msgspec.json.decode(value, type=ProcessHealth)
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.records.pop(key, None)  # (`ccc plugins` shows it as unreadable)
