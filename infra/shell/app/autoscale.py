"""The autoscaler: runs the policy (:mod:`projections.autoscale`) every few seconds inside
``ccc up`` and starts or stops local agents accordingly, recording every decision as an
event on ``<ns>.cluster.scaled_up`` / ``scaled_down`` (:mod:`events.cluster`).

It owns nothing but its timing: the agents are the cluster's list (``agents``, which it
appends to and removes from), a new one comes from ``spawn(agent_id, specialty)`` (the
cluster builds, connects and starts it; ids are ``<prefix>-<specialty>-<k>``, ``k`` the
lowest free, see :func:`agent_ids`), ``on_stopped(agent)`` lets the cluster release what
it gave a stopped one (its connection), and what it sees comes from ``view()`` (the
coordinator's read model: tasks and agents).

Stopping an agent drains it first: ``agent.drain()`` (maintenance: the scheduler assigns
it nothing more), then, if an assignment raced the decision, up to ``drain_timeout``
seconds for that work to finish, then ``agent.stop()`` (which hands back whatever is
still running: the coordinator re-queues it, nothing is lost).

One decision per round, and after a scale-up the next round waits (at most ``settle``
seconds) until the new agent is online in the view, so the policy sees its effect
before deciding again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import structlog
from nats.aio.client import Client

from actors.agent import Agent
from events.aio import cancel_and_wait, wait_event
from events.agent_state import ONLINE, AgentState
from events.cluster import ClusterScaledDown, ClusterScaledUp, cluster_stream, encode_cluster_event
from events.errors import ConfigError
from events.spend import Book
from events.subjects import Namespace, check_id
from events.task_state import TaskState
from projections.autoscale import AutoscalePolicy, Decision, Managed, decide

log = structlog.get_logger("ccc.autoscale")

View = Callable[[], tuple[Mapping[str, TaskState], Mapping[str, AgentState]]]
Spawn = Callable[[str, str], Awaitable[Agent]]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Autoscaler:
    def __init__(
        self,
        nc: Client,
        ns: Namespace,
        policy: AutoscalePolicy,
        *,
        view: View,
        agents: list[Agent],
        spawn: Spawn,
        interval: float = 2.0,
        drain_timeout: float = 30.0,
        settle: float = 15.0,
        on_stopped: Callable[[Agent], Awaitable[None]] | None = None,
        name: str = "autoscaler",
        agent_prefix: str = "auto",
        clock: Callable[[], datetime] = utcnow,
        budget: Callable[[], Book | None] | None = None,
    ) -> None:
        self.budget = budget  # the spend ledger: tasks it holds back are no demand
        self.policy = policy.validate()
        if interval <= 0 or drain_timeout < 0 or settle < 0:
            raise ConfigError("autoscaler: interval must be > 0, drain timeout and settle >= 0")
        self.nc, self.ns, self.view, self.agents, self.spawn = nc, ns, view, agents, spawn
        self.interval, self.drain_timeout, self.settle = interval, drain_timeout, settle
        self.name = check_id(name, "autoscaler name")
        self.agent_prefix = check_id(agent_prefix, "agent prefix")
        self.clock = clock
        self.on_stopped = on_stopped  # after a scale-down's stop: e.g. close the agent's connection
        self.js = nc.jetstream(timeout=5.0)
        self.last_up: datetime | None = None
        self.last_down: datetime | None = None
        self.decisions: list[ClusterScaledUp | ClusterScaledDown] = []  # this run's, for tests and logs
        self._counter = 0
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop deciding (a scale-down under way finishes: its agent is stopped, not lost)."""
        self._stopping.set()
        if self._task is not None:
            # a scale-down under way gets its drain and stop; then the round is cancelled
            await asyncio.wait({self._task}, timeout=self.drain_timeout + 15.0)
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
            except Exception as e:  # noqa: BLE001 - one bad round must not end autoscaling
                log.warning("autoscale.round_failed", error=f"{type(e).__name__}: {e}")
            await wait_event(self._stopping, self.interval)

    # -- one round ---------------------------------------------------------------------
    def managed(self) -> list[Managed]:
        return [Managed(agent_id=a.id, specialties=tuple(a.config.specialties)) for a in self.agents]

    async def step(self) -> Decision | None:
        """Decide once and act on it; returns the decision (None: nothing to do)."""
        tasks, agents = self.view()
        now = self.clock()
        decision = decide(tasks, agents, self.managed(), self.policy, now,
                          last_up=self.last_up, last_down=self.last_down,
                          budget=self.budget() if self.budget is not None else None)
        if decision is None:
            return None
        log.info("autoscale.decided", action=decision.action, specialty=decision.specialty,
                 reason=decision.reason, agent_id=decision.agent_id or None)
        if decision.action == "scaled_up":
            await self._scale_up(decision, now)
        else:
            await self._scale_down(decision, now)
        return decision

    def _next_id(self, specialty: str) -> str:
        """``<prefix>-<specialty>-<k>``, the lowest ``k`` not running: ids are bounded
        (``k <= max_agents``), so a secure server can have their credentials made ahead
        (:func:`agent_ids`), and an id comes back after a scale-down as an agent restart."""
        taken = {a.id for a in self.agents}
        return next(agent_id for k in range(1, len(taken) + 2)
                    if (agent_id := f"{self.agent_prefix}-{specialty}-{k}") not in taken)

    async def _scale_up(self, d: Decision, now: datetime) -> None:
        self.last_up = now
        agent_id = self._next_id(d.specialty)
        outcome = "done"
        try:
            agent = await self.spawn(agent_id, d.specialty)
        except Exception as e:  # noqa: BLE001 - on record, and the next round may try again
            outcome = f"failed: {type(e).__name__}: {e}"
            log.warning("autoscale.start_failed", agent_id=agent_id, error=outcome)
        else:
            self.agents.append(agent)
        await self._record(ClusterScaledUp, d, agent_id, outcome,
                           after=d.agents_after if outcome == "done" else d.agents_before)
        if outcome == "done":
            await self._settle(agent_id)

    async def _settle(self, agent_id: str) -> None:
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline and not self._stopping.is_set():
            state = self.view()[1].get(agent_id)
            if state is not None and state.status in ONLINE:
                return
            await asyncio.sleep(0.05)

    async def _scale_down(self, d: Decision, now: datetime) -> None:
        self.last_down = now
        agent = next((a for a in self.agents if a.id == d.agent_id), None)
        if agent is None:
            return  # gone since the view was taken: nothing decided after all
        outcome = "done"
        try:
            await agent.drain()
            deadline = time.monotonic() + self.drain_timeout
            while agent.running and time.monotonic() < deadline:  # an assignment raced the decision
                await asyncio.sleep(0.05)
            await agent.stop()  # hands back what still runs: re-queued, not lost
        except Exception as e:  # noqa: BLE001
            outcome = f"failed: {type(e).__name__}: {e}"
            log.warning("autoscale.stop_failed", agent_id=agent.id, error=outcome)
        finally:
            with contextlib.suppress(ValueError):
                self.agents.remove(agent)  # stopped or broken: either way no longer ours to run
        if self.on_stopped is not None:
            try:
                await self.on_stopped(agent)
            except Exception as e:  # noqa: BLE001
                log.warning("autoscale.on_stopped_failed", agent_id=agent.id, error=f"{type(e).__name__}: {e}")
        await self._record(ClusterScaledDown, d, agent.id, outcome, after=d.agents_after)

    async def _record(self, kind, d: Decision, agent_id: str, outcome: str, *, after: int) -> None:
        at = self.clock()
        event = kind(event_id=f"{self.name}:{d.action}:{agent_id}:{at.isoformat()}", occurred_at=at,
                     actor=self.name, specialty=d.specialty, reason=d.reason, queue_depth=d.queue_depth,
                     oldest_wait=round(d.oldest_wait, 3), agents_before=d.agents_before, agents_after=after,
                     agent_id=agent_id, outcome=outcome)
        self.decisions.append(event)
        try:
            await self.js.publish(self.ns.subject(event.rel_subject), encode_cluster_event(event),
                                  stream=cluster_stream(self.ns), headers={"Nats-Msg-Id": event.event_id})
        except Exception as e:  # noqa: BLE001 - the decision stands; the log line keeps it
            log.warning("autoscale.not_recorded", event_id=event.event_id, error=f"{type(e).__name__}: {e}")


def agent_ids(policy: AutoscalePolicy, specialties: tuple[str, ...], agent_prefix: str = "auto") -> list[str]:
    """Every id the autoscaler may give an agent of ``specialties``: what a secure server
    needs credentials for before the autoscaler starts one."""
    policy.validate()
    return [f"{check_id(agent_prefix, 'agent prefix')}-{sp}-{k}" for sp in specialties
            for k in range(1, policy.max_agents + 1)]


__all__ = ["Autoscaler", "Spawn", "View", "agent_ids"]
