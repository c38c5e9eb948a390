"""The spend ledger on NATS: the rules of :mod:`events.spend` over a KV bucket.

Each scope is one entry of ``<ns>_spend`` (:func:`~infra.adapters.nats.provisioning.spend_bucket`);
every change is read → :mod:`events.spend` decides → ``update(last=revision)``, retried
when another agent wrote in between, so concurrent reservations are serialised per scope
by the server and none can pass a cap (why KV and not events: see :mod:`events.spend`).
The caps are the ``budget`` value of the cluster config bucket, followed by every
ledger (:class:`~infra.adapters.nats.kv_follow.KVFollower`): a raise is seen at once.

:class:`KVSpendLedger` is what a coder uses (:class:`events.spend.SpendLedger`):

* ``reserve`` takes the call's hold in each capped scope in a fixed order; if a scope is
  *busy* (others' holds in the way) it gives back what it took and tries again with
  backoff, holding nothing while it waits (two callers can never hold what the other
  waits for); if a scope is *exhausted* it gives everything back, records the refusal in
  that scope (what the scheduler reads) and returns it. With no cap at all it does no
  I/O.
* ``settle`` writes the call's real cost into every scope (capped or not: ``ccc budget``
  shows them all), replacing the holds.

When the bus cannot be reached a reservation fails closed — :class:`LedgerUnavailable`
after ``unavailable`` seconds of retrying (a cap that cannot be checked is not taken as
room) — while a settlement that cannot be written is logged with its amount and given up
(the call is made; its cost is on the task's events all the same).

:class:`SpendWatch` follows the whole ledger and the caps for the scheduler, the status
API and ``ccc budget``: :meth:`SpendWatch.book` is an :class:`events.spend.Book` of what
it has seen.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue

from events.errors import CccError, ConfigError
from events.spend import (
    Book,
    Caps,
    Entry,
    Refusal,
    Reservation,
    Scope,
    dollars,
    entry_scope,
    exhausted,
    period_of,
    refused,
    release,
    reserve,
    settle,
)
from events.subjects import Namespace
from infra.adapters.nats.cluster_config import BUDGET, decode_setting
from infra.adapters.nats.kv_follow import KVFollower
from infra.adapters.nats.provisioning import config_bucket, spend_bucket

log = structlog.get_logger("ccc.spend")

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError)
_CAS_ATTEMPTS = 200  # a scope written by this many others in a row: give up (never seen)
BUSY_BACKOFF = (0.02, 1.0)  # first and longest wait while a scope is busy


class LedgerUnavailable(CccError):
    """The ledger could not be read or written for ``unavailable`` seconds."""


def _decode(entry: KeyValue.Entry | None, scope: Scope, period: str) -> Entry:
    fresh = Entry(scope=scope.label, period=period if scope.daily else "")
    if entry is None or not entry.value or entry.operation in ("DEL", "PURGE"):
        return fresh
    try:
        return msgspec.json.decode(entry.value, type=Entry)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        # money: a damaged account is not taken as empty (that would free its cap); the
        # calls charged to it stop with this message until someone repairs or deletes it
        raise LedgerUnavailable(f"spend ledger entry {entry.key!r} is damaged ({e}); repair it or delete it "
                                f"(`nats kv del <ns>_spend {entry.key}`) to start that scope afresh") from None


class KVSpendLedger:
    def __init__(self, nc: Client, ns: Namespace, *, name: str = "", clock: Callable[[], float] = time.time,
                 timeout: float = 2.0, unavailable: float = 30.0) -> None:
        self.nc, self.ns, self.name, self.clock = nc, ns, name, clock
        self.timeout, self.unavailable = timeout, unavailable
        self.caps = Caps()
        self._kv: KeyValue | None = None
        self._started = False
        self._follower = KVFollower(nc, config_bucket(ns), self._caps_changed, keys=BUDGET,
                                    name=f"caps-{name or 'ledger'}", timeout=timeout)

    async def start(self, *, wait: float = 5.0) -> None:
        """Follow the caps (waiting up to ``wait`` s for the current ones); done by the
        first reservation if not before."""
        self._started = True
        await self._follower.start(wait=wait)

    async def close(self) -> None:
        await self._follower.stop()

    def _caps_changed(self, key: str, value: bytes | None) -> None:
        try:
            self.caps = Caps() if value is None else decode_setting(key, value, Caps)
        except ConfigError as e:  # keep the caps we had: a bad write must not lift them
            log.error("spend.caps_unreadable", error=str(e))

    # -- reserve / settle -------------------------------------------------------------
    async def reserve(self, scopes: Sequence[Scope], amount: int, *, ttl: float) -> Reservation | Refusal:
        if not self._started:
            await self.start()
        hold_id = uuid.uuid4().hex[:16]
        period = period_of(self.clock())
        caps = self.caps
        capped = [(s, cap) for s in scopes if (cap := caps.cap(s)) is not None]
        if not capped:
            return Reservation(hold_id=hold_id, amount=amount, period=period, scopes=tuple(scopes))
        started = time.monotonic()
        wait = BUSY_BACKOFF[0]
        while True:
            held: list[tuple[Scope, str]] = []
            refusal: Refusal | None = None
            for scope, cap in capped:
                key = scope.key(period)
                got = await self._change(key, scope, period,
                                         lambda e, cap=cap: reserve(e, cap, amount, hold_id, self.clock(), ttl))
                if isinstance(got, Refusal):
                    refusal = got
                    if not got.busy:  # remember it: the scheduler holds queued tasks back on it
                        await self._change(key, scope, period, lambda e, r=got: refused(e, r, self.clock()))
                    break
                held.append((scope, key))
            if refusal is None:
                return Reservation(hold_id=hold_id, amount=amount, period=period, scopes=tuple(scopes),
                                   held=tuple(k for _, k in held))
            for scope, key in held:
                await self._change(key, scope, period, lambda e: release(e, hold_id, self.clock()))
            if not refusal.busy or time.monotonic() - started + wait > ttl:
                log.info("spend.refused", ledger=self.name, reason=refusal.reason)
                return refusal
            await asyncio.sleep(wait)  # others' calls hold the headroom: most of it comes back
            wait = min(wait * 2, BUSY_BACKOFF[1])

    async def settle(self, reservation: Reservation, cost: int) -> None:
        """The call's real cost (micro-dollars) into every scope, replacing its holds; with
        ``cost`` 0 (the call failed) only the holds are given back."""
        r = reservation
        try:
            for scope in r.scopes:
                key = scope.key(r.period)
                if cost > 0:
                    await self._change(key, scope, r.period, lambda e: settle(e, r.hold_id, cost, self.clock()))
                elif key in r.held:
                    await self._change(key, scope, r.period, lambda e: release(e, r.hold_id, self.clock()))
        except LedgerUnavailable as e:
            log.error("spend.settle_lost", ledger=self.name, hold=r.hold_id, cost=dollars(cost), error=str(e))

    # -- one scope's compare-and-set ----------------------------------------------------
    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.nc.jetstream(timeout=self.timeout).key_value(spend_bucket(self.ns))
            except nats.js.errors.BucketNotFoundError:
                raise ConfigError(f"bucket {spend_bucket(self.ns)} is missing: provisioning is an admin step "
                                  "(`ccc server`, `ccc up`)") from None
        return self._kv

    async def _change(self, key: str, scope: Scope, period: str,
                      decide: Callable[[Entry], Entry | Refusal]) -> Entry | Refusal:
        """Read the scope, apply ``decide``, write with compare-and-set; retried on a
        concurrent write, and on bus errors for up to ``unavailable`` seconds."""
        deadline = time.monotonic() + self.unavailable
        backoff = 0.05
        attempts = 0
        while True:
            try:
                kv = await self._bucket()
                try:
                    current = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    current = None
                entry = _decode(current, scope, period)
                result = decide(entry)
                if isinstance(result, Refusal) or result == entry:
                    return result
                data = msgspec.json.encode(result)
                try:
                    if current is None:
                        await kv.create(key, data)
                    else:  # (a deleted entry's marker has a revision too)
                        await kv.update(key, data, last=current.revision)
                    return result
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                    attempts += 1
                    if attempts >= _CAS_ATTEMPTS:
                        raise LedgerUnavailable(f"spend ledger: {key} changed {attempts} times in a row") from None
                    continue  # someone wrote first: read again, decide again
            except (ConfigError, LedgerUnavailable):
                raise
            except _NATS_ERRORS as e:
                if time.monotonic() + backoff > deadline:
                    raise LedgerUnavailable(f"spend ledger unreachable for {self.unavailable:.0f}s: "
                                            f"{type(e).__name__}: {e}") from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


class SpendWatch:
    """The whole ledger and the caps, as last seen, for readers (the scheduler, the
    status API, ``ccc budget``). ``on_change`` runs after each change (e.g. to wake the
    scheduler when a cap is raised)."""

    def __init__(self, nc: Client, ns: Namespace, *, on_change: Callable[[], None] | None = None,
                 timeout: float = 2.0) -> None:
        self.entries: dict[str, Entry] = {}
        self.caps = Caps()
        self.on_change = on_change
        self.version = 0  # +1 whenever a scope may have become exhausted or free
        self._spend = KVFollower(nc, spend_bucket(ns), self._entry, name="spend", timeout=timeout)
        self._caps = KVFollower(nc, config_bucket(ns), self._cap, keys=BUDGET, name="caps", timeout=timeout)
        self.errors: list[str] = []

    async def start(self, *, wait: float = 5.0) -> bool:
        a = await self._spend.start(wait=wait)
        b = await self._caps.start(wait=wait)
        return a and b

    async def stop(self) -> None:
        await self._spend.stop()
        await self._caps.stop()

    def book(self) -> Book:
        return Book(self.entries, self.caps, self.version)

    def _changed(self) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def _entry(self, key: str, value: bytes | None) -> None:
        old = self.entries.get(key)
        if value is None:
            self.entries.pop(key, None)
        else:
            try:
                self.entries[key] = msgspec.json.decode(value, type=Entry)
            except (msgspec.ValidationError, msgspec.DecodeError):
                log.error("spend.entry_unreadable", key=key, value=value[:200])
                return
        # the ledger changes twice per call per scope: readers hear only of what can change
        # a wait (a scope becoming exhausted or not), not of every settlement
        new = self.entries.get(key)
        scope = entry_scope(key, new or old) if (new or old) is not None else None
        cap = self.caps.cap(scope) if scope is not None else None
        if exhausted(old, cap) != exhausted(new, cap):
            self._changed()

    def _cap(self, key: str, value: bytes | None) -> None:
        try:
            self.caps = Caps() if value is None else decode_setting(key, value, Caps)
        except ConfigError as e:
            self.errors.append(str(e))
            log.error("spend.caps_unreadable", error=str(e))
            return
        self._changed()


async def read_book(nc: Client, ns: Namespace, *, timeout: float = 5.0) -> Book:
    """The ledger and the caps now (one-shot: ``ccc budget``, ``ccc tasks``). A stored
    caps value that does not decode is a ConfigError; a cluster without the ledger's
    bucket (provisioned before it existed) has spent nothing under no caps."""
    try:
        await nc.jetstream(timeout=timeout).key_value(spend_bucket(ns))
    except nats.js.errors.BucketNotFoundError:
        return Book()
    except _NATS_ERRORS as e:
        raise LedgerUnavailable(f"spend ledger: {type(e).__name__}: {e}") from None
    watch = SpendWatch(nc, ns, timeout=min(timeout, 2.0))
    try:
        if not await watch.start(wait=timeout):
            raise LedgerUnavailable(f"spend ledger: could not read {spend_bucket(ns)} within {timeout:g}s")
        if watch.errors:
            raise ConfigError(watch.errors[-1])
        return watch.book()
    finally:
        await watch.stop()
