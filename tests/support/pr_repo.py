"""A scene for the "PR to green" end-to-end tests: a local forge with one sample
repository, recorded coder sessions for its issues, and a whole :class:`LocalCluster`
(coordinator, real agents with the scripted coder, the local forge's CI running the
repository's ``.ccc/test-command`` in the agents' sandbox) in this process, on the test
session's nats-server, in the test's own namespace and data directory.

Why a scene object: each test drives the cluster the way a person and the forge would
(publish an issue, approve or merge a pull request as ``ccc pr approve|merge`` does) and
then looks at what happened in the log (task events, the forge's checks facts) and on
the forge (branches, the default branch's history). Waiting is polling the coordinator's
live read model, never a fixed sleep; a wait that times out says where the task stood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.codec import decode_issue, encode
from events.issue import IssueChecksCompleted, IssueOpened, IssuePullRequestApproved, IssuePullRequestMerged
from events.subjects import Namespace, repo_token, task_id_for
from events.task_state import TaskState
from events.trust import OPERATOR
from infra.adapters.forge.local import LocalForge
from infra.adapters.nats.settings import Settings, load_settings
from infra.shell.app.cluster import ClusterOptions, LocalCluster
from tests.support.session import creds_of

# the agents' sandbox, as the other tests choose it: bubblewrap where it is installed
SANDBOX = "bwrap" if shutil.which("bwrap") and shutil.which("prlimit") else "none"
# unittest, not pytest: the repository's tests run in the sandbox, which shows the
# system's Python but not the test run's virtualenv
TEST_COMMAND = "python3 -m unittest discover -s tests -v\n"

Step = dict[str, Any]


# -- recorded sessions -----------------------------------------------------------------
def edit(path: str, old: str, new: str) -> Step:
    return {"edit": {"path": path, "old": old, "new": new}}


def write(path: str, content: str) -> Step:
    return {"write": {"path": path, "content": content}}


def session(summary: str, *steps: Step) -> dict:
    return {"summary": summary, "steps": list(steps)}


def write_script(script_dir: Path, repo: str, number: int, attempts: Sequence[dict], *,
                 ci_fixes: Sequence[dict] = (), rebases: Sequence[dict] = ()) -> Path:
    """``<repo token>-<number>.json`` in the scripted coder's format
    (infra/adapters/coders/scripted.py): implementation attempts, CI fix rounds, rebases."""
    script_dir.mkdir(parents=True, exist_ok=True)
    body: dict[str, Any] = {"attempts": list(attempts)}
    if ci_fixes:
        body["ci_fixes"] = list(ci_fixes)
    if rebases:
        body["rebases"] = list(rebases)
    path = script_dir / f"{repo_token(repo)}-{number}.json"
    path.write_text(json.dumps(body, indent=1))
    return path


# -- the scene -------------------------------------------------------------------------
def cluster_settings(data_dir: Path, nats_url: str, ns: Namespace) -> Settings:
    """The settings ``ccc --data-dir D --nats-url URL --creds KIT up`` would have against
    the test session's server (every role connects with the admin kit given)."""
    return load_settings(env={}, data_dir=str(data_dir), nats_url=nats_url, creds=creds_of(nats_url),
                         namespace=ns.prefix, sandbox=SANDBOX)


class Scene:
    def __init__(self, cluster: LocalCluster, repo: str, forge: LocalForge, root: Path) -> None:
        self.cluster = cluster
        self.repo = repo
        self.forge = forge
        self.root = root
        self.ns = cluster.ns

    # -- the read side ---------------------------------------------------------------
    @property
    def model(self):
        assert self.cluster.coordinator is not None
        return self.cluster.coordinator.model

    def task_id(self, number: int) -> str:
        return task_id_for(self.repo, number)

    def task(self, number: int) -> TaskState:
        return self.model.tasks[self.task_id(number)]

    def status(self, number: int) -> str | None:
        t = self.model.tasks.get(self.task_id(number))
        return t.status if t is not None else None

    async def stored(self, number: int) -> list[tuple[int, Any]]:
        """The task's events in log order, with their stream sequences."""
        store = self.cluster.coordinator.store
        loaded = await store.load(self.ns.task_filter(self.task_id(number)))
        return [(e.seq, e.event) for e in loaded.events]

    async def events(self, number: int) -> list:
        """The task's events in log order."""
        return [event for _, event in await self.stored(number)]

    async def kinds(self, number: int) -> list[str]:
        return [e.__struct_config__.tag for e in await self.events(number)]

    async def checks_facts(self) -> list[IssueChecksCompleted]:
        """Every ``issue.checks_completed`` fact the forge's CI published, in order."""
        js = self.cluster.nc.jetstream()
        info = await js.stream_info(self.ns.issues_stream)
        facts = []
        for seq in range(info.state.first_seq or 1, info.state.last_seq + 1):
            msg = await js.get_msg(self.ns.issues_stream, seq)
            event = decode_issue(self.ns.rel(msg.subject), msg.data)
            if isinstance(event, IssueChecksCompleted):
                facts.append(event)
        return facts

    async def until(self, number: int, predicate: Callable[[TaskState], bool], what: str,
                    timeout: float = 60.0, *, unless: Sequence[str] = ("failed", "cancelled")) -> TaskState:
        """Poll the live read model until the task satisfies ``predicate``; a task that
        ends in one of ``unless`` first (or the timeout) fails with where it stood."""
        tid = self.task_id(number)
        deadline = time.monotonic() + timeout
        while True:
            t = self.model.tasks.get(tid)
            if t is not None and predicate(t):
                return t
            ended = t is not None and t.status in unless and not predicate(t)
            if ended or time.monotonic() > deadline:
                raise AssertionError(await self._where(number, f"waiting for {tid} {what}"
                                                       + (f": it is {t.status}" if ended else " timed out")))
            await asyncio.sleep(0.05)

    async def until_status(self, number: int, *statuses: str, timeout: float = 60.0) -> TaskState:
        unless = tuple(s for s in ("failed", "cancelled") if s not in statuses)
        return await self.until(number, lambda t: t.status in statuses, f"to be {' or '.join(statuses)}",
                                timeout, unless=unless)

    async def _where(self, number: int, heading: str) -> str:
        t = self.model.tasks.get(self.task_id(number))
        if t is None:
            return f"{heading}; no such task"
        lines = [heading, (f"status={t.status} work={t.work} attempt={t.attempt} ci_fixes={t.ci_fixes} "
                          f"rebases={t.rebases} reruns={t.reruns} classification={t.classification!r}"),
                 f"status_reason={t.status_reason!r}", f"failure={t.failure_phase}: {t.failure_reason!r}",
                 "events: " + ", ".join(await self.kinds(number))]
        for c in t.checks:
            lines.append(f"check {c.name}={c.conclusion}: ...{c.log_tail[-1500:]}")
        return "\n".join(lines)

    # -- what people and the forge do ------------------------------------------------
    async def publish(self, event) -> None:
        js = self.cluster.nc.jetstream()
        await js.publish(self.ns.subject(event.rel_subject), encode(event),
                         headers={"Nats-Msg-Id": event.event_id})

    async def open_issue(self, number: int, title: str, body: str = "", labels: Sequence[str] = ()) -> str:
        await self.publish(IssueOpened(
            event_id=f"test:{self.repo}#{number}:opened", repo=self.repo, number=number, title=title,
            body=body, labels=tuple(labels), occurred_at=_now(), author="tester",
            author_association=OPERATOR))
        return self.task_id(number)

    async def approve(self, number: int) -> None:
        """What ``ccc pr approve`` does: the reviewer's approval as a forge fact."""
        t = self.task(number)
        await self.publish(IssuePullRequestApproved(
            event_id=f"test:{t.task_id}:approve", source=t.issue.source, repo=t.issue.repo,
            number=t.issue.number, occurred_at=_now(), pr_number=t.pr_number, branch=t.branch, actor="cli",
            author="cli", author_association=OPERATOR))

    async def merge(self, number: int) -> str:
        """What ``ccc pr merge`` does: merge the branch on the forge, publish the fact.
        Returns the default branch's new head."""
        t = self.task(number)
        sha = await asyncio.to_thread(self.forge.merge, t.issue.repo, t.branch,
                                      message=f"Merge {t.branch}: {t.issue.title}")
        await self.publish(IssuePullRequestMerged(
            event_id=f"local:{t.issue.repo}#{t.issue.number}:merged:{t.attempt}", source=t.issue.source,
            repo=t.issue.repo, number=t.issue.number, occurred_at=_now(), pr_number=t.pr_number,
            branch=t.branch))
        return sha

    # -- the forge -------------------------------------------------------------------
    def main_sha(self) -> str:
        return self.forge.branch_sha(self.repo, self.forge.default_branch(self.repo))

    def first_parents(self, branch: str = "main") -> list[str]:
        """The commits ``branch`` has pointed at, newest first, as its first-parent chain."""
        out = subprocess.run(["git", "rev-list", "--first-parent", f"refs/heads/{branch}"],
                             cwd=self.forge.repo_path(self.repo), check=True, capture_output=True, text=True)
        return out.stdout.split()

    def run_test_command(self, branch: str = "main") -> subprocess.CompletedProcess:
        """Check ``branch`` of the forge out and run its ``.ccc/test-command`` as CI does
        (``CI=true``: the CI-only tests run too)."""
        work = self.root / f"checkout-{branch.replace('/', '_')}-{time.monotonic_ns()}"
        origin = str(self.forge.repo_path(self.repo))
        subprocess.run(["git", "clone", "-q", "--branch", branch, origin, str(work)], check=True,
                       capture_output=True)
        command = (work / ".ccc" / "test-command").read_text().strip()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "CI": "true",
               "CCC_CI_RUN_ATTEMPT": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        return subprocess.run(["sh", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=60, check=False)


@contextlib.asynccontextmanager
async def scene(root: Path, nats_url: str, ns: Namespace, repo: str, files: Mapping[str, str],
                scripts: Mapping[int, dict], **options: Any) -> AsyncIterator[Scene]:
    """A cluster over a fresh local forge holding ``repo`` (``files`` on main), with the
    recorded sessions ``scripts`` ({issue number: write_script's keyword arguments}).
    ``options`` override :class:`ClusterOptions` (one agent by default: the machine is small)."""
    data_dir = root / "data"
    forge = LocalForge(data_dir / "forge")
    forge.create_repo(repo, files)
    script_dir = root / "scripts"
    for number, script in scripts.items():
        write_script(script_dir, repo, number, **script)
    defaults: dict[str, Any] = {
        "agents": 1, "specialties": ("general",), "capacity": 1, "api_port": None,
        "script_dir": str(script_dir), "heartbeat_interval": 0.5, "heartbeat_timeout": 10.0,
        "retry_base": 0.2, "retry_max": 1.0, "test_timeout": 60.0, "shutdown_grace": 1.0,
        "checks_timeout": 120.0}
    options = ClusterOptions(**{**defaults, **options})
    cluster = LocalCluster(cluster_settings(data_dir, nats_url, ns), ns, options)
    async with cluster:
        yield Scene(cluster, repo, forge, root)


def _now() -> datetime:
    return datetime.now(UTC)
