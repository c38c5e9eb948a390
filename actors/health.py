"""Agent health: liveness kept by nats-server, ``agent.offline`` out.

Every heartbeat (``<ns>.hb.<agent>``, latest per agent) carries a per-message TTL
(``Nats-TTL``): nats-server removes it once that long has passed unless the agent's next
heartbeat replaced it first. The subjects left in the heartbeats stream are therefore the
agents heard from within their TTL, and this monitor only asks for that list, once per
poll (one stream-info request whose answer names the subjects), instead of receiving
every heartbeat: with 1,000 agents heartbeating every 2 s that is 500 messages a second
the coordinator no longer handles (measured in ``ccc bench fleet``; README, "A thousand
agents"). Subject delete markers were the other way to hear about expiries, but a marker
lands on the heartbeat's own subject, so whoever consumes the markers receives every
heartbeat too: a poll of the subject list is the one read that costs nothing per
heartbeat.

What the monitor knows of each online agent is one number, the last moment it is known
to have been alive (``last_alive``, this process's monotonic clock, never another host's):

* its heartbeat is in the stream at a poll        -> alive at that poll;
* gone at a poll after being there (expired: it was
  sent at least its TTL before)                    -> alive no later than poll - TTL;
* its registration seen (a new incarnation), the
  monitor starting, or a reconnect                 -> a full timeout of grace from then:
  an agent is never declared lost before it could heartbeat at all.

An agent silent for longer than the timeout by that measure gets ``agent.offline``
(reason ``heartbeat_timeout``) appended to its aggregate with the usual concurrency
check. So an agent is never declared before ``timeout`` of real silence, and an agent
that stops is declared within ``timeout`` + one poll + the server's expiry lag (~0.3 s)
as long as its TTL is at most the timeout. Each agent's TTL is read once from its
heartbeat's header (a direct get when it first shows up); a heartbeat without a TTL (an
agent from before them) never expires by itself, so such an agent is followed by its
heartbeat's stream sequence instead, one direct get per poll.

Taking an agent's tasks back is not done here: the coordinator's report handler reacts
to ``agent.offline`` whoever wrote it, so a clean shutdown and a lost agent take the
same path.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime, timezone

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from events import agent_state as ag
from events.errors import ConcurrencyConflict, StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace
from events.aio import cancel_and_wait
from projections.read_model import ReadModel

log = structlog.get_logger("ccc.health")

TTL_HEADER = "Nats-TTL"
MIN_TTL = 1.0  # nats-server refuses a per-message TTL under a second
FETCH_CONCURRENCY = 64  # direct gets in flight while learning TTLs (a thousand agents at a start)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def heartbeat_ttl(interval: float) -> float:
    """The TTL an agent heartbeating every ``interval`` seconds gives each heartbeat: two
    intervals (one late heartbeat does not make it vanish), at least nats-server's
    minimum. Keep it at most the coordinator's timeout, or a loss is noticed only after
    the TTL (``ccc up`` derives the interval from the timeout: a quarter of it)."""
    if interval <= 0:
        raise ValueError(f"the heartbeat interval must be > 0, not {interval}")
    return max(MIN_TTL, 2 * interval)


def format_ttl(seconds: float) -> str:
    """``Nats-TTL`` as nats-server reads it: a Go duration (``4s``, ``1.5s``)."""
    if seconds < MIN_TTL:
        raise ValueError(f"a heartbeat TTL must be >= {MIN_TTL:g}s (nats-server's minimum), not {seconds:g}s")
    return f"{round(seconds, 3):g}s"


def parse_ttl(value: str | None) -> float | None:
    """Seconds of a ``Nats-TTL`` header (integer seconds or a Go duration such as
    ``1m30s``); None when absent, ``never`` or unreadable (the message never expires)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text) or None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts) or None


class _State(msgspec.Struct, gc=False):
    subjects: dict[str, int] = {}


class _Error(msgspec.Struct, gc=False):
    code: int = 0
    description: str = ""


class _Info(msgspec.Struct, gc=False):
    """The part of a ``$JS.API.STREAM.INFO`` answer the poll reads (the subjects are
    paged when there are very many)."""

    state: _State = msgspec.field(default_factory=_State)
    total: int = 0
    offset: int = 0
    limit: int = 0
    error: _Error | None = None


_decode_info = msgspec.json.Decoder(_Info).decode


class _Watch:
    """What the monitor knows of one incarnation of one agent."""

    __slots__ = ("incarnation", "since", "last_alive", "present", "ttl", "ttl_known", "seq")

    def __init__(self, incarnation: object, now: float) -> None:
        self.incarnation = incarnation
        self.since = now  # its grace: a full timeout from when we first see it
        self.last_alive = now
        self.present = False
        self.ttl: float | None = None
        self.ttl_known = False
        self.seq = 0  # its heartbeat's stream sequence (followed when it has no TTL)


class HealthMonitor:
    def __init__(self, nc: Client, ns: Namespace, store: EventStore, model: ReadModel, *,
                 name: str, timeout: float, poll: float | None = None) -> None:
        """``poll``: seconds between two looks at the heartbeats stream (default: an
        eighth of the timeout, between 0.1 and 0.5 s)."""
        if timeout <= 0:
            raise ValueError(f"the heartbeat timeout must be > 0, not {timeout}")
        self.nc = nc
        self.ns = ns
        self.store = store
        self.model = model
        self.name = name
        self.timeout = timeout
        self.poll = poll if poll is not None else min(0.5, max(0.1, timeout / 8))
        if self.poll <= 0:
            raise ValueError(f"the poll interval must be > 0, not {self.poll}")
        self.js = nc.jetstream(timeout=2.0)
        self.watches: dict[str, _Watch] = {}
        self.polls = 0  # looks at the stream that got an answer
        self.fetches = 0  # direct gets of a heartbeat (TTLs learnt, TTL-less agents followed)
        self._forgiven_at = float("-inf")
        self._reconnects = nc.stats.get("reconnects", 0)
        self._task: asyncio.Task | None = None
        self._subjects_filter = f"{ns.prefix}.hb.*"
        self._info_subject = f"$JS.API.STREAM.INFO.{ns.heartbeats_stream}"

    async def start(self) -> None:
        self.watches.clear()  # every agent online now gets its grace from now
        self._task = asyncio.create_task(self._loop(), name="health")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - the monitor must survive
                log.warning("health.check_failed", error=f"{type(e).__name__}: {e}")

    # -- what the server holds -------------------------------------------------------
    async def present(self) -> set[str]:
        """The agents whose heartbeat is in the stream now (one request per few
        thousand agents)."""
        found: set[str] = set()
        offset = 0
        while True:
            request = {"subjects_filter": self._subjects_filter, "offset": offset}
            reply = await self.nc.request(self._info_subject, json.dumps(request).encode(), timeout=2.0)
            info = _decode_info(reply.data)
            if info.error is not None:
                raise StoreUnavailable(f"{self.ns.heartbeats_stream}: {info.error.description} "
                                       f"({info.error.code})")
            subjects = info.state.subjects
            found.update(s.rsplit(".", 1)[1] for s in subjects)
            offset += len(subjects)
            if not subjects or offset >= info.total:
                return found

    async def _heartbeat_of(self, agent_id: str) -> tuple[int, float | None] | None:
        """(stream sequence, TTL) of the agent's stored heartbeat, None if gone."""
        self.fetches += 1
        try:
            msg = await self.js.get_msg(self.ns.heartbeats_stream, subject=self.ns.heartbeat_subject(agent_id),
                                        direct=True)
        except nats.js.errors.NotFoundError:
            return None
        return msg.seq or 0, parse_ttl((msg.headers or {}).get(TTL_HEADER))

    # -- the check -------------------------------------------------------------------
    async def check(self) -> list[str]:
        """Look at the heartbeats once; declare silent agents offline; returns their ids."""
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            # we were cut off: what we did not see says nothing about the agents
            self._reconnects = reconnects
            self.watches.clear()
            return []
        online = {a.agent_id: a for a in self.model.agents.values() if a.status != "offline"}
        try:
            present = await self.present()
        except (nats.errors.Error, nats.js.errors.Error, StoreUnavailable, asyncio.TimeoutError, OSError) as e:
            log.info("health.poll_failed", error=f"{type(e).__name__}: {e}")
            return []  # no answer, no verdict: the next poll asks again
        self.polls += 1
        now = time.monotonic()
        for gone in self.watches.keys() - online.keys():
            del self.watches[gone]
        learn: list[tuple[str, _Watch]] = []
        for agent_id, agent in online.items():
            w = self.watches.get(agent_id)
            if w is None or w.incarnation != agent.registered_at:
                # first seen, or registered again: its grace starts now, not when we started
                w = self.watches[agent_id] = _Watch(agent.registered_at, now)
            if agent_id in present:
                if w.ttl_known and w.ttl is not None:
                    w.present, w.last_alive = True, now
                else:  # its TTL to learn, or no TTL: its heartbeat's sequence tells
                    learn.append((agent_id, w))
            else:
                self._absent(w, now)
        if learn:
            await self._learn(learn, now)
        return await self._declare(online, present, now)

    def _absent(self, w: _Watch, now: float) -> None:
        if w.present and w.ttl is not None:
            # it was there at the last poll and has expired since: sent at least its TTL
            # before now (or before that poll, whichever is earlier), though never before
            # its registration was seen
            w.last_alive = max(w.since, min(w.last_alive, now - w.ttl))
        w.present = False

    async def _learn(self, todo: list[tuple[str, _Watch]], now: float) -> None:
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(agent_id: str, w: _Watch) -> None:
            async with slots:
                try:
                    got = await self._heartbeat_of(agent_id)
                except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
                    log.info("health.fetch_failed", agent_id=agent_id, error=f"{type(e).__name__}: {e}")
                    return  # nothing learnt: it keeps what it had
            if got is None:  # expired between the poll and the get
                self._absent(w, now)
                return
            seq, ttl = got
            if not w.ttl_known and ttl is not None and ttl > self.timeout:
                log.warning("health.ttl_above_timeout", agent_id=agent_id, ttl=ttl, timeout=self.timeout)
            w.ttl, w.ttl_known = ttl, True
            if ttl is not None or seq != w.seq:
                w.present, w.last_alive, w.seq = True, now, seq

        await asyncio.gather(*(one(a, w) for a, w in todo))

    async def _declare(self, online: dict[str, ag.AgentState], present: set[str], now: float) -> list[str]:
        lost: list[str] = []
        silent = [a for a in online if now - self.watches[a].last_alive > self.timeout]
        if not silent:
            return lost
        if len(online) > 1 and len(silent) == len(online) and present.isdisjoint(online) \
                and now - self._forgiven_at > 3 * self.timeout:
            # silence from *every* agent at once says more about us or the server (a
            # stall, a leader election, heartbeats refused) than about them: give them one
            # more grace period (once; if they stay silent through it, they really are gone)
            log.warning("health.no_heartbeats_at_all", agents=len(online))
            self._forgiven_at = now
            for w in self.watches.values():
                w.since = w.last_alive = now
            return lost
        at = datetime.now(timezone.utc)
        items = []
        for agent_id in silent:
            [event] = ag.decide(online[agent_id], ag.GoOffline(at=at, actor=self.name, reason="heartbeat_timeout"))
            items.append((event, self.model.agent_seq[agent_id]))
        # pipelined (independent aggregates): a mass loss is declared in one round trip,
        # not one fsync after another
        for agent_id, result in zip(silent, await self.store.append_many(items)):
            if isinstance(result, ConcurrencyConflict):
                continue  # it just wrote something: alive, or another coordinator acted
            if isinstance(result, Exception):
                log.info("health.offline_not_recorded", agent_id=agent_id, error=str(result))
                continue  # the next poll tries again
            log.warning("agent.lost", agent_id=agent_id, silent_for=round(now - self.watches[agent_id].last_alive, 1))
            lost.append(agent_id)
        return lost

