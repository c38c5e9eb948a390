"""The coordinator: intake, analysis, scheduling, health, retries, cancellation.

It writes every task event (agents write only their own aggregate) and decides from
a live read model of the whole log. Each decision is appended with the aggregate's
last stream sequence as the expectation, so several coordinators can run at once:
a stale one gets a conflict, its message is redelivered, and by then its model has
caught up and the re-decision is a no-op or a fresh, correct choice.

Inputs:
* ``<ns>.issue.>``  (durable ``coordinator-intake``): issue facts -> task commands
* ``<ns>.agent.>``  (durable ``coordinator-reports``): agent reports -> task commands
* ``<ns>.hb.*``     (polled: which agents' heartbeats the server still holds) -> health
* the live model's changes and timers -> scheduling passes

Plugins (:mod:`actors.plugins`): the event hooks see every event the live model applies
after the start (handed to their queues, never awaited); the assignment policies are
asked about each assignment a pass plans (concurrently, each within its timeout) — a
veto or a delay holds the task back (:class:`~actors.plugins.PluginHold`, its wait
reason naming the plugin) and the next pass gives the slot to the next task in line.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events import task_state as ts
from events.agent import (
    AgentEventBase,
    AgentImplementationProduced,
    AgentPullRequestOpened,
    AgentTaskDeclined,
    AgentTaskReleased,
    AgentTaskStarted,
    AgentWentOffline,
    AgentWorkFailed,
    WorkReport,
)
from events.codec import decode_event
from events.errors import ConcurrencyConflict, DomainError, InfrastructureError
from events.store import EventStore
from events.subjects import Namespace
from events.task import (
    TaskAnalysisStarted,
    TaskCancellationRequested,
    TaskEventBase,
    TaskStarted,
    TaskTestsStarted,
)
from events.spend import Book, next_reset
from events.trust import TrustPolicy
from events.aio import cancel_and_wait, wait_event
from projections.fairness import DEFAULT_POLICY, FairnessPolicy
from projections.live import LiveReadModel

from actors.analysis import Analyser, RuleAnalyser
from actors.assignment_why import assignment_whys
from actors.health import HealthMonitor
from actors.intake import Intake, utcnow
from actors.plugins import ALLOWED, NO_PLUGINS, PluginHold, PluginHooks, hold_for
from actors.ports import NO_TELEMETRY, PullRequestBranches, SpendView, Telemetry
from actors.pull_requests import PullRequests
from actors.runtime import ConsumerLoop
from actors.scheduling import plan_assignments

log = structlog.get_logger("ccc.coordinator")

# events after which a scheduling pass cannot find anything new to do: nothing became
# queued, no dependency completed, no holder went offline, and no slot was freed — by
# the agent's view *or the task view* (a slot counts as held while its task is
# assigned/in progress/testing, so ``task.pr_opened`` frees one and must wake the
# scheduler even though the agent released the task earlier). Every other event, and
# anything undecodable, wakes it (``task.created`` too: a synchronous analyser's decision
# on it creates the task queued).
NOTHING_TO_SCHEDULE = (TaskAnalysisStarted, TaskStarted, TaskTestsStarted,
                       TaskCancellationRequested, AgentTaskStarted, WorkReport)


# reports whose task command does not depend on the task's state (``_translate``): decided
# on the view the model has when they arrive, before it has caught up with them
STATE_FREE_COMMAND = (AgentTaskStarted, AgentImplementationProduced, AgentPullRequestOpened, AgentWorkFailed)


class StaleReport(DomainError):
    """A report stored before the task's latest assignment: it belongs to an earlier round
    (e.g. redelivered after a restart, its acknowledgement lost with the process) and is
    dropped, never applied to the round that followed."""


def implies_command(report: AgentEventBase) -> bool:
    """Whether a report about a task can imply a task command (see ``_translate``); the
    others (progress reports, a release of finished or failed work) change no task state
    whatever the task's state is."""
    if isinstance(report, AgentTaskReleased):
        return report.outcome in ("cancelled", "handed_back", "lost")
    return isinstance(report, (*STATE_FREE_COMMAND, AgentTaskDeclined))


class CoordinatorConfig:
    def __init__(
        self,
        *,
        name: str = "coordinator",
        heartbeat_timeout: float = 15.0,
        retry_base: float = 5.0,
        retry_max: float = 300.0,
        max_attempts: int = 3,
        concurrency: int = 64,
        trust: TrustPolicy | None = None,
        materialize_kv: bool = False,
        max_ci_fixes: int = 2,
        max_rebases: int = 3,
        checks_timeout: float = 1800.0,
        merge_queue: bool | frozenset[str] = False,
        fairness: FairnessPolicy | None = None,
        veto_recheck: float = 30.0,
    ) -> None:
        self.name = name
        # keep the KV views (<ns>_tasks, <ns>_agents) for `nats kv get`: the coordinator's
        # job (its credentials may write them; the status API's may not)
        self.materialize_kv = materialize_kv
        self.heartbeat_timeout = heartbeat_timeout
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        # whose issue facts the intake acts on, and for which repositories (every fact is
        # re-checked here: the webhook is not the only writer of the issue subjects)
        self.trust = trust or TrustPolicy()
        # the pull request's way to green: CI fix rounds per task (apart from its
        # attempts), rebase rounds, how long checks may take, and which repositories
        # merge through the queue (True: all of them)
        if max_ci_fixes < 0 or max_rebases < 0 or checks_timeout <= 0:
            raise ValueError("max_ci_fixes and max_rebases must be >= 0 and checks_timeout > 0")
        self.max_ci_fixes = max_ci_fixes
        self.max_rebases = max_rebases
        self.checks_timeout = checks_timeout
        self.merge_queue = merge_queue
        # fair admission (projections.fairness): per-repository and per-author limits on
        # tasks with an agent, and the aging rate (default: no limits, 300 s per level)
        if fairness is not None and not isinstance(fairness, FairnessPolicy):
            raise TypeError(f"fairness must be a FairnessPolicy, got {type(fairness).__name__}")
        self.fairness = fairness or DEFAULT_POLICY
        # a task a plugin vetoed is asked about again after this many seconds
        if veto_recheck <= 0:
            raise ValueError("veto_recheck must be > 0")
        self.veto_recheck = veto_recheck


class Coordinator(Intake, PullRequests):
    def __init__(
        self,
        nc: Client,
        ns: Namespace,
        config: CoordinatorConfig | None = None,
        *,
        analyser: Analyser | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
        branches: PullRequestBranches | None = None,
        spend: SpendView | None = None,
        plugins: PluginHooks = NO_PLUGINS,
    ) -> None:
        self.nc = nc
        self.plugins = plugins  # event hooks and assignment policies (actors.plugins)
        self.holds: dict[str, PluginHold] = {}  # queued tasks a plugin holds back, until when
        self._delays_served: set[str] = set()  # queued tasks whose plugin delay is over: not asked again
        self.spend = spend  # the spend ledger: queued tasks of an exhausted scope wait (None: no caps)
        self.branches = branches  # conflicts and the merge queue (None: not followed)
        self.ns = ns
        self.config = config or CoordinatorConfig()
        self.analyser = analyser or RuleAnalyser()
        self.telemetry = telemetry
        self.store = EventStore(nc, ns)
        self.live = LiveReadModel(self.store, materialize=self.config.materialize_kv)
        self.live.observers.append(self._wake_scheduler)
        self.live.observers.append(self._wake_pull_requests)
        self.model = self.live.model
        self._kick = asyncio.Event()
        self._pr_kick = asyncio.Event()
        self._loops: list[ConsumerLoop] = []
        self._tasks: list[asyncio.Task] = []
        # per agent: the last report handler of each of its tasks (None: agent-wide), as a
        # future that is done when it is (see _in_order)
        self._lanes: dict[str, dict[str | None, asyncio.Future]] = {}
        self._written: dict[str, int] = {}  # our last append per task: the model must reach it
        # task -> [agent, seq of the assignment once appended]: intake's direct assignments
        # that the model does not show yet
        self._reserved: dict[str, list] = {}
        self.health = HealthMonitor(nc, ns, self.store, self.model, name=self.config.name,
                                    timeout=self.config.heartbeat_timeout)
        self.assignments = 0

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self.spend is not None:  # before the first pass: a task of an exhausted scope must wait
            self.spend.on_change = self.kick
            await self.spend.start()
        await self.live.start()
        # (after the replay: the event hooks see what happens from now on, not the history)
        self.live.observers.append(self._observe_plugins)
        await self.health.start()
        await self.reconcile()
        name = self.config.name
        self._loops = [
            ConsumerLoop(self.nc, stream=self.ns.issues_stream, durable=f"{name}-intake",
                         filter_subjects=[f"{self.ns.prefix}.issue.>"], handler=self._on_issue,
                         concurrency=self.config.concurrency, telemetry=self.telemetry),
            ConsumerLoop(self.nc, stream=self.ns.events_stream, durable=f"{name}-reports",
                         filter_subjects=[self.ns.agent_filter()], handler=self._on_agent_event,
                         concurrency=self.config.concurrency, telemetry=self.telemetry),
        ]
        for loop in self._loops:
            await loop.start()
        self._tasks = [asyncio.create_task(self._schedule_loop(), name="scheduler"),
                       asyncio.create_task(self._pull_request_loop(), name="pull-requests")]
        self.kick()
        self.kick_pull_requests()
        log.info("coordinator.started", name=name, last_seq=self.model.last_seq,
                 tasks=len(self.model.tasks), agents=len(self.model.agents))

    async def stop(self) -> None:
        for loop in self._loops:
            await loop.stop(grace=5.0)
        await cancel_and_wait(self._tasks)
        await self.health.stop()
        await self.live.stop()
        if self.spend is not None:
            await self.spend.stop()
        close = getattr(self.analyser, "close", None)  # (the Claude analyser's client and ledger)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()

    @property
    def consumers(self) -> tuple[ConsumerLoop, ...]:
        """The intake and the reports consumer loops, once started (for their counts)."""
        return tuple(self._loops)

    def kick(self) -> None:
        self._kick.set()

    def _wake_scheduler(self, seq: int, item: object) -> None:
        if not isinstance(item, NOTHING_TO_SCHEDULE):
            self._kick.set()

    def _observe_plugins(self, seq: int, item: object) -> None:
        if isinstance(item, TaskEventBase):
            self.plugins.observe(seq, item, self.model.tasks.get(item.task_id))
        elif isinstance(item, AgentEventBase):
            self.plugins.observe(seq, item, self.model.agents.get(item.agent_id))

    # -- task commands ---------------------------------------------------------------
    async def _run(
        self, task_id: str, *commands: ts.Command, start: tuple[ts.TaskState | None, int] | None = None,
        atomic: bool = True, report_seq: int | None = None,
    ) -> tuple[ts.TaskState | None, int]:
        """Decide and append commands on one task in order, from the model's view (or
        ``start``), carrying the new state and sequence locally between them (no wait
        for the model in the middle of a chain).

        The model may lag the log: by our own last write (we wait for it first, free
        when caught up), or by another coordinator's. A refusal or a conflict on the
        model's view is therefore checked once against the log itself before it counts
        (against the view decided on: the model may have moved on by itself meanwhile, e.g.
        when another handler's write was seen by the log's readers before its ack reached us)."""
        if start is None:
            await self._fresh(task_id)
            view = self._view(task_id)
            try:
                return await self._append_chain(task_id, commands, view)
            except (DomainError, ConcurrencyConflict):
                await self._fresh(task_id, from_log=True)
                if self._view(task_id)[1] == view[1]:
                    raise  # the view was current: the refusal stands
                if report_seq is not None:
                    self._check_round(task_id, report_seq)  # the log may hold a newer assignment
                return await self._append_chain(task_id, commands, self._view(task_id))
        return await self._append_chain(task_id, commands, start, atomic=atomic)

    def _check_round(self, task_id: str, report_seq: int) -> None:
        """Refuse a report about ``task_id`` stored before the task's latest assignment
        (as far as the model knows): an earlier round's (:class:`StaleReport`). An
        agent writes a round's reports after reading its assignment, so the reports of
        the current round are all stored after it."""
        assigned = self.model.assigned_seq.get(task_id, 0)
        if report_seq < assigned:
            raise StaleReport(f"task {task_id}: report at seq {report_seq} precedes the task's assignment at "
                              f"seq {assigned}: it belongs to an earlier round")

    def _view(self, task_id: str) -> tuple[ts.TaskState | None, int]:
        return self.model.tasks.get(task_id), self.model.task_seq.get(task_id, 0)

    async def _append_chain(
        self, task_id: str, commands: tuple[ts.Command, ...], start: tuple[ts.TaskState | None, int],
        *, atomic: bool = True,
    ) -> tuple[ts.TaskState | None, int]:
        """Decide the whole chain first, then append it: as one atomic batch, or
        (``atomic=False``) event by event, each checked against the one before.
        nats-server commits atomic batches one at a time per stream, ~3 ms each (about
        300 batches/s, whatever the concurrency or fsync setting; ``ccc bench dispatch``
        measures it), so the hot intake path writes its chain in order instead: every
        prefix of it is a legal history, and what a crash leaves half done is finished
        by the redelivered issue message or by :meth:`reconcile`."""
        state, last = start
        events = []
        for command in commands:
            for event in ts.decide(state, command):
                state = ts.evolve(state, event)
                events.append(event)
        for group in [events] if atomic else [[e] for e in events]:
            if group:
                last = (await self.store.append(group, expected_last_seq=last))[-1]
                self._written[task_id] = max(last, self._written.get(task_id, 0))
        return state, last

    async def _fresh(self, task_id: str, *, from_log: bool = False) -> bool:
        """Bring the model up to our own last write on the task (and, ``from_log``, to
        the task's last event in the log). Returns True if it had to move."""
        target = self._written.get(task_id, 0)
        if from_log:
            target = max(target, await self.store.last_seq(self.ns.task_filter(task_id)))
        if target > self.model.task_seq.get(task_id, 0):
            await self.live.wait_for_seq(target, timeout=10.0)
            return True
        return False

    async def _catch_up_to(self, seq: int) -> None:
        await self.live.wait_for_seq(seq, timeout=10.0)

    # -- agent reports -----------------------------------------------------------------
    async def _on_agent_event(self, msg: Msg) -> None:
        event = decode_event(self.ns.rel(msg.subject), msg.data)
        assert isinstance(event, AgentEventBase)
        await self._in_order(event.agent_id, getattr(event, "task_id", None),
                             self._on_agent_event_in_order(event, msg.metadata.sequence.stream))

    async def _in_order(self, agent_id: str, task_id: str | None, handling) -> None:
        """Run ``handling`` (a coroutine) in log order where order matters: an agent's
        reports about one task one after another; an agent-wide report (offline,
        registration: ``task_id`` None) after all of the agent's reports before it and
        before all after it; reports about different tasks, or of different agents,
        concurrently. (Handlers start in fetch order, and each takes its place here before
        its first await.) One lock per agent serialised all of an agent's reports: with
        an agent holding many tasks, its reports queued behind each other's appends."""
        lanes = self._lanes.setdefault(agent_id, {})
        if task_id is None:
            before = list(lanes.values())
            lanes.clear()
        else:
            before = [f for f in (lanes.get(None), lanes.get(task_id)) if f is not None]
        mine: asyncio.Future = asyncio.get_running_loop().create_future()
        lanes[task_id] = mine

        def done(_: object = None) -> None:
            mine.set_result(None)
            if lanes.get(task_id) is mine:
                del lanes[task_id]
                if not lanes and self._lanes.get(agent_id) is lanes:
                    del self._lanes[agent_id]

        try:
            if before:
                await asyncio.wait(before)  # (never cancels them, even if we are cancelled)
            await handling
        finally:
            handling.close()  # (a no-op once awaited; unawaited if cancelled while waiting)
            pending = [f for f in before if not f.done()]
            if pending:  # cancelled while waiting: whoever comes next still waits for those
                asyncio.gather(*pending).add_done_callback(done)
            else:
                done()

    async def _on_agent_event_in_order(self, event: AgentEventBase, seq: int) -> None:
        aid = event.agent_id
        at = utcnow()
        actor = self.config.name
        cause = event.event_id
        if isinstance(event, AgentWentOffline):
            await self._catch_up_to(seq)
            await self._take_back_all(aid, "agent_lost", cause, offline_seq=seq)
            return
        task_id = getattr(event, "task_id", None)
        if task_id is None or not implies_command(event):
            return  # registration, maintenance, errors, progress: the scheduler reacts to the model
        if self.model.last_seq < seq and isinstance(event, STATE_FREE_COMMAND):
            # The model has not reached the report yet, and which command the report
            # implies does not depend on the task's state: decide on the task's view as it
            # is. The append is checked against the log (a view that missed an event of
            # the task conflicts, and _run decides again on the log's); only a refusal
            # needs the view as of the report, and gets it.
            written = self._written.get(task_id)
            try:
                if await self._on_task_report(event, seq, task_id, aid, at, actor, cause, early=True):
                    return
            except (DomainError, ConcurrencyConflict):
                if self._written.get(task_id) != written:
                    raise  # (after an append: handled as on the usual path)
            await self._catch_up_to(seq)
        await self._on_task_report(event, seq, task_id, aid, at, actor, cause)

    async def _on_task_report(self, event: AgentEventBase, seq: int, task_id: str, aid: str, at, actor: str,
                              cause: str, *, early: bool = False) -> bool:
        """Decide on one report about a task; True if that appended. ``early``: on a view
        that may not have reached the report yet; returns False instead of refusing or
        doing nothing (the caller decides again once the model has the report), unless it
        appended before the refusal: that is handled as on the usual path."""
        written = self._written.get(task_id)
        await self._fresh(task_id)
        state = self.model.tasks.get(task_id)
        if early and (state is None or (getattr(event, "attempt", 0) or state.attempt) != state.attempt):
            return False
        if state is not None and (getattr(event, "attempt", 0) or state.attempt) != state.attempt:
            await self._fresh(task_id, from_log=True)  # a report can only be ahead of a stale view
            state = self.model.tasks.get(task_id)
        if state is None:
            raise DomainError(f"report about unknown task {task_id}")
        self._check_round(task_id, seq)
        attempt = getattr(event, "attempt", 0)
        if attempt and attempt != state.attempt:
            raise DomainError(f"stale report from {aid} on {task_id}: attempt {attempt}, now {state.attempt}")
        try:
            return await self._translate(event, seq, task_id, state, aid, at, actor, cause)
        except StaleReport:
            raise  # an earlier round's: dropped, never retried
        except DomainError as e:
            if early and self._written.get(task_id) == written:
                return False
            # Reports of one agent are handled in log order, so a refusal while the task
            # is still this agent's, in this attempt, means an earlier report has not been
            # applied yet (it is being redelivered): retry later rather than drop this one.
            now = self.model.tasks.get(task_id)
            if now is not None and now.agent_id == aid and now.status in ts.WITH_AGENT \
                    and (not attempt or attempt == now.attempt):
                raise InfrastructureError(f"report out of order, retried: {e}") from None
            raise

    async def _translate(self, event: AgentEventBase, seq: int, task_id: str, state: ts.TaskState, aid: str,
                         at, actor: str, cause: str) -> bool:
        """One report -> the task command it implies (if any); True if it appended one."""
        match event:
            case AgentTaskStarted():
                await self._run(task_id, ts.StartTask(at=at, actor=actor, agent_id=aid, causation_id=cause),
                                report_seq=seq)
                return True
            case AgentImplementationProduced():
                await self._run(task_id, ts.StartTests(
                    at=at, actor=actor, agent_id=aid, files_changed=event.files_changed,
                    diff_stat=event.diff_stat, diff_ref=event.diff_ref, usage=event.usage,
                    causation_id=cause), report_seq=seq)
                return True
            case AgentPullRequestOpened():
                await self._run(task_id, ts.OpenPullRequest(
                    at=at, actor=actor, agent_id=aid, branch=event.branch, pr_url=event.pr_url,
                    pr_number=event.pr_number, draft=event.draft, tests_passed=event.tests_passed,
                    tests_failed=event.tests_failed, head_sha=event.head_sha,
                    base_branch=event.base_branch, causation_id=cause), report_seq=seq)
                if event.head_sha:  # the forge may have reported this commit's checks already
                    await self._fresh(task_id)
                    await self.adopt_earlier_checks(task_id)
                return True
            case AgentWorkFailed():
                after = await self._run(task_id, ts.FailTask(
                    at=at, actor=actor, agent_id=aid, reason=event.reason, phase=event.phase,
                    retryable=event.retryable, log_ref=event.log_ref, causation_id=cause), report_seq=seq)
                await self._maybe_retry(task_id, after)
                return True
            case AgentTaskReleased(outcome="cancelled") if state.cancel_requested:
                if state.agent_id == aid:
                    await self._run(task_id, ts.CancelTask(at=at, actor=actor, force=True,
                                                           reason=state.status_reason or "cancelled",
                                                           causation_id=cause), report_seq=seq)
                    return True
            case AgentTaskReleased(outcome="handed_back" | "cancelled" | "lost") | AgentTaskDeclined():
                # (a "cancelled" release nobody asked for is a hand-back: never strand the task)
                if state.agent_id == aid and state.status in ts.WITH_AGENT:
                    await self._run(task_id, ts.RequeueTask(at=at, actor=actor, reason="handed_back",
                                                            agent_id=aid, causation_id=cause), report_seq=seq)
                    return True
            case _:
                pass  # progress reports (workspace, analysis, tests, push) change no task state
        return False

    async def _maybe_retry(self, task_id: str, after: tuple[ts.TaskState | None, int], *,
                           guidance: str = "", immediate: bool = False) -> None:
        """Right after a failure: requeue with backoff if the policy allows. ``after`` is
        the state and sequence the failure left (the model may not have them yet)."""
        state = after[0]
        if state is not None and state.can_retry:
            await self._run(task_id, ts.RetryTask(
                at=utcnow(), actor=self.config.name,
                backoff_base=0.0 if immediate else self.config.retry_base,
                backoff_max=self.config.retry_max, guidance=guidance), start=after)
            self.kick()

    async def _take_back_all(self, agent_id: str, reason: str, cause: str | None, *,
                             offline_seq: int | None = None) -> None:
        """Requeue what ``agent_id`` holds. For an ``agent.offline`` at ``offline_seq``: an
        agent that registered again since (a restarted process with the same id) may hold
        tasks assigned to its new incarnation — those (their last event after the offline
        one) stay with it."""
        agent = self.model.agents.get(agent_id)
        back = offline_seq is not None and agent is not None and agent.status != "offline"
        for task_id, holder in list(self.model.holder.items()):
            if holder != agent_id:
                continue
            if back and self.model.task_seq.get(task_id, 0) > offline_seq:
                continue  # assigned to the agent as it is now, after it came back
            try:
                await self._run(task_id, ts.RequeueTask(at=utcnow(), actor=self.config.name,
                                                        reason=reason, agent_id=agent_id,
                                                        causation_id=cause))
                log.info("task.taken_back", task_id=task_id, agent_id=agent_id, reason=reason)
            except DomainError:
                pass  # already moved on
        self.kick()

    # -- scheduling ----------------------------------------------------------------------
    async def _schedule_loop(self) -> None:
        while True:
            timeout = self._next_wake()
            await wait_event(self._kick, timeout)
            self._kick.clear()
            try:
                await self.schedule_once()
            except Exception as e:  # noqa: BLE001 - the loop must survive; next pass retries
                log.warning("scheduler.pass_failed", error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.2)
                self.kick()

    def _next_wake(self) -> float | None:
        now = utcnow()
        waits = [
            (t.not_before - now).total_seconds()
            for tid in self.model.queued
            if (t := self.model.tasks[tid]).not_before is not None and t.not_before > now
        ]
        waits += [(h.until - now).total_seconds() for h in self.holds.values()]  # a plugin's hold ends
        book = self.budget()
        if book is not None and book.caps.any and self.model.queued:  # the daily scopes reset
            waits.append((next_reset(now) - now).total_seconds() + 0.5)
        return max(0.01, min(waits)) if waits else None

    def budget(self) -> Book | None:
        """The spend ledger as last seen (None: the cluster has none)."""
        return self.spend.book() if self.spend is not None else None

    async def schedule_once(self) -> int:
        model = self.model
        # an assignment that raced with its agent going offline would wait for ever:
        # take such tasks back here (the offline handler ran before they existed)
        for task_id, holder in list(model.holder.items()):
            agent = model.agents.get(holder)
            if agent is not None and agent.status == "offline" and task_id not in self._reserved:
                with contextlib.suppress(DomainError, ConcurrencyConflict):
                    await self._run(task_id, ts.RequeueTask(at=utcnow(), actor=self.config.name,
                                                            reason="agent_lost", agent_id=holder))
        held = self._held()  # (also drops the reservations the model shows as assignments now)
        now = utcnow()
        self._drop_holds(now)
        queued = [t for t in model.queued if t not in self._reserved and t not in self.holds]
        if not queued:
            return 0  # (a task assigned at intake is reserved until the model shows it)
        plan = plan_assignments(model.tasks, model.agents, now, held=held, queued=queued,
                                policy=self.config.fairness, running=[*model.holder, *self._reserved],
                                budget=self.budget())
        if plan and self.plugins.decides_assignments:
            plan = await self._ask_plugins(plan, now)
        if not plan:
            return 0
        # the choice in words, on the event (the task view shows it): the same inputs, replayed
        whys = assignment_whys(plan, model.tasks, model.agents, now, held=held, policy=self.config.fairness,
                               running=[*model.holder, *self._reserved])
        items = []
        for task_id, agent_id in plan:
            [event] = ts.decide(model.tasks[task_id], ts.AssignTask(
                at=now, actor=self.config.name, agent_id=agent_id, why=whys[task_id]))
            items.append((event, model.task_seq[task_id]))
        results = await self.store.append_many(items)
        done = [r for r in results if isinstance(r, int)]
        self.assignments += len(done)
        for (event, _), r in zip(items, results):
            if isinstance(r, int):
                log.info("task.assigned", task_id=event.task_id, agent_id=event.agent_id, attempt=event.attempt)
            elif not isinstance(r, ConcurrencyConflict):
                log.warning("task.assign_failed", task_id=event.task_id, error=str(r))
        if done:
            await self._catch_up_to(max(done))  # the next pass must see these
        if len(done) < len(results):
            await self.live.catch_up()
            self.kick()
        return len(done)

    # -- plugins' assignment policies ----------------------------------------------------
    async def _ask_plugins(self, plan: list[tuple[str, str]], now) -> list[tuple[str, str]]:
        """The part of ``plan`` the plugins allow (each asked within its timeout: a pass
        waits at most that long). A vetoed or delayed task is held back; the next pass
        (kicked now) gives its agent's slot to the next task in line. The model moves
        while the plugins think: only tasks still queued are assigned."""
        model = self.model
        served = [(t, a) for t, a in plan if t in self._delays_served]  # their delay was the answer
        ask = [(t, a) for t, a in plan if t not in self._delays_served]
        rulings = await asyncio.gather(*(self.plugins.assignment(model.tasks[t], model.agents[a])
                                         for t, a in ask))
        allowed = []
        for (task_id, agent_id), ruling in [*((p, ALLOWED) for p in served), *zip(ask, rulings)]:
            hold = hold_for(task_id, ruling, now, self.config.veto_recheck)
            if hold is None:
                state = model.tasks.get(task_id)
                if state is not None and state.status == "queued":
                    allowed.append((task_id, agent_id))
                continue
            self.holds[task_id] = hold
            log.info("task.held_by_plugin", task_id=task_id, plugin=hold.plugin, kind=hold.kind,
                     reason=hold.reason, until=hold.until.isoformat())
        if len(allowed) < len(plan):
            self.plugins.report_holds(list(self.holds.values()))
            self.kick()
        return allowed

    def _drop_holds(self, now) -> None:
        """Holds that ended, or whose task is no longer queued. A delay that is over was
        the plugin's answer: the task goes to the next free agent without asking again
        (a veto is asked again); that lasts while it stays queued."""
        def queued(task_id: str) -> bool:
            return (s := self.model.tasks.get(task_id)) is not None and s.status == "queued"

        self._delays_served = {t for t in self._delays_served if queued(t)}
        ended = [t for t, h in self.holds.items() if h.until <= now or not queued(t)]
        for task_id in ended:
            hold = self.holds.pop(task_id)
            if hold.kind == "delay" and queued(task_id):
                self._delays_served.add(task_id)
        if ended:
            self.plugins.report_holds(list(self.holds.values()))

    def plugin_waits(self) -> dict[str, str]:
        """``{task id: wait reason}`` of the holds in force now (``projections.waits``' ``plugins=``)."""
        now = utcnow()
        return {t: h.words for t, h in self.holds.items() if h.until > now}

    def _direct_assignment(self, task_id: str, state: ts.TaskState | None,
                           chain: list[ts.Command]) -> list[ts.Command]:
        # an assignment a plugin must be asked about goes through a scheduling pass
        if self.plugins.decides_assignments:
            return []
        return super()._direct_assignment(task_id, state, chain)

    # -- restart reconciliation --------------------------------------------------------
    async def reconcile(self) -> None:
        """Finish what a crashed predecessor left half done. Every step is a normal,
        concurrency-checked decision, so running it twice is harmless."""
        for task_id, state in list(self.model.tasks.items()):
            try:
                if state.status in ("pending", "analyzing"):
                    await self._analyse(task_id, state, self.model.task_seq[task_id], None)
                elif state.can_retry:
                    await self._maybe_retry(task_id, (state, self.model.task_seq[task_id]))
                elif state.status in ts.WITH_AGENT:
                    agent = self.model.agents.get(state.agent_id or "")
                    if agent is None or agent.status == "offline":
                        await self._run(task_id, ts.RequeueTask(
                            at=utcnow(), actor=self.config.name, reason="agent_lost",
                            agent_id=state.agent_id or ""))
            except (DomainError, ConcurrencyConflict) as e:
                log.info("reconcile.skipped", task_id=task_id, reason=str(e))
