"""Random *valid* histories for property tests: commands are chosen at random and
kept only when the pure ``decide`` accepts them, so every history is one the real
system could have written. Tasks walk every status: their pull requests' checks pass,
fail (each classification), time out and conflict, fix and rebase rounds follow, and
approved pull requests go through the merge queue."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from events import agent_state as ag
from events import task_state as ts
from events.errors import DomainError
from events.task import Analysis, IssueRef
from tests.support.domain import FLAKY, GREEN_BASE, INFRA, PASS, RED, WAITING

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
AGENTS = ("agent-a", "agent-b", "agent-c")
TRIES = 5  # commands tried per step of a task: some progress, some idling


def _task_commands(rnd: random.Random, state: ts.TaskState, at: datetime) -> list:
    """The commands for one task in a random order, by weight (a weighted shuffle); the
    first one ``decide`` accepts is taken (most are refused in any one status)."""
    agent = state.agent_id or rnd.choice(AGENTS)
    awaited = state.queue_sha if state.status == "merging" else state.head_sha
    options = [
        (5, ts.StartAnalysis(at=at, actor="coordinator")),
        (5, ts.RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(
            specialty=rnd.choice(["backend", "frontend", "general"]),
            priority=rnd.choice(["normal", "high"]), paths=rnd.choice([(), ("a.py",), ("src/",)])))),
        (5, ts.AssignTask(at=at + timedelta(hours=1), actor="coordinator", agent_id=agent)),
        (5, ts.StartTask(at=at, actor=agent, agent_id=agent)),
        (5, ts.StartTests(at=at, actor=agent, agent_id=agent, files_changed=("a.py",))),
        (5, ts.OpenPullRequest(at=at, actor=agent, agent_id=agent, branch="ccc/x", pr_number=1,
                               head_sha=f"{rnd.randrange(16 ** 8):08x}" * 5, base_branch="main")),
        (1, ts.CompleteTask(at=at, actor="coordinator")),  # a person merged the pull request
        (.5, ts.FailTask(at=at, actor="coordinator", reason="tests failed", retryable=rnd.random() < 0.8)),
        (3, ts.RetryTask(at=at, actor="coordinator", backoff_base=1.0)),
        (.5, ts.RequeueTask(at=at, actor="coordinator", reason="agent_lost", agent_id=agent)),
        (.3, ts.CancelTask(at=at, actor="user", reason="no longer needed", force=rnd.random() < 0.5)),
        # the pull request's way to green
        (8, ts.RecordChecks(at=at, actor="coordinator", head_sha=awaited,
                            checks=rnd.choice([PASS, PASS, PASS, PASS, RED, FLAKY, INFRA, WAITING]),
                            base=rnd.choice([{}, GREEN_BASE]), merge_queue=rnd.random() < 0.5)),
        (1, ts.ChecksTimedOut(at=at, actor="coordinator", waited=3600)),
        (1, ts.RequestRerun(at=at, actor="alice")),
        (1, ts.RecordConflict(at=at, actor="coordinator", base_branch="main", base_sha="b" * 40,
                              files=("a.py",), max_rebases=2)),
        (4, ts.ApprovePullRequest(at=at, actor="alice", by="alice", merge_queue=rnd.random() < 0.7)),
        (6, ts.StartMergeTest(at=at, actor="coordinator", queue_ref="ccc/queue/main",
                              queue_sha=state.head_sha[::-1] or "q" * 40, base_sha="b" * 40)),
        (1, ts.DequeueMerge(at=at, actor="coordinator", reason="base moved")),
        (8, ts.CompleteMerge(at=at, actor="coordinator", base_branch="main", merge_sha="m" * 40)),
    ]
    return [c for _, c in sorted(options, key=lambda o: -rnd.random() ** (1 / o[0]))]


def _agent_command(rnd: random.Random, aid: str, state: ag.AgentState | None, at: datetime, tasks):
    if state is None or state.status == "offline":
        return ag.RegisterAgent(at=at, actor=aid, agent_id=aid, specialties=("backend", "general"),
                                capacity=rnd.choice([1, 2]))
    options = [
        ag.StartAgentTask(at=at, actor=aid, task_id=rnd.choice(tasks)),
        ag.ReleaseAgentTask(at=at, actor=aid, task_id=(state.active_tasks or ("none",))[0],
                            outcome=rnd.choice(["done", "failed"])),
        ag.EnterMaintenance(at=at, actor=aid), ag.LeaveMaintenance(at=at, actor=aid),
        ag.ReportError(at=at, actor=aid, reason="disk full"), ag.Recover(at=at, actor=aid),
        ag.GoOffline(at=at, actor="coordinator", reason="heartbeat_timeout"),
        ag.RegisterAgent(at=at, actor=aid, agent_id=aid, specialties=("backend",)),
    ]
    return rnd.choices(options, [6, 6, 1, 1, 1, 1, 1, 1])[0]


def random_history(seed: int, n_tasks: int = 6, steps: int = 120) -> list:
    """An interleaved log of task and agent events (no sequence numbers yet)."""
    rnd = random.Random(seed)
    tasks: dict[str, ts.TaskState | None] = {}
    agents: dict[str, ag.AgentState | None] = {a: None for a in AGENTS}
    log: list = []
    at = T0
    task_ids = [f"acme_app-{i}" for i in range(1, n_tasks + 1)]
    for step in range(steps):
        at = at + timedelta(seconds=1)
        if rnd.random() < 0.65:
            tid = rnd.choice(task_ids)
            state = tasks.get(tid)
            if state is None:
                cmds = [ts.CreateTask(at=at, actor="coordinator", task_id=tid, issue=IssueRef(
                    source="local", repo="acme/app", number=int(tid.rsplit("-", 1)[1]),
                    title=f"Issue {tid}"))]
            else:
                cmds = _task_commands(rnd, state, at)[:TRIES]
            events = []
            for cmd in cmds:
                try:
                    events = ts.decide(state, cmd)
                    break
                except DomainError:
                    continue
            for e in events:
                tasks[tid] = ts.evolve(tasks.get(tid), e)
            log.extend(events)
        else:
            aid = rnd.choice(AGENTS)
            try:
                events = ag.decide(agents[aid], _agent_command(rnd, aid, agents[aid], at, task_ids))
            except DomainError:
                continue
            for e in events:
                agents[aid] = ag.evolve(agents[aid], e)
            log.extend(events)
    return log
