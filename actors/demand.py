"""The demand actor: keeps a board of the tasks that need an agent slot, one entry per
task, equal to what the read model says (:func:`projections.demand.demand`: waiting for
an agent — queued and startable now — or holding one), so that something outside the
cluster can count them per specialty.

What it is for: KEDA scales one agent Deployment per specialty on the pending messages
of a named JetStream consumer. Tasks reach agents by assignment (each agent's consumer
holds only what was already given to it), so no consumer of the event log counts what a
specialty needs. The board (``<NS>_DEMAND``: one message per task on
``<ns>.demand.<specialty>.<task_id>``, at most one per subject, and one durable consumer
per specialty that nobody pulls; ``infra.adapters.nats.demand``) does: each consumer's
pending count is the number of that specialty's tasks waiting or being worked on (why
both: :mod:`projections.demand`).

How: the actor follows the coordinator's live read model (it is one of its observers:
any task event, or an agent's registration, wakes it) and, on each wake, diffs the
demand against what it has put on the board — a put for a task that became startable,
a removal for one that needs no agent any more (its pull request is open, it was
cancelled, it is blocked again), a move when a task's slot changes specialty (a general
agent took it) — never a rewrite. A retry backoff ends with no event, so it also wakes
when the earliest one ends. On start, and every ``resync`` seconds, it reads back what
the board holds instead of trusting its own memory, so a crash, a restart, a second
coordinator or an operator's purge all end with the board right. Every step is idempotent: a put of a task already there replaces its one
message, a removal of one not there removes nothing.

The board is soft state: the log stays the database, and the board can be emptied at
any time (the next resync puts back what is missing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import msgspec
import structlog

from events.spend import Book
from events.agent import AgentRegistered
from events.aio import cancel_and_wait, wait_event
from events.errors import ConfigError
from events.task import TaskEventBase
from projections.demand import Demand, Key, demand, next_change
from projections.live import LiveReadModel

log = structlog.get_logger("ccc.demand")

MAX_RETRY = 30.0  # seconds between two tries at most, while the board cannot be written


class DemandBoard(Protocol):
    """Where the tasks needing an agent slot are posted, one entry per (specialty, task)."""

    async def put(self, specialty: str, task_id: str, body: bytes) -> None:
        """Post (or replace) the task's one entry."""

    async def remove(self, specialty: str, task_id: str) -> None:
        """Take the task's entry down (nothing if there is none)."""

    async def current(self) -> set[Key]:
        """Every (specialty, task_id) the board holds now."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class DemandActor:
    def __init__(
        self,
        board: DemandBoard,
        live: LiveReadModel,
        *,
        name: str = "demand",
        resync: float = 60.0,
        retry: float = 1.0,
        concurrency: int = 32,
        clock: Callable[[], datetime] = utcnow,
        budget: Callable[[], Book | None] | None = None,
    ) -> None:
        self.budget = budget  # the spend ledger as the scheduler sees it: held-back tasks need no agent
        if resync <= 0 or retry <= 0 or concurrency < 1:
            raise ConfigError("demand: resync and retry must be > 0 seconds, concurrency >= 1")
        self.board, self.live, self.name = board, live, name
        self.resync, self.retry, self.clock = resync, retry, clock
        self._limit = asyncio.Semaphore(concurrency)
        self.held: set[Key] = set()  # what the board holds, as far as this actor knows
        self.puts = 0  # changes made since the start (for logs and tests)
        self.removals = 0
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._next_resync = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Follow the model (it must be started: the coordinator's is) and bring the
        board to it. A board that cannot be read yet is retried by the loop."""
        self.live.observers.append(self._observe)
        try:
            await self.reconcile()
        except Exception as e:  # noqa: BLE001 - the loop retries; the coordinator runs meanwhile
            log.warning("demand.reconcile_failed", error=f"{type(e).__name__}: {e}")
            self._next_resync = 0.0
            self._kick.set()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._observe in self.live.observers:
            self.live.observers.remove(self._observe)
        await cancel_and_wait([self._task])
        self._task = None

    def _observe(self, seq: int, item: object) -> None:
        # a task's events change what waits and who holds what; an agent's registration,
        # the specialties of what it will hold
        if isinstance(item, (TaskEventBase, AgentRegistered)):
            self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    # -- the work ----------------------------------------------------------------------
    def wanted(self) -> dict[Key, Demand]:
        model = self.live.model
        return demand(model.tasks, model.agents, self.clock(), queued=model.queued, holder=model.holder,
                      budget=self.budget() if self.budget is not None else None)

    async def reconcile(self) -> tuple[int, int]:
        """Read what the board holds, then make it the demand: after a restart, a crash
        between a decision and its write, or anyone else's change to the board."""
        self.held = set(await self.board.current())
        self._next_resync = time.monotonic() + self.resync
        return await self.sync()

    async def sync(self) -> tuple[int, int]:
        """Make the board the demand, from what this actor believes it holds: the puts
        and removals of the difference, nothing else. Returns (put, removed); raises the
        first failure after trying every change (the next round retries the rest)."""
        wanted = self.wanted()
        add = [wanted[k] for k in sorted(wanted.keys() - self.held)]
        drop = sorted(self.held - wanted.keys())
        if not add and not drop:
            return 0, 0
        outcomes = await asyncio.gather(*(self._put(d) for d in add), *(self._remove(k) for k in drop),
                                        return_exceptions=True)
        failed = [r for r in outcomes if isinstance(r, BaseException)]
        put = sum(not isinstance(r, BaseException) for r in outcomes[:len(add)])
        removed = sum(not isinstance(r, BaseException) for r in outcomes[len(add):])
        self.puts += put
        self.removals += removed
        log.info("demand.synced", put=put, removed=removed, entries=len(self.held), failed=len(failed))
        if failed:
            raise failed[0]
        return put, removed

    async def _put(self, d: Demand) -> None:
        async with self._limit:
            await self.board.put(d.specialty, d.task_id, msgspec.json.encode(d))
        self.held.add(d.key)

    async def _remove(self, key: Key) -> None:
        async with self._limit:
            await self.board.remove(*key)
        self.held.discard(key)

    def _timeout(self) -> float:
        model = self.live.model
        until_backoff = next_change(model.tasks, self.clock(), model.queued)
        until_resync = max(0.0, self._next_resync - time.monotonic())
        # (a backoff's end is compared with another clock's `now`: a little late is fine)
        return until_resync if until_backoff is None else min(until_resync, until_backoff + 0.01)

    async def _run(self) -> None:
        failures = 0
        while True:
            await wait_event(self._kick, self._timeout())
            self._kick.clear()
            try:
                if time.monotonic() >= self._next_resync:
                    await self.reconcile()
                else:
                    await self.sync()
                failures = 0
            except Exception as e:  # noqa: BLE001 - the board is soft state: try again shortly
                failures += 1
                log.warning("demand.sync_failed", error=f"{type(e).__name__}: {e}", failures=failures)
                # (a missing stream waits for provisioning: no warning every second meanwhile)
                await asyncio.sleep(min(self.retry * 2 ** min(failures - 1, 5), MAX_RETRY))
                self._kick.set()


__all__ = ["DemandActor", "DemandBoard"]
