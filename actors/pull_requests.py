"""The coordinator's pull-request loop: from "pull request opened" to merged.

A mixin of :class:`actors.coordinator.Coordinator` (it uses the coordinator's model,
store and ``_run``), like :mod:`actors.intake`. The facts come from the forge on the
issue stream; every decision is a task command, so the state machine
(:mod:`events.task_state`) says what each fact means and the log says what happened:

* ``issue.checks_completed`` -> ``RecordChecks``: green -> review (-> the merge queue
  when approved); red -> classified and, in the same write, a re-run, a CI fix round,
  a human, or Failed. Checks of a commit the task no longer awaits are stale: noted, dropped.
* ``issue.pr_approved`` -> ``ApprovePullRequest`` (-> the merge queue, where enabled).
* ``issue.base_moved`` (and every merge we learn of) -> a conflict sweep: each open pull
  request of the repository on that base is checked with ``git merge-tree``; a conflict is
  ``task.conflicted`` and a rebase round.
* a timer: checks awaited for longer than ``checks_timeout`` -> ``ChecksTimedOut`` (a human
  is asked, with the reason).
* the merge queue (per repository, ``--merge-queue``): one task at a time is tested as the
  merge of its branch into the latest base (a candidate ref the forge's CI runs on); green
  -> the base is fast-forwarded to exactly that commit, so the base only ever moves to a
  tested commit; red -> ejected (classified like any failure). Entering, testing, merging
  and leaving the queue are events.

The git (merge-tree, the candidate, the fast-forward) is behind the
:class:`actors.ports.PullRequestBranches` port. Every step is a concurrency-checked
decision from the log's state, so a crash between a git step and its event is finished by
the next pass: a candidate prepared but not recorded is prepared again; a base
fast-forwarded but not recorded fast-forwards again (a no-op) and is recorded.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import nats.errors
import nats.js.errors
import structlog

from events import task_state as ts
from events.codec import decode_issue
from events.errors import CccError, ConcurrencyConflict, DomainError, InfrastructureError
from events.issue import (
    IssueBaseMoved,
    IssueChecksCompleted,
    IssuePullRequestApproved,
)
from events.aio import wait_event
from events.subjects import QUEUE_BRANCH_PREFIX, issue_subject
from events.task import (
    TaskChecksPassed,
    TaskCompleted,
    TaskMerged,
    TaskMergeDequeued,
    TaskMergeQueued,
    TaskChecksRerun,
    TaskMergeTesting,
    TaskPullRequestOpened,
    TaskCancelled,
    TaskFailed,
)

from actors.intake import utcnow

log = structlog.get_logger("ccc.coordinator")

# events after which the pull-request pass may have something to do (the merge queue moved,
# a commit's checks began to be awaited, or a task left the queue)
WAKES_PR_LOOP = (TaskMergeQueued, TaskChecksPassed, TaskMerged, TaskMergeDequeued, TaskCompleted,
                 TaskCancelled, TaskFailed, TaskPullRequestOpened, TaskChecksRerun, TaskMergeTesting)


class PullRequests:
    # -- configuration -------------------------------------------------------------
    def merge_queue_on(self, repo: str) -> bool:
        queue = self.config.merge_queue
        return queue is True or (isinstance(queue, frozenset) and repo in queue)

    # -- facts ---------------------------------------------------------------------
    async def _on_checks(self, task_id: str, event: IssueChecksCompleted) -> None:
        state = await self._known(task_id)
        try:
            after = await self._with_fresh_state(task_id, ts.RecordChecks(
                at=utcnow(), actor=self.config.name, causation_id=event.event_id,
                head_sha=event.head_sha, checks=event.checks, base=dict(event.base),
                max_ci_fixes=self.config.max_ci_fixes, merge_queue=self.merge_queue_on(state.issue.repo)))
        except DomainError as e:
            # checks of a commit the task no longer awaits (a later push, a re-run already
            # answered, a task that moved on): a fact about the past, not an error
            log.info("checks.ignored", task_id=task_id, head_sha=event.head_sha[:12], reason=str(e))
            return
        new = after[0]
        failed = new is not None and any(not c.passed for c in event.checks)
        log.info("checks.recorded", task_id=task_id, head_sha=event.head_sha[:12],
                 status=new.status if new else None, classification=new.classification if failed else None)
        self.kick_pull_requests()

    async def adopt_earlier_checks(self, task_id: str) -> bool:
        """After a push is recorded (``task.pr_opened``): if the forge already reported that
        very commit's checks, take them now. They arrive before the push is recorded when
        the CI is quicker than the agent's report, or when the push was an earlier round's
        whose agent died before reporting it (the next round finds the branch moved and
        reports its head): dropped as stale then, they would otherwise be waited for until
        the checks timeout. The issue stream keeps the latest such fact per issue."""
        state = self.model.tasks.get(task_id)
        if state is None or state.status != "checking" or not state.head_sha:
            return False
        issue = state.issue
        subject = self.ns.subject(issue_subject(issue.source, issue.repo, issue.number, "checks_completed"))
        try:
            msg = await self.nc.jetstream().get_last_msg(self.ns.issues_stream, subject, direct=True)
            fact = decode_issue(self.ns.rel(msg.subject), msg.data)
        except nats.js.errors.NotFoundError:
            return False
        except (CccError, nats.errors.Error) as e:  # unreadable: the checks timeout still holds
            log.warning("checks.earlier_unreadable", task_id=task_id, error=f"{type(e).__name__}: {e}")
            return False
        if not isinstance(fact, IssueChecksCompleted) or fact.head_sha != state.head_sha:
            return False
        log.info("checks.adopted", task_id=task_id, head_sha=fact.head_sha[:12], fact=fact.event_id)
        await self._on_checks(task_id, fact)
        return True

    async def _on_approved(self, task_id: str, event: IssuePullRequestApproved) -> None:
        state = await self._known(task_id)
        if state.status not in ts.PR_OPEN:
            log.info("approval.ignored", task_id=task_id, status=state.status)
            return
        if event.branch and state.branch and event.branch != state.branch:
            log.info("approval.ignored", task_id=task_id, reason=f"review of branch {event.branch}")
            return
        await self._with_fresh_state(task_id, ts.ApprovePullRequest(
            at=utcnow(), actor=self.config.name, causation_id=event.event_id,
            by=event.author or event.actor, merge_queue=self.merge_queue_on(state.issue.repo)))
        self.kick_pull_requests()

    async def _on_base_moved(self, event: IssueBaseMoved) -> None:
        await self.sweep_conflicts(event.repo, event.branch, cause=event.event_id)

    async def _known(self, task_id: str) -> ts.TaskState:
        if task_id not in self.model.tasks:
            await self.live.catch_up()
        state = self.model.tasks.get(task_id)
        if state is None:
            raise DomainError(f"no task {task_id}")
        return state

    # -- conflicts -------------------------------------------------------------------
    async def sweep_conflicts(self, repo: str, base: str = "", *, cause: str | None = None) -> int:
        """Check every open pull request of ``repo`` (on ``base``, when given) against the
        base as it is now; record each conflict. Returns how many conflict."""
        if self.branches is None:
            return 0
        found = 0
        candidates = [t for t in list(self.model.tasks.values())
                      if t.issue.repo == repo and t.status in CONFLICT_CHECKED and t.branch
                      and (not base or not t.base_branch or t.base_branch == base)]
        for state in candidates:
            target = state.base_branch or base
            if not target:
                continue
            try:
                base_sha, files = await self.branches.conflicts(repo, target, state.branch)
            except Exception as e:  # noqa: BLE001 - one unreadable branch must not stop the sweep
                log.warning("conflicts.check_failed", task_id=state.task_id, error=f"{type(e).__name__}: {e}")
                continue
            if not files:
                continue
            try:
                await self._run(state.task_id, ts.RecordConflict(
                    at=utcnow(), actor=self.config.name, causation_id=cause, base_branch=target,
                    base_sha=base_sha, files=tuple(files), max_rebases=self.config.max_rebases))
                found += 1
                log.info("task.conflicted", task_id=state.task_id, base=target, files=files)
            except (DomainError, ConcurrencyConflict) as e:
                log.info("conflicts.not_recorded", task_id=state.task_id, reason=str(e))
        if found:
            self.kick()
        return found

    # -- the loop: checks timeouts and the merge queue --------------------------------
    def kick_pull_requests(self) -> None:
        self._pr_kick.set()

    def _wake_pull_requests(self, seq: int, item: object) -> None:
        if isinstance(item, WAKES_PR_LOOP):
            self._pr_kick.set()

    async def _pull_request_loop(self) -> None:
        while True:
            await wait_event(self._pr_kick, self._next_checks_deadline())
            self._pr_kick.clear()
            try:
                await self.pull_requests_once()
            except Exception as e:  # noqa: BLE001 - the loop must survive; the next pass retries
                log.warning("pull_requests.pass_failed", error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.5)
                self._pr_kick.set()

    def _awaiting(self) -> list[ts.TaskState]:
        """The tasks awaiting checks or in the merge queue (an index the read model keeps:
        no pass over every task on each wake)."""
        tasks = self.model.tasks
        return [tasks[t] for t in self.model.following]

    def _next_checks_deadline(self) -> float | None:
        now = utcnow()
        limit = timedelta(seconds=self.config.checks_timeout)
        waits = [((t.checks_since + limit) - now).total_seconds() for t in self._awaiting()
                 if t.checks_since is not None]
        return max(0.05, min(waits)) if waits else None

    async def pull_requests_once(self) -> None:
        awaiting = self._awaiting()
        now = utcnow()
        limit = timedelta(seconds=self.config.checks_timeout)
        for t in awaiting:
            if t.checks_since is not None and now - t.checks_since >= limit:
                try:
                    await self._run(t.task_id, ts.ChecksTimedOut(
                        at=now, actor=self.config.name, waited=(now - t.checks_since).total_seconds()))
                    log.warning("checks.timed_out", task_id=t.task_id, head_sha=t.head_sha[:12])
                except (DomainError, ConcurrencyConflict) as e:
                    log.info("checks.timeout_not_recorded", task_id=t.task_id, reason=str(e))
        if self.branches is None:
            return
        by_repo: dict[str, list[ts.TaskState]] = {}
        for t in awaiting:
            if t.status in ("merging", "merge_queued"):
                by_repo.setdefault(t.issue.repo, []).append(t)
        for repo, tasks in by_repo.items():
            await self._advance_queue(repo, tasks)

    async def _advance_queue(self, repo: str, tasks: list[ts.TaskState]) -> None:
        merging = [t for t in tasks if t.status == "merging"]
        if merging:
            head = merging[0]
            if head.checks_since is None and head.checks and not any(not c.passed for c in head.checks):
                await self._merge(head)
            return  # one at a time: the head is being tested
        queued = sorted((t for t in tasks if t.status == "merge_queued"),
                        key=lambda t: (t.merge_queued_at or t.updated_at, t.task_id))
        if queued:
            await self._test_candidate(queued[0])

    async def _test_candidate(self, state: ts.TaskState) -> None:
        repo, base = state.issue.repo, state.base_branch
        ref = f"{QUEUE_BRANCH_PREFIX}{state.task_id}"
        sha, base_sha, files = await self.branches.prepare_merge(repo, base, state.branch, ref)
        at = utcnow()
        actor = self.config.name
        try:
            if files:
                await self._run(state.task_id, ts.RecordConflict(
                    at=at, actor=actor, base_branch=base, base_sha=base_sha, files=tuple(files),
                    max_rebases=self.config.max_rebases))
                log.info("merge_queue.conflicted", task_id=state.task_id, files=files)
            else:
                await self._run(state.task_id, ts.StartMergeTest(
                    at=at, actor=actor, queue_ref=ref, queue_sha=sha, base_sha=base_sha))
                log.info("merge_queue.testing", task_id=state.task_id, queue_sha=sha[:12])
        except (DomainError, ConcurrencyConflict) as e:
            log.info("merge_queue.not_started", task_id=state.task_id, reason=str(e))

    async def _merge(self, state: ts.TaskState) -> None:
        repo, base = state.issue.repo, state.base_branch
        at = utcnow()
        if not await self.branches.fast_forward(repo, base, state.queue_sha):
            # the base moved while the candidate was tested: test again on the new base
            await self._run(state.task_id, ts.DequeueMerge(
                at=at, actor=self.config.name, reason=f"{base} moved while the candidate was tested; re-queued"))
            await self._run(state.task_id, ts.ApprovePullRequest(
                at=utcnow(), actor=self.config.name, by=state.approved_by, merge_queue=True))
            self.kick_pull_requests()
            return
        try:
            await self._run(state.task_id, ts.CompleteMerge(
                at=at, actor=self.config.name, base_branch=base, merge_sha=state.queue_sha))
        except (DomainError, ConcurrencyConflict) as e:
            raise InfrastructureError(f"merged {state.task_id} but could not record it yet: {e}") from None
        log.info("merge_queue.merged", task_id=state.task_id, base=base, sha=state.queue_sha[:12])
        try:
            await self.branches.delete_ref(repo, state.queue_ref)
        except Exception as e:  # noqa: BLE001 - a leftover candidate ref is untidy, not wrong
            log.warning("merge_queue.ref_not_deleted", ref=state.queue_ref, error=str(e))
        await self.sweep_conflicts(repo, base)
        self.kick_pull_requests()


# the open pull requests a base move is checked against (merging ones are the queue's own)
CONFLICT_CHECKED = frozenset({"checking", "checks_failed", "review", "needs_human", "merge_queued"})
