"""Forge CI: run a pull request's checks where the forge has nobody to run them, and
record the results as forge facts.

A task waits for checks after each push (``task.pr_opened``: the PR head), each re-run
the coordinator asks for (``task.checks_rerun``) and each merge-queue candidate
(``task.merge_testing``). This actor follows those task events with a durable consumer
and, for a task whose issue comes from a forge it has a :class:`CIRunner` for, asks
the runner to run them. The local forge's runner runs ``.ccc/test-command`` in the
sandbox and returns the result; GitHub's asks GitHub (its results arrive by webhook)
and returns None. A returned :class:`~events.issue.IssueChecksCompleted` is published
on the issues stream, where the coordinator's intake takes it like any other forge fact.

Only what is still awaited runs: the task's *current* state (from the store, or a live
read model) must await checks of that very commit at that very re-run (a ``pr_opened``
whose head was pushed over, or a re-run already answered, is skipped).

Redelivery: the published fact's id is ``ci:<task>:<sha>:<version of the triggering
event>``, so the same trigger handled twice (a crash after publishing, before the ack)
publishes one fact within the stream's duplicate window; after it, the coordinator
ignores checks of a commit it no longer awaits, so a late duplicate is harmless.

Runs are slow (a test suite): they are handled concurrently (bounded by
``concurrency``), one at a time per task, and the message is kept from redelivery
meanwhile with in-progress acks. A runner's error is logged; retryable ones nak the
event (redelivered with backoff by :class:`~actors.runtime.ConsumerLoop`), permanent
ones ack it: retrying could not change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import NamedTuple, Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events.codec import decode_event
from events.errors import CccError, StoreUnavailable
from events.issue import IssueChecksCompleted
from events.secrets import masked_json
from events.store import MSG_ID, EventStore
from events.subjects import Namespace
from events.task import TaskChecksRerun, TaskMergeTesting, TaskPullRequestOpened
from events.task_state import AWAITING_CHECKS, TaskState
from projections.live import LiveReadModel

from actors.ports import NO_TELEMETRY, Telemetry
from actors.runtime import ConsumerLoop

log = structlog.get_logger("ccc.forge_ci")

TRIGGERS = ("pr_opened", "checks_rerun", "merge_testing")  # the task events it follows


class CIRunner(Protocol):
    """A forge's CI, as this actor drives it."""

    source: str  # the issue source whose tasks it serves: "local", "github"

    async def commit_pushed(self, task: TaskState, sha: str, ref: str) -> IssueChecksCompleted | None:
        """Checks should run on `sha` (the PR head after a push, or a merge-queue candidate
        on `ref`). The local forge's CI runs them and returns the fact; a forge whose CI
        runs by itself (GitHub) returns None: its results arrive by webhook."""
        ...

    async def rerun(self, task: TaskState, sha: str, checks: tuple[str, ...]) -> IssueChecksCompleted | None:
        """Run the named failing checks of `sha` again (GitHub: re-run failed jobs via the API)."""
        ...


class Trigger(NamedTuple):
    """What a task event asks of the CI: checks of ``sha`` (on ``ref``), the ``rerun``-th
    re-run of them (0: the first run) or of the named ``checks`` when re-running."""

    task_id: str
    version: int
    sha: str
    ref: str
    rerun: int
    checks: tuple[str, ...] | None  # None: a first run (a push or a candidate)

    @property
    def event_id(self) -> str:
        return f"ci:{self.task_id}:{self.sha}:{self.version}"


def trigger_of(event: object) -> Trigger | None:
    """The CI run a task event asks for, or None (pure)."""
    match event:
        case TaskPullRequestOpened():
            return Trigger(event.task_id, event.version, event.head_sha, event.branch, 0, None)
        case TaskChecksRerun():
            return Trigger(event.task_id, event.version, event.head_sha, "", event.rerun, tuple(event.checks))
        case TaskMergeTesting():
            return Trigger(event.task_id, event.version, event.queue_sha, event.queue_ref, 0, None)
    return None


def awaits(state: TaskState, trigger: Trigger) -> bool:
    """Whether the task still waits for exactly the checks ``trigger`` asks for (pure):
    its awaited commit (the head, or the merge-queue candidate while merging) and how
    often it was re-run must both match."""
    if state.status not in AWAITING_CHECKS or not trigger.sha:
        return False
    awaited = state.queue_sha if state.status == "merging" else state.head_sha
    return awaited == trigger.sha and state.reruns == trigger.rerun


class ForgeCI:
    def __init__(
        self,
        nc: Client,
        ns: Namespace,
        runners: Iterable[CIRunner],
        *,
        name: str = "forge-ci",
        live: LiveReadModel | None = None,
        concurrency: int = 4,
        ack_wait: float = 10.0,  # a run in progress says so every ack_wait/3: a lost one is redelivered soon
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self.nc = nc
        self.ns = ns
        self.runners: dict[str, CIRunner] = {}
        for runner in runners:
            if runner.source in self.runners:
                raise ValueError(f"two CI runners for the issue source {runner.source!r}")
            self.runners[runner.source] = runner
        self.name = name
        self.live = live
        self.store = live.store if live is not None else EventStore(nc, ns)
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.telemetry = telemetry
        self.js = nc.jetstream(timeout=10.0)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._loop: ConsumerLoop | None = None
        self.published = 0  # facts published (duplicates included)
        self.skipped = 0  # triggers no longer awaited, or of a forge without a runner here
        self.skipped_errors = 0  # permanent runner errors logged and acked

    async def start(self) -> None:
        self._loop = ConsumerLoop(
            self.nc, stream=self.ns.events_stream, durable=self.name,
            filter_subjects=[f"{self.ns.prefix}.task.*.{kind}" for kind in TRIGGERS],
            handler=self._on_task_event, concurrency=self.concurrency, ack_wait=self.ack_wait,
            telemetry=self.telemetry,
        )
        await self._loop.start()
        log.info("forge_ci.started", name=self.name, sources=sorted(self.runners))

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()

    @property
    def handled(self) -> int:
        return self._loop.handled if self._loop is not None else 0

    async def _on_task_event(self, msg: Msg) -> None:
        trigger = trigger_of(decode_event(self.ns.rel(msg.subject), msg.data))  # BadEventError: parked
        if trigger is None:
            return
        lock = self._locks.get(trigger.task_id)
        if lock is None:
            lock = self._locks[trigger.task_id] = asyncio.Lock()
        async with self._in_progress(msg), lock:  # (waiting for the lock counts as work too)
            try:
                await self.handle(trigger, min_seq=msg.metadata.sequence.stream)
            except CccError as e:
                if e.retryable:
                    raise  # nak: the loop redelivers with backoff
                self.skipped_errors += 1
                log.warning("forge_ci.skipped", task_id=trigger.task_id, sha=trigger.sha, error=str(e))

    async def handle(self, trigger: Trigger, *, min_seq: int = 0) -> IssueChecksCompleted | None:
        """Run what ``trigger`` asks for if the task still awaits it, and publish the result;
        returns the fact published (None: nothing to publish)."""
        state = await self._current(trigger.task_id, min_seq)
        runner = self.runners.get(state.issue.source) if state is not None else None
        if state is None or runner is None:
            self.skipped += 1
            return None
        if not awaits(state, trigger):
            self.skipped += 1
            log.info("forge_ci.not_awaited", task_id=trigger.task_id, sha=trigger.sha, status=state.status,
                     head_sha=state.head_sha, queue_sha=state.queue_sha, reruns=state.reruns)
            return None
        log.info("forge_ci.running", task_id=trigger.task_id, sha=trigger.sha, rerun=trigger.rerun,
                 source=runner.source)
        if trigger.checks is None:
            fact = await runner.commit_pushed(state, trigger.sha, trigger.ref)
        else:
            fact = await runner.rerun(state, trigger.sha, trigger.checks)
        if fact is None:
            return None  # the forge's own CI reports by webhook
        # the fact is about this task's issue, under an id this trigger determines
        issue = state.issue
        fact = msgspec.structs.replace(fact, event_id=trigger.event_id, source=issue.source, repo=issue.repo,
                                       number=issue.number, head_sha=trigger.sha)
        await self._publish(fact)
        return fact

    async def _current(self, task_id: str, min_seq: int) -> TaskState | None:
        if self.live is not None:
            try:
                await self.live.wait_for_seq(min_seq)
            except TimeoutError:
                raise StoreUnavailable(f"read model has not reached sequence {min_seq}") from None
            return self.live.model.tasks.get(task_id)
        return (await self.store.load_task(task_id))[0]

    async def _publish(self, fact: IssueChecksCompleted) -> None:
        subject = self.ns.subject(fact.rel_subject)
        try:
            # masked like every event (events.secrets): a log tail may carry a secret
            ack = await self.js.publish(subject, masked_json(fact), headers={MSG_ID: fact.event_id},
                                        stream=self.ns.issues_stream)
        except nats.js.errors.APIError as e:
            raise StoreUnavailable(f"publish {subject}: {e.description or e}") from None
        except (nats.errors.Error, TimeoutError, OSError) as e:
            raise StoreUnavailable(f"publish {subject}: {type(e).__name__}: {e}") from None
        self.published += 1
        log.info("forge_ci.published", task_id=fact.event_id.split(":")[1], sha=fact.head_sha, seq=ack.seq,
                 duplicate=bool(ack.duplicate),
                 conclusions={c.name: c.conclusion for c in fact.checks}, base=fact.base)

    @contextlib.asynccontextmanager
    async def _in_progress(self, msg: Msg) -> AsyncIterator[None]:
        """Tell the server, while the block runs, that ``msg`` is being worked on, so a
        long run is not redelivered to another handler after ``ack_wait``."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.ack_wait / 3)
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.in_progress()

        task = asyncio.create_task(beat(), name=f"{self.name}-in-progress")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
