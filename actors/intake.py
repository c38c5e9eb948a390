"""The coordinator's intake: issue facts in, task decisions out.

A mixin of :class:`actors.coordinator.Coordinator` (it uses the coordinator's model,
store and ``_run``), kept in its own module so each part stays readable: an opened
issue becomes a task, is analysed and, if an agent is free, assigned in one go (no hop
through the log in between); the other facts (closed, cancel, retry, merged, rejected,
changes requested, free-text requests) become the matching task commands.

Nothing is trusted for arriving here: every fact is checked against the trust policy
(:mod:`events.trust`: the repository allow-list, and the author of the facts people
write) before it can create or drive a task, whoever published it. The webhook checks
the same policy, but the issue subjects have other writers (the CLI, ``nats pub``). A
refused fact is parked as a dead letter with the reason (:class:`events.errors.Refused`).

Which task a fact is about is derived from its source, repository and number
(:func:`events.subjects.task_id_for`): a local issue and a GitHub issue never share a
task. Whether that task exists is what the log's *task events* say, not whether
anything at all sits on its subjects: a message there that is no valid ``TaskCreated``
(junk, published by whoever could) does not make the intake drop the real issue; the
task is created after it.
"""

from __future__ import annotations

import collections
from datetime import datetime, timezone

import msgspec
import structlog
from nats.aio.msg import Msg

from events import task_state as ts
from events.codec import decode_issue
from events.errors import ConcurrencyConflict, ConfigError, DomainError, InfrastructureError, Refused
from events.issue import (
    IssueBaseMoved,
    IssueCancelRequested,
    IssueChangesRequested,
    IssueChecksCompleted,
    IssueChecksStarted,
    IssueClosed,
    IssueCommented,
    IssueEvent,
    IssueOpened,
    IssuePullRequestApproved,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueRetryRequested,
)
from events.subjects import check_repo, repo_token, task_id_for
from events.task import IssueRef
from projections.read_model import ReadModel

from actors.assignment_why import assignment_whys
from actors.scheduling import plan_assignments

log = structlog.get_logger("ccc.coordinator")

CREATE_TRIES = 3  # a conflict on creation means someone wrote on the task's subjects: look, retry


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Intake:
    async def _on_issue(self, msg: Msg) -> None:
        event = decode_issue(self.ns.rel(msg.subject), msg.data)
        if why := self.config.trust.refusal(event):
            raise Refused(why)
        if isinstance(event, IssueBaseMoved):  # about the repository, not one issue
            check_repo(event.repo)
            await self._on_base_moved(event)
            return
        task_id = self._task_id_of(event)
        at = utcnow()
        actor = self.config.name
        match event:
            case IssueOpened():
                await self._intake(task_id, event, at)
            case IssueClosed() | IssueCancelRequested():
                reason = "issue closed" if isinstance(event, IssueClosed) else (event.reason or "cancelled by user")
                await self._with_fresh_state(task_id, ts.CancelTask(at=at, actor=actor, reason=reason,
                                                                    causation_id=event.event_id))
            case IssueRetryRequested():
                state = self.model.tasks.get(task_id)
                if state is not None and state.status == "needs_human":
                    # what a human unblocks there is the checks: run them again
                    await self._with_fresh_state(task_id, ts.RequestRerun(
                        at=at, actor=actor, reason=event.reason or f"re-run requested by {event.author or 'a person'}",
                        causation_id=event.event_id))
                else:
                    await self._with_fresh_state(task_id, ts.RetryTask(
                        at=at, actor=actor, backoff_base=0.0, causation_id=event.event_id))
            case IssuePullRequestMerged():
                after = await self._with_fresh_state(task_id, ts.CompleteTask(
                    at=at, actor=actor, reason="pull request merged", causation_id=event.event_id))
                merged = after[0]
                if merged is not None:  # its base moved: the other open pull requests may conflict now
                    await self.sweep_conflicts(merged.issue.repo, merged.base_branch, cause=event.event_id)
            case IssueChecksCompleted():
                await self._on_checks(task_id, event)
            case IssueChecksStarted():
                log.info("checks.started", task_id=task_id, head_sha=event.head_sha[:12], names=list(event.names))
            case IssuePullRequestApproved():
                await self._on_approved(task_id, event)
            case IssueChangesRequested():
                # the reviewer's request fails this attempt; the retry carries it, and the
                # next attempt pushes to the same branch (the PR stays the same). Only a
                # review of the pull request under review counts: after the first fact of
                # a review has failed the attempt, the task is no longer in review, so a
                # straggler of the same review (past the dedup window, or published by
                # another writer) cannot fail the next attempt, and a review of another
                # branch (an old PR, someone else's) never fails this one
                if why := await self._not_under_review(task_id, event):
                    log.info("coordinator.changes_ignored", task_id=task_id, reason=why,
                             review_id=event.review_id, comment_id=event.comment_id)
                    return
                feedback = f"Changes requested by {event.author or 'a reviewer'}: {event.body}".strip()
                after = await self._with_fresh_state(task_id, ts.FailTask(
                    at=at, actor=actor, reason=feedback[:500], phase="review", retryable=True,
                    causation_id=event.event_id))
                await self._maybe_retry(task_id, after, guidance=feedback, immediate=True)
            case IssueCommented():
                state = self.model.tasks.get(task_id)
                if state is not None and state.can_retry:
                    await self._maybe_retry(task_id, (state, self.model.task_seq[task_id]),
                                            guidance=event.request or event.body, immediate=True)
                else:
                    log.info("coordinator.request_noted", task_id=task_id,
                             status=state.status if state else None, request=event.request[:200])
            case IssuePullRequestClosed():
                after = await self._with_fresh_state(task_id, ts.FailTask(
                    at=at, actor=actor, reason=event.reason, phase="review", retryable=True,
                    causation_id=event.event_id))
                await self._maybe_retry(task_id, after)
            case _:
                log.info("coordinator.issue_ignored", type=type(event).__name__, task_id=task_id)

    def _task_id_of(self, event: IssueEvent) -> str:
        """The task a fact is about. A fact naming no valid repository, or a source the
        cluster does not know, is refused (it could not be told apart from another's).

        Tasks of GitHub issues created before ids carried their source have the bare
        id (``acme_app-7``); a fact about such an issue finds its task there, but only a
        task of that same source: a local issue's task is never a GitHub issue's."""
        try:
            check_repo(event.repo)
            if event.number < 1:
                raise ConfigError(f"invalid issue number {event.number}")
            task_id = task_id_for(event.repo, event.number, event.source)
        except ConfigError as e:
            raise Refused(f"{event.source}:{event.repo}#{event.number}: {e}") from None
        if task_id not in self.model.tasks:
            legacy = f"{repo_token(event.repo)}-{event.number}"
            old = self.model.tasks.get(legacy) if legacy != task_id else None
            if old is not None and old.issue.source == event.source:
                return legacy
        return task_id

    async def _task_in_log(self, task_id: str) -> tuple[ts.TaskState | None, int]:
        """The task as its events in the log make it, and the last sequence on its
        subjects (what an append must expect). Folded like the read model folds: a
        message that is no event, or an event the state machine rejects (a ``created``
        of another task, a transition of a task that does not exist) is skipped, but
        counts for the sequence."""
        view = ReadModel(self.ns.prefix)
        last = await self.store.replay(view.apply, filter_subject=self.ns.task_filter(task_id))
        return view.tasks.get(task_id), max(last, 0)

    async def _not_under_review(self, task_id: str, event: IssueChangesRequested) -> str:
        """Why a changes-requested fact must not fail the task's attempt, or "" if it
        must: the task is in review, on the branch (and pull request) the review is of."""
        if task_id not in self.model.tasks:
            await self.live.catch_up()
        await self._fresh(task_id, from_log=True)  # decided on the log's latest, not a lagging view
        state = self.model.tasks.get(task_id)
        if state is None:
            return "no such task"
        if state.status not in ts.PR_OPEN:
            return f"the task is {state.status}: no open pull request of this attempt to review"
        if not event.branch or event.branch != state.branch:
            return (f"the review is of branch {event.branch or '(none)'}, "
                    f"the task's is {state.branch or '(none)'}")
        if event.pr_number is not None and state.pr_number is not None and event.pr_number != state.pr_number:
            return f"the review is of pull request #{event.pr_number}, the task's is #{state.pr_number}"
        return ""

    async def _with_fresh_state(
        self, task_id: str, command: ts.Command
    ) -> tuple[ts.TaskState | None, int]:
        if task_id not in self.model.tasks:
            # the model may lag the log by a hop; the log itself is the authority
            await self.live.catch_up()
            if task_id not in self.model.tasks:
                raise DomainError(f"no task {task_id}")
        try:
            return await self._run(task_id, command)
        except ConcurrencyConflict:
            await self.live.catch_up()
            raise

    async def _intake(self, task_id: str, event: IssueEvent, at: datetime) -> None:
        assert isinstance(event, IssueOpened)
        issue = IssueRef(source=event.source, repo=event.repo, number=event.number, title=event.title,
                         body=event.body, labels=event.labels, url=event.url, author=event.author)
        state, last = self._view(task_id)
        create = ts.CreateTask(at=at, actor=self.config.name, task_id=task_id, issue=issue,
                               max_attempts=self.config.max_attempts, causation_id=event.event_id)
        for _ in range(CREATE_TRIES):
            if state is not None:
                break
            try:
                if getattr(self.analyser, "instant", False):
                    # the rules answer at once: creation, analysis and (if an agent is free)
                    # the assignment are written back to back, with no hop through the log
                    await self._analyse(task_id, None, last, event.event_id, create=create, issue=issue)
                    return
                state, last = await self._run(task_id, create, start=(None, last))
            except ConcurrencyConflict:
                # a repeat, another coordinator, or something on the task's subjects that
                # is no task (the model does not track those for a task it does not
                # know): the log decides, and junk only moves the sequence to expect
                state, last = await self._task_in_log(task_id)
        if state is None:
            raise InfrastructureError(f"task {task_id} could not be created: its subjects keep moving")
        await self._analyse(task_id, state, last, event.event_id)

    async def _analyse(self, task_id: str, state: ts.TaskState | None, last: int, cause: str | None, *,
                       create: ts.CreateTask | None = None, issue: IssueRef | None = None) -> None:
        if state is not None and state.status not in ("pending", "analyzing"):
            return  # a repeated issue event: nothing to do
        at = utcnow()
        actor = self.config.name
        begin = [ts.StartAnalysis(at=at, actor=actor, analyser=self.analyser.name, causation_id=cause)] \
            if state is None or state.status == "pending" else []
        analysis = await self.analyser.analyse(issue if state is None else state.issue)
        if create is not None:
            # a synchronous analyser: its decision is recorded on the creation itself, one
            # append instead of three (created, analysis started, analysed)
            chain: list[ts.Command] = [msgspec.structs.replace(create, analyser=self.analyser.name,
                                                               analysis=analysis)]
        else:
            chain = [*begin, ts.RecordAnalysis(at=utcnow(), actor=actor, causation_id=cause, analysis=analysis)]
        assign = self._direct_assignment(task_id, state, chain)
        try:
            _, seq = await self._run(task_id, *chain, *assign, start=(state, last), atomic=False)
        except BaseException:
            self._reserved.pop(task_id, None)
            raise
        if assign:
            self._reserved[task_id][1] = seq
            self.assignments += 1
        log.info("task.analysed", task_id=task_id, specialty=analysis.specialty,
                 priority=analysis.priority, dependencies=list(analysis.dependencies))
        self.kick()

    def _direct_assignment(self, task_id: str, state: ts.TaskState | None,
                           chain: list[ts.Command]) -> list[ts.Command]:
        """If an agent is free right now, assign right after the analysis (no hop through
        the log and the scheduler between issue and assignment). The
        agent is reserved until the model shows the assignment, so a scheduling pass in
        between cannot give the same slot away."""
        for command in chain:
            for event in ts.decide(state, command):
                state = ts.evolve(state, event)
        if state is None or state.status != "queued":
            return []
        tasks = collections.ChainMap({task_id: state}, self.model.tasks)
        held = self._held()  # (first: it prunes the reservations the model shows now)
        plan = plan_assignments(tasks, self.model.agents, utcnow(), held=held, queued=[task_id],
                                policy=self.config.fairness, running=[*self.model.holder, *self._reserved],
                                budget=self.budget())
        if not plan:
            return []
        why = assignment_whys(plan, tasks, self.model.agents, utcnow(), held=held, policy=self.config.fairness,
                              running=[*self.model.holder, *self._reserved])[task_id]
        self._reserved[task_id] = [plan[0][1], None]
        return [ts.AssignTask(at=utcnow(), actor=self.config.name, agent_id=plan[0][1], why=why)]

    def _prune_reserved(self) -> None:
        """Drop the reservations the model shows as assignments now."""
        for task_id, (_, seq) in list(self._reserved.items()):
            if seq is not None and self.model.task_seq.get(task_id, 0) >= seq:
                del self._reserved[task_id]

    def _held(self) -> dict[str, int]:
        """Tasks per agent by the model, plus our reservations it does not show yet."""
        self._prune_reserved()
        held = self.model.held()
        for agent_id, _ in self._reserved.values():
            held[agent_id] = held.get(agent_id, 0) + 1
        return held

