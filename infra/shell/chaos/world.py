"""The :class:`World` a fault injector of ``ccc chaos`` acts on (the sandbox, a
connection, the servers, the tracker and the :class:`Fault` it fills in), and the
questions injectors ask it: which agent is busy, is it offline, who took its tasks."""

from __future__ import annotations

from nats.aio.client import Client

from events.task_state import WITH_AGENT

from infra.adapters.nats.cluster import NatsCluster
from infra.adapters.nats.server import EmbeddedServer
from infra.shell.chaos.checks import PR_UP
from infra.shell.chaos.model import Fault
from infra.shell.chaos.sandbox import Sandbox, Tracker


class World:
    def __init__(self, sb: Sandbox, nc: Client, url: str, tracker: Tracker) -> None:
        self.sb, self.nc, self.url, self.tracker = sb, nc, url, tracker
        self.rng = sb.rng
        self.fault = Fault()
        self.server: EmbeddedServer | None = None
        self.cluster: NatsCluster | None = None

    @property
    def quick(self) -> bool:
        return self.sb.options.quick

    def done(self) -> bool:
        return self.tracker.all_in(self.sb.issues)


async def busy_agent(w: World, exclude: tuple[str, ...] = (), status: str = "in_progress",
                     timeout: float = 60.0) -> tuple[str, dict[str, int]]:
    """An agent working on a task (in ``status``): its id and {task: attempt} it holds."""
    found: list[str] = []

    def pick() -> bool:
        for _, agent, st in w.tracker.in_flight():
            if st == status and agent not in exclude and agent in w.sb.procs:
                found.append(agent)
                return True
        return False

    if not await w.tracker.wait(pick, timeout):
        raise TimeoutError(f"no agent had a task {status} within {timeout}s")
    agent = found[0]
    held = {t: s.attempt for t, s in w.tracker.model.tasks.items() if s.agent_id == agent and s.status in WITH_AGENT}
    return agent, held


def offline(w: World, agent: str) -> bool:
    a = w.tracker.model.agents.get(agent)
    return a is not None and a.status == "offline"


def taken_by_other(w: World, held: dict[str, int], agent: str) -> bool:
    """Every task ``agent`` held is done or, in a later attempt, with another agent."""
    tasks = w.tracker.model.tasks
    return all(tasks[t].status in PR_UP
               or (tasks[t].attempt > a and tasks[t].agent_id not in (None, agent)) for t, a in held.items())
