"""Why the scheduler assigned a task to an agent, pure: one bounded line per assignment,
carried by the ``task.assigned`` event (``TaskAssigned.why``) onto the task view::

    lane: pull request round (CI fix); urgency 9.4 (priority high, waited 12m);
    agent-2: backend specialist, least loaded of 2 (1/2 slots busy)

The first half is the task's place in the order (:func:`projections.fairness.explain`,
the words the views show for a queued task); the second says why this agent, by the
rules of :func:`actors.scheduling.plan_assignments` (specialists before generalists, then
least loaded, then id); with fairness limits, a third part says how much of its
repository's and author's share the task takes.

:func:`assignment_whys` is computed *beside* ``plan_assignments`` rather than inside it:
it takes the same inputs plus the plan and replays the pass (the agents' loads and the
fairness counts as the pass had them when it chose each task), so ``plan_assignments``
keeps its result type for every caller, and a pass that explains nothing (no plan) costs
nothing extra.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime

from events.agent_state import ACCEPTING, AgentState
from events.task_state import TaskState

from projections.fairness import DEFAULT_POLICY, Admission, FairnessPolicy, explain

from actors.scheduling import can_take, held_by_agent

MAX_WHY_CHARS = 320  # one line of a task view (long names included); TaskAssigned.why never holds more


def assignment_whys(
    plan: Iterable[tuple[str, str]],
    tasks: Mapping[str, TaskState],
    agents: Mapping[str, AgentState],
    now: datetime,
    held: Mapping[str, int] | None = None,
    *,
    policy: FairnessPolicy = DEFAULT_POLICY,
    running: Iterable[str] | None = None,
) -> dict[str, str]:
    """``{task_id: why}`` for ``plan`` (``plan_assignments``' result, in its order), given
    the inputs that pass was given (``held``, ``running``: the same indexes)."""
    held = dict(held_by_agent(tasks) if held is None else held)
    admission = Admission(policy, tasks, running)
    whys: dict[str, str] = {}
    for task_id, agent_id in plan:
        task, agent = tasks[task_id], agents[agent_id]
        parts = [explain(task, now, policy, tasks), agent_words(task, agent, agents, held)]
        if policy.limited:
            parts.append(share_words(task, policy, admission))
        whys[task_id] = bounded("; ".join(p for p in parts if p))
        admission.take(task)
        held[agent_id] = held.get(agent_id, 0) + 1
    return whys


def agent_words(task: TaskState, agent: AgentState, agents: Mapping[str, AgentState],
                held: Mapping[str, int]) -> str:
    """Why ``agent`` of those free to take ``task`` now (``held``: tasks per agent
    before this assignment): ``agent-2: backend specialist, least loaded of 2 (1/2 slots
    busy)``, ``agent-5: general agent (no frontend specialist free), the only one free
    (0/1 slots busy)``."""
    free = [a for a in agents.values()
            if a.status in ACCEPTING and held.get(a.agent_id, 0) < a.capacity and can_take(a, task)]
    specialist = task.specialty in agent.specialties
    # the scheduler compares an agent only with those of its own kind: a specialist
    # always wins over a generalist, so a generalist was chosen only when no specialist was free
    peers = [a for a in free if (task.specialty in a.specialties) == specialist] or [agent]
    if task.specialty == "general":
        who = "general agent"
    elif specialist:
        who = f"{task.specialty} specialist"
    else:
        who = f"general agent (no {task.specialty} specialist free)"
    if task.security_level != "public":
        who += f", cleared for {task.security_level}"
    loads = sorted(held.get(a.agent_id, 0) / a.capacity for a in peers)
    if len(peers) == 1:
        pick = "the only one free"
    elif len(loads) > 1 and loads[0] == loads[1]:
        pick = f"least loaded of {len(peers)}, first by id"
    else:
        pick = f"least loaded of {len(peers)}"
    return f"{agent.agent_id}: {who}, {pick} ({held.get(agent.agent_id, 0)}/{agent.capacity} slots busy)"


def share_words(task: TaskState, policy: FairnessPolicy, admission: Admission) -> str:
    """``fairness: repository acme/app 0/1, author bob 1/2 running``: the limits that
    apply to ``task`` and how many tasks of each already had an agent."""
    repo, author = task.issue.repo, task.issue.author
    parts = []
    if (cap := policy.repo_cap(repo)) is not None:
        parts.append(f"repository {repo} {admission.repos.get(repo, 0)}/{cap}")
    if author and (cap := policy.author_cap(author)) is not None:
        parts.append(f"author {author} {admission.authors.get(author, 0)}/{cap}")
    return f"fairness: {', '.join(parts)} running" if parts else ""


def bounded(text: str, limit: int = MAX_WHY_CHARS) -> str:
    """One line, at most ``limit`` characters."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["MAX_WHY_CHARS", "agent_words", "assignment_whys", "bounded", "share_words"]
