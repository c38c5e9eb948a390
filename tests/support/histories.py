"""Random *valid* histories for property tests: commands are chosen at random and
kept only when the pure ``decide`` accepts them, so every history is one the real
system could have written."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from events import agent_state as ag
from events import task_state as ts
from events.errors import DomainError
from events.task import Analysis, IssueRef

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
AGENTS = ("agent-a", "agent-b", "agent-c")


def _task_command(rnd: random.Random, state: ts.TaskState, at: datetime):
    agent = state.agent_id or rnd.choice(AGENTS)
    options = [
        ts.StartAnalysis(at=at, actor="coordinator"),
        ts.RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(
            specialty=rnd.choice(["backend", "frontend", "general"]),
            priority=rnd.choice(["normal", "high"]))),
        ts.AssignTask(at=at + timedelta(hours=1), actor="coordinator", agent_id=agent),
        ts.StartTask(at=at, actor=agent, agent_id=agent),
        ts.StartTests(at=at, actor=agent, agent_id=agent, files_changed=("a.py",)),
        ts.OpenPullRequest(at=at, actor=agent, agent_id=agent, branch="ccc/x"),
        ts.CompleteTask(at=at, actor="coordinator"),
        ts.FailTask(at=at, actor="coordinator", reason="tests failed", retryable=rnd.random() < 0.8),
        ts.RetryTask(at=at, actor="coordinator", backoff_base=1.0),
        ts.RequeueTask(at=at, actor="coordinator", reason="agent_lost", agent_id=agent),
        ts.CancelTask(at=at, actor="user", reason="no longer needed", force=rnd.random() < 0.5),
    ]
    weights = [5, 5, 5, 5, 5, 5, 3, 2, 3, 1, 1]
    return rnd.choices(options, weights)[0]


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
                cmd = ts.CreateTask(at=at, actor="coordinator", task_id=tid, issue=IssueRef(
                    source="local", repo="acme/app", number=int(tid.rsplit("-", 1)[1]), title=f"Issue {tid}"))
            else:
                cmd = _task_command(rnd, state, at)
            try:
                events = ts.decide(state, cmd)
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
