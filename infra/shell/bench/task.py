"""``ccc bench task``: what a task costs besides the coder and the tests (the
orchestration overhead), phase by phase, beside each phase's raw floor measured in the
same run on the same repository.

What runs is the real thing, composed as ``ccc up`` composes it (in one process, from
:mod:`infra.shell.app.cluster`): a throwaway nats-server (:class:`~infra.shell.bench.bus.
BenchBus`, security off, or with ``security="on"`` secured as ``ccc up`` secures it: each
part connects as its own role's user), the coordinator (:func:`build_coordinator`, following the local
forge's branches as ``ccc up`` has it) and ONE agent (:func:`build_agent`: the real
:class:`~infra.adapters.git.workbench.GitWorkbench` with its mirrors and warm checkouts and
the default sandbox, the object-store artifacts, the local forge's client and the
:class:`~infra.adapters.coders.scripted.ScriptedCoder`). The forge's CI is not started (it
runs after the push, off the task's path).

Two repositories are generated with :func:`infra.shell.bench.workspace.generate_repo`, a
small one (50 files) and a large one (30,000 files, 5,000 commits by default), each with a
commit on top that adds ``.ccc/test-command`` (``true``: a test run that costs nothing but
its process), ``.ccc/scripts/<n>.json`` (the scripted fix: one edit of one file) and that
file. On each repository K issues run one after another: the first is the agent's first
task there (its mirror is cloned: *cold*), the others find a warm checkout (*warm*: the
steady state). Before each task the forge's default branch moves by one commit (every
task has something to fetch) and the disk is synced; after it the background refill of the
warm checkout is waited for (off the task's path, as in the steady state) and the raw
floors are measured.

Where the figures come from: the log, not the agent. Every report an agent appends ends a
phase; its ``occurred_at`` is when the agent built it (the phase's work done) and its
store timestamp when nats-server stored it. So, per task (``ts``: store time, ``at``: the
report's own time, both this machine's clock):

* dispatch: the issue stored -> ``agent.task_started``'s ``at`` (intake, scheduling, the
  assignment's delivery, the agent's read of the task);
* a phase: the previous report stored -> its report's ``at`` (the previous append's ack,
  the phase's work);
* an append: a report's ``at`` -> stored (decide, encode, the publish, the store: the
  ack's way back is in the next phase), against the same measure of a raw ``js.publish``
  (a client timestamp in the body -> the store timestamp);
* the coder's own time is taken around the scripted coder's ``implement`` (the coder the
  agent is given is a :class:`TimedCoder` around the real one), so the commit is the
  implementation phase minus the coder; testing is the implementation report stored ->
  the tests' report's ``at``.

The phases and appends add up exactly to the task's wall time (issue stored ->
``agent.task_released`` stored); the overhead is that minus the coder and the testing
phase. Target: <= 1 s per task, median of the warm tasks on the large repository.

Raw floors, each in the same round, on the same repository: ``git clone --shared`` of a
mirror with a parallel checkout (the fastest raw method of ``ccc bench workspace``),
``git ls-files``, ``git add -A`` + ``git commit`` of the same one-file change, ``git push``
of that commit to the forge, the local forge's own pull-request call, and on the same
nats-server a publish round trip, a publish -> stored time and a publish -> delivery hop
(dispatch's floor is two hops and three round trips: the coordinator's delivery, its two
appends, the agent's delivery and its read of the task).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog
from nats.js import api

from actors.coordinator import CoordinatorConfig
from events.agent import AgentEventBase
from events.codec import decode_event, decode_issue, encode
from events.errors import BadEventError
from events.issue import IssueOpened
from events.subjects import Namespace, task_id_for
from events.trust import OPERATOR
from events.work import CodeOutcome, CodeRequest
from infra.adapters.coders.scripted import ScriptedCoder
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.nats.provisioning import provision, provision_agent
from infra.shell.app.cluster import build_agent, build_coordinator
from infra.shell.bench.bus import BenchBus
from infra.shell.bench.probes import cpu_stall_seconds, loadavg, pct, stored_messages
from infra.shell.bench.workspace import advance, generate_repo

log = structlog.get_logger("ccc.bench.task")

TARGET_S = 1.0  # overhead per task, warm, on the large repository
FULL = {"files": 30_000, "commits": 5_000, "tasks": 5}
QUICK = {"files": 2_000, "commits": 200, "tasks": 3}
SMALL = {"files": 50, "commits": 20}
AGENT = "bench-task"
NS = Namespace("benchtask")
TARGET_FILE = "bench/target.py"
TEST_COMMAND = "true"
TASK_TIMEOUT = 600.0  # seconds one task may take (the first on the large repository clones it)
NATS_SAMPLES = 40  # raw publishes per round for each NATS floor
_AUTHOR = ("ccc bench", "bench@ccc.local")

# the agent's reports about a task, in the order they are appended
APPENDS = ("task_started", "workspace_prepared", "codebase_analysed", "implementation_produced", "tests_run",
           "changes_pushed", "pr_opened", "task_released")
# (phase, the stage it starts at (its store time), the report that ends it (its ``at``))
PHASES = (
    ("dispatch", "issue.opened", "task_started"),
    ("workspace", "task_started", "workspace_prepared"),
    ("analysis", "workspace_prepared", "codebase_analysed"),
    ("implementation", "codebase_analysed", "implementation_produced"),
    ("testing", "implementation_produced", "tests_run"),
    ("push", "tests_run", "changes_pushed"),
    ("pull request", "changes_pushed", "pr_opened"),
    ("release", "pr_opened", "task_released"),
)
EXCLUDED = ("coder", "testing")  # not orchestration: what the budget leaves out
# the phases as the table shows them (the implementation split into the coder and the rest)
ROW_PHASES = ("dispatch", "workspace", "analysis", "coder", "commit", "testing", "push", "pull request",
              "release")
FLOOR_OF = {
    "dispatch": "2 raw hops + 3 raw round trips",
    "workspace": "git clone --shared (mirror), parallel checkout",
    "analysis": "git ls-files",
    "commit": "git add -A + git commit",
    "push": "git push (one commit)",
    "pull request": "the local forge's pull-request call",
    "append": "raw js.publish -> stored",
}
WHAT = {
    "dispatch": "issue stored -> the agent starts (intake, scheduling, delivery, the task read)",
    "workspace": "workspace, warm checkout, the agent's clone, network setting",
    "analysis": "languages + test command",
    "coder": "the scripted coder (excluded)",
    "commit": "implementation minus the coder: branch, commit, files, diff, artifact",
    "testing": "the repository's tests in the sandbox, their log stored (excluded)",
    "push": "change checked, pushed to the forge",
    "pull request": "the forge's pull-request call",
    "release": "finishing the workspace (checkout moved to the trash)",
}


# -- results ----------------------------------------------------------------------------
class TaskTimes(msgspec.Struct, kw_only=True):
    """One task, seconds."""

    number: int
    task_id: str
    warm: bool  # not the agent's first task on the repository
    phases: dict[str, float]  # ROW_PHASES
    appends: dict[str, float]  # APPENDS
    total: float  # the issue stored -> agent.task_released stored
    overhead: float  # total - coder - testing
    test_command: float  # the test command's own run (TestsRun.duration)
    refill: float  # after the task: waiting for the workbench's background chores (off its path)
    pr_url: str
    branch: str


class Row(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # "phase" | "append" | "excluded" | "total"
    warm: float  # median over the warm tasks
    first: float  # the first (cold) task
    floor: float  # 0.0: none
    floor_what: str
    ratio: float  # warm / floor (0.0 without a floor)
    what: str = ""


class RepoRun(msgspec.Struct, kw_only=True):
    name: str
    repo: str
    files: int
    commits: int
    generate_seconds: float
    tasks: list[TaskTimes]
    floors: dict[str, float]  # median per phase (and "append", "rtt", "hop")
    rows: list[Row]
    overhead_warm: float
    overhead_first: float
    floor_total: float  # the raw floors of the budget's phases and appends, added up
    prs_on_forge: int  # tasks whose branch is on the forge with an agent.pr_opened


class TaskBench(msgspec.Struct, kw_only=True):
    repos: list[RepoRun]
    tasks_per_repo: int
    target_s: float
    overhead_warm_large: float
    ok: bool
    nats: dict[str, float]  # raw NATS, pooled over the run, ms: rtt/stored/hop p50 and p99
    sandbox: str
    security: str
    cpus: int
    loadavg: list[float]
    # the share of the run's wall time in which some runnable task waited for a CPU
    # (/proc/pressure/cpu; -1 where there is none): how shared the machine was
    cpu_pressure: float = -1.0


# -- pure arithmetic ------------------------------------------------------------------------
def to_ns(at: datetime) -> int:
    """A timezone-aware datetime -> ns since the epoch, exactly (no float)."""
    delta = at - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def task_times(stamps: Mapping[str, tuple[int, int]], *, coder: float) -> tuple[dict[str, float],
                                                                            dict[str, float], float]:
    """From one task's stages (stage -> (store ns, ``at`` ns; 0 for the issue)) and the
    coder's own seconds: (phases, appends, total), seconds. The phases and appends add up
    to the total; the implementation phase is split into ``coder`` and ``commit``."""
    missing = [s for s in ("issue.opened", *APPENDS) if s not in stamps]
    if missing:
        raise ValueError(f"the log lacks {', '.join(missing)}")
    phases: dict[str, float] = {}
    for name, start, end in PHASES:
        phases[name] = (stamps[end][1] - stamps[start][0]) / 1e9
    appends = {a: (stamps[a][0] - stamps[a][1]) / 1e9 for a in APPENDS}
    implementation = phases.pop("implementation")
    phases["coder"] = coder
    phases["commit"] = implementation - coder
    total = (stamps["task_released"][0] - stamps["issue.opened"][0]) / 1e9
    return {k: phases[k] for k in ROW_PHASES}, appends, total


def overhead(phases: Mapping[str, float], total: float) -> float:
    """Everything but the coder and the tests."""
    return total - sum(phases[k] for k in EXCLUDED)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(value: float, floor: float) -> float:
    return round(value / floor, 2) if floor > 0 else 0.0


def dispatch_floor(rtt: float, hop: float) -> float:
    return 2 * hop + 3 * rtt


def rows_of(tasks: Sequence[TaskTimes], floors: Mapping[str, float]) -> list[Row]:
    """The table of one repository: each phase and each append (median of the warm tasks,
    the first task beside it) against its floor, then the overhead against the floors'
    sum. Without a warm task the first one stands in. Seconds to the microsecond (a raw
    append is ~0.1 ms: coarser rounding would skew its ratio)."""
    warm = [t for t in tasks if t.warm] or list(tasks)
    first = tasks[0] if tasks else None
    rows = []
    for name in ROW_PHASES:
        floor = floors.get(name, 0.0)
        w = median([t.phases[name] for t in warm])
        rows.append(Row(name=name, kind="excluded" if name in EXCLUDED else "phase", warm=round(w, 6),
                        first=round(first.phases[name], 6) if first else 0.0, floor=round(floor, 6),
                        floor_what=FLOOR_OF.get(name, "") if floor else "", ratio=ratio(w, floor),
                        what=WHAT[name]))
    for name in APPENDS:
        floor = floors.get("append", 0.0)
        w = median([t.appends[name] for t in warm])
        rows.append(Row(name=f"append agent.{name}", kind="append", warm=round(w, 6),
                        first=round(first.appends[name], 6) if first else 0.0, floor=round(floor, 6),
                        floor_what=FLOOR_OF["append"], ratio=ratio(w, floor)))
    total_floor = floor_total(floors)
    w = median([t.overhead for t in warm])
    rows.append(Row(name="overhead per task", kind="total", warm=round(w, 6),
                    first=round(first.overhead, 6) if first else 0.0, floor=round(total_floor, 6),
                    floor_what="the floors above, added up", ratio=ratio(w, total_floor),
                    what="everything except the coder and the tests"))
    return rows


def floor_total(floors: Mapping[str, float]) -> float:
    phases = [k for k in ROW_PHASES if k not in EXCLUDED]
    return sum(floors.get(k, 0.0) for k in phases) + len(APPENDS) * floors.get("append", 0.0)


# -- the coder, timed ------------------------------------------------------------------------
class TimedCoder:
    """The coder the agent is given: the real one, with its own time per task recorded
    (seconds), so the implementation phase can be split into the coder and the rest."""

    def __init__(self, inner: ScriptedCoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.seconds: dict[str, float] = {}

    async def implement(self, request: CodeRequest, workspace) -> CodeOutcome:
        started = time.perf_counter()
        try:
            return await self.inner.implement(request, workspace)
        finally:
            self.seconds[request.task_id] = time.perf_counter() - started


# -- the repositories -------------------------------------------------------------------------
def _git(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    return subprocess.run(["git", *args], cwd=cwd, env=full, check=True,
                          capture_output=True).stdout.decode().strip()


def target_text(rev: str) -> str:
    return f'"""The file every scripted fix edits."""\n\nVALUE = "{rev}"\n'


def bench_files(tasks: int) -> dict[str, str]:
    """What the bench adds on top of the generated history: the test command, a scripted
    fix per issue (one edit of one file) and that file."""
    fix = {"attempts": [{"summary": "change the value", "steps": [
        {"edit": {"path": TARGET_FILE, "old": 'VALUE = "before"', "new": 'VALUE = "after"'}}]}]}
    files = {".ccc/test-command": TEST_COMMAND + "\n", TARGET_FILE: target_text("before")}
    files.update({f".ccc/scripts/{n}.json": json.dumps(fix) for n in range(1, tasks + 1)})
    return files


def add_files(bare: Path, files: Mapping[str, str], message: str) -> str:
    """One commit on ``main`` adding ``files``, written with plumbing (no checkout of the
    repository's other files)."""
    env = {"GIT_DIR": str(bare), "GIT_INDEX_FILE": str(bare / "bench-index"),
           "GIT_AUTHOR_NAME": _AUTHOR[0], "GIT_AUTHOR_EMAIL": _AUTHOR[1],
           "GIT_COMMITTER_NAME": _AUTHOR[0], "GIT_COMMITTER_EMAIL": _AUTHOR[1]}
    full = {**os.environ, **env}

    def git(*args: str, data: bytes | None = None) -> str:
        return subprocess.run(["git", *args], input=data, env=full, check=True,
                              capture_output=True).stdout.decode().strip()

    git("read-tree", "main")
    for path, content in files.items():
        blob = git("hash-object", "-w", "--stdin", data=content.encode())
        git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    commit = git("commit-tree", git("write-tree"), "-p", "main", "-m", message)
    git("update-ref", "refs/heads/main", commit)
    (bare / "bench-index").unlink()
    return commit


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class RawGit:
    """The git floors of one repository: a mirror of the forge's repository, kept current
    outside the timing, and one round of raw git per task."""

    def __init__(self, tmp: Path, bare: Path, url: str) -> None:
        self.tmp, self.bare, self.url = tmp, bare, url
        self.mirror = tmp / "raw-mirror.git"
        _git("clone", "-q", "--mirror", str(bare), str(self.mirror))

    def round(self, n: int) -> tuple[dict[str, float], str]:
        """The git floors of round ``n`` and the branch it pushed."""
        _git("fetch", "-q", "--prune", "origin", cwd=self.mirror)
        dest, branch = self.tmp / "raw-workspace", f"raw/{n}"
        times = {"workspace": _timed(lambda: _git(
            "-c", f"checkout.workers={os.cpu_count() or 1}", "-c", "checkout.thresholdForParallelism=100",
            "clone", "-q", "--shared", str(self.mirror), str(dest)))}
        try:
            times["analysis"] = _timed(lambda: _git("ls-files", "-z", "--cached", "--others", "--exclude-standard",
                                                    cwd=dest))
            _git("checkout", "-q", "-b", branch, cwd=dest)
            (dest / TARGET_FILE).write_text(target_text("after"))
            identity = ("-c", f"user.name={_AUTHOR[0]}", "-c", f"user.email={_AUTHOR[1]}")
            times["commit"] = _timed(lambda: (_git("add", "-A", cwd=dest),
                                              _git(*identity, "commit", "-q", "-m", "raw change", cwd=dest)))
            times["push"] = _timed(lambda: _git("push", "-q", "--no-verify", self.url,
                                                f"HEAD:refs/heads/{branch}", cwd=dest))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return times, branch


# -- raw NATS ----------------------------------------------------------------------------------
RAW_STREAM = "RAWTASK"


class RawNats:
    """Raw nats-py on the bench's server: a publish round trip, publish -> stored (a
    client timestamp in the body, read back against the store timestamp, as the appends
    are measured) and publish -> delivery to an ordered push consumer."""

    def __init__(self, nc) -> None:
        self.nc, self.js = nc, nc.jetstream(timeout=30)
        self.rtt: list[float] = []
        self.stored: list[float] = []
        self.hop: list[float] = []
        self._round = 0

    async def setup(self) -> None:
        await self.js.add_stream(api.StreamConfig(
            name=RAW_STREAM, subjects=["rawtask.>"], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, num_replicas=1))

    async def round(self, samples: int = NATS_SAMPLES) -> None:
        self._round += 1
        r = self._round
        payload = b"x" * 200
        for i in range(samples):
            stamp = time.time_ns()
            t = time.perf_counter_ns()
            await self.js.publish(f"rawtask.rtt.{r}.{i}", stamp.to_bytes(8, "big") + payload)
            self.rtt.append((time.perf_counter_ns() - t) / 1e9)
        for _, ts, data in await stored_messages(self.js, RAW_STREAM, [f"rawtask.rtt.{r}.*"]):
            self.stored.append((ts - int.from_bytes(data[:8], "big")) / 1e9)
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future] = []

        async def cb(msg) -> None:
            if waiting:
                waiting.pop().set_result(time.perf_counter_ns())

        sub = await self.js.subscribe(f"rawtask.hop.{r}.>", stream=RAW_STREAM, cb=cb, ordered_consumer=True,
                                      deliver_policy=api.DeliverPolicy.NEW)
        try:
            for i in range(samples // 2):
                fut = loop.create_future()
                waiting.append(fut)
                t = time.perf_counter_ns()
                await self.nc.publish(f"rawtask.hop.{r}.{i}", payload)
                self.hop.append((await asyncio.wait_for(fut, 10) - t) / 1e9)
        finally:
            await sub.unsubscribe()

    def floors(self) -> dict[str, float]:
        return {"append": median(self.stored), "rtt": median(self.rtt), "hop": median(self.hop)}

    def summary(self) -> dict[str, float]:
        out = {}
        for name, values in (("rtt", self.rtt), ("stored", self.stored), ("hop", self.hop)):
            out[f"{name}_p50_ms"] = round(pct(values, 50) * 1e3, 3)
            out[f"{name}_p99_ms"] = round(pct(values, 99) * 1e3, 3)
        return out


async def read_stamps(js, ns: Namespace, agent_id: str) -> dict[str, dict[str, tuple[int, int]]]:
    """task id -> stage -> (store ns, ``at`` ns): the issue stored, and every report the
    agent appended about the task (the first of each kind)."""
    stamps: dict[str, dict[str, tuple[int, int]]] = {}
    cut = len(ns.prefix) + 1
    for subject, ts, data in await stored_messages(js, ns.issues_stream, [f"{ns.prefix}.issue.*.*.*.opened"]):
        try:
            issue = decode_issue(subject[cut:], data)
        except BadEventError:
            continue
        if isinstance(issue, IssueOpened):
            stamps.setdefault(task_id_for(issue.repo, issue.number), {}).setdefault("issue.opened", (ts, 0))
    for subject, ts, data in await stored_messages(js, ns.events_stream, [ns.agent_filter(agent_id)]):
        event = decode_event(subject[cut:], data)
        tid = getattr(event, "task_id", None)
        if tid is not None and isinstance(event, AgentEventBase):
            stage = event.__struct_config__.tag.removeprefix("agent.")
            stamps.setdefault(tid, {}).setdefault(stage, (ts, to_ns(event.occurred_at)))
    return stamps


# -- one run ------------------------------------------------------------------------------------
def issue(repo: str, number: int) -> IssueOpened:
    return IssueOpened(
        event_id=f"bench-task:{repo}#{number}", repo=repo, number=number, occurred_at=datetime.now(UTC),
        # (no file named: issues naming the same file wait for each other's pull request)
        title=f"Change the value ({number})", body="The value should be 'after'.",
        labels=("backend",), author="bench", author_association=OPERATOR)


class _Watch:
    """The agent's reports as they are stored: a task is done when the agent releases it."""

    def __init__(self) -> None:
        self.released: dict[str, asyncio.Future] = {}
        self.reports: dict[str, dict[str, AgentEventBase]] = {}

    def expect(self, tid: str) -> asyncio.Future:
        fut = self.released[tid] = asyncio.get_running_loop().create_future()
        return fut

    def handler(self, ns: Namespace):
        cut = len(ns.prefix) + 1

        async def on_report(msg) -> None:
            try:
                event = decode_event(msg.subject[cut:], msg.data)
            except BadEventError:
                return
            tid = getattr(event, "task_id", None)
            if tid is None:
                return
            tag = event.__struct_config__.tag.removeprefix("agent.")
            self.reports.setdefault(tid, {})[tag] = event
            fut = self.released.get(tid)
            if tag == "task_released" and fut is not None and not fut.done():
                fut.set_result(event)
        return on_report


async def _run_repo(*, name: str, repo: str, files: int, commits: int, tasks: int, root: Path, forge: LocalForge,
                    client: LocalForgeClient, agent, coder: TimedCoder, watch: _Watch, js, raw_nats: RawNats,
                    ns: Namespace, progress: Callable[[str], None]) -> RepoRun:
    bare = forge.repo_path(repo)
    raw = RawGit(root / f"raw-{name}", bare, forge.clone_url(repo))
    floors: dict[str, list[float]] = {}
    refills: dict[str, float] = {}
    for n in range(1, tasks + 1):
        await asyncio.to_thread(advance, bare, n, files)  # the forge moves: every task has something to fetch
        await asyncio.to_thread(os.sync)  # no earlier writes' writeback in the task's time
        tid = task_id_for(repo, n)
        done = watch.expect(tid)
        e = issue(repo, n)
        await js.publish(ns.subject(e.rel_subject), encode(e), headers={"Nats-Msg-Id": e.event_id})
        try:
            released = await asyncio.wait_for(done, TASK_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"{tid} was not released within {TASK_TIMEOUT:g} s; its reports: "
                               f"{sorted(watch.reports.get(tid, {}))}") from None
        if released.outcome != "done":
            failed = watch.reports.get(tid, {}).get("work_failed")
            raise RuntimeError(f"{tid} ended {released.outcome}: {getattr(failed, 'reason', '?')}")
        progress(f"{name}: task {n}/{tasks} done")
        # off the task's path: the warm checkout's refill, then the raw floors
        t = time.perf_counter()
        await asyncio.to_thread(agent.workbench.settle)
        refills[tid] = time.perf_counter() - t
        await asyncio.to_thread(os.sync)
        git_times, branch = await asyncio.to_thread(raw.round, n)
        t = time.perf_counter()
        await client.open_pull_request(repo=repo, branch=branch, base="main", title="raw", body="raw",
                                       draft=False, issue_number=10_000 + n)
        git_times["pull request"] = time.perf_counter() - t
        for k, v in git_times.items():
            floors.setdefault(k, []).append(v)
        await raw_nats.round()
    stamps = await read_stamps(js, ns, AGENT)
    times = []
    for n in range(1, tasks + 1):
        tid = task_id_for(repo, n)
        phases, appends, total = task_times(stamps.get(tid, {}), coder=coder.seconds.get(tid, 0.0))
        reports = watch.reports.get(tid, {})
        pr, tests = reports.get("pr_opened"), reports.get("tests_run")
        times.append(TaskTimes(
            number=n, task_id=tid, warm=n > 1, phases={k: round(v, 6) for k, v in phases.items()},
            appends={k: round(v, 6) for k, v in appends.items()}, total=round(total, 6),
            overhead=round(overhead(phases, total), 6), test_command=getattr(tests, "duration", 0.0),
            refill=round(refills.get(tid, 0.0), 3),
            pr_url=getattr(pr, "pr_url", ""), branch=getattr(pr, "branch", "")))
    branches = set(await asyncio.to_thread(forge.branches, repo))
    prs = sum(1 for t in times if t.pr_url and t.branch in branches)
    nats = raw_nats.floors()
    medians = {k: median(v) for k, v in floors.items()}
    medians.update(append=nats["append"], rtt=nats["rtt"], hop=nats["hop"],
                   dispatch=dispatch_floor(nats["rtt"], nats["hop"]))
    warm = [t for t in times if t.warm] or times
    return RepoRun(name=name, repo=repo, files=files, commits=commits, generate_seconds=0.0, tasks=times,
                   floors={k: round(v, 6) for k, v in medians.items()}, rows=rows_of(times, medians),
                   overhead_warm=round(median([t.overhead for t in warm]), 6),
                   overhead_first=round(times[0].overhead, 6), floor_total=round(floor_total(medians), 6),
                   prs_on_forge=prs)


async def run_task_bench(*, files: int, commits: int, tasks: int, small_files: int = SMALL["files"],
                         small_commits: int = SMALL["commits"], work_dir: Path | str | None = None,
                         sync_interval: str = "always", security: str = "off",
                         progress: Callable[[str], None] = lambda s: None) -> TaskBench:
    if security not in ("off", "on"):
        raise ValueError(f"security must be off or on, not {security!r}")
    if tasks < 2:
        raise ValueError("--tasks must be at least 2: the first task is cold, the others warm")
    for n, c in ((files, commits), (small_files, small_commits)):
        if n < 3 or c < 1:
            raise ValueError("a repository needs at least 3 files and 1 commit")
    load_before, stall_before, wall_before = loadavg(), cpu_stall_seconds(), time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ccc-bench-task-", dir=work_dir))
    bus = BenchBus(root / "bus", security, sync_interval)
    bus.register(NS, [AGENT])  # (with security on: the namespace's users and the agent's, before the start)
    forge = LocalForge(root / "forge")
    sizes = [("small", "bench/small", small_files, small_commits), ("large", "bench/large", files, commits)]
    generated: dict[str, float] = {}
    runs: list[RepoRun] = []
    try:
        for name, repo, n_files, n_commits in sizes:
            progress(f"generating the {name} repository ({n_files:,} files, {n_commits:,} commits)")
            bare = forge.repo_path(repo)
            bare.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            generate_repo(bare, files=n_files, commits=n_commits)
            add_files(bare, bench_files(tasks), "bench: test command, scripted fixes")
            generated[name] = time.perf_counter() - t
        bus.start()
        admin = await bus.connect("admin", name="ccc-bench-task")
        coordinator = agent = None
        connections = [admin]
        try:
            await provision(admin, NS)
            await provision_agent(admin, NS, AGENT)
            client = LocalForgeClient(forge.root)
            raw_nats = RawNats(admin)
            await raw_nats.setup()
            # composed as `ccc up` composes them (infra.shell.app.cluster), in one process
            # each part as its own role's user, as `ccc up` connects them (plain with security off)
            coordinator_nc = await bus.connect("coordinator", NS, name="ccc-bench-task-coordinator")
            connections.append(coordinator_nc)
            coordinator = build_coordinator(coordinator_nc, NS, CoordinatorConfig(), forge=client,
                                            cache_dir=root / "branches")
            await coordinator.start()
            agent_nc = await bus.connect("agent", NS, AGENT, name=f"ccc-{AGENT}")
            connections.append(agent_nc)
            coder = TimedCoder(ScriptedCoder(None))
            agent = build_agent(agent_nc, NS, agent_id=AGENT, specialties=("backend", "general"), coder=coder,
                                forge=client, workspace_root=root / "workspaces", test_timeout=120.0)
            await agent.start()
            watch = _Watch()
            await admin.subscribe(NS.agent_filter(AGENT), cb=watch.handler(NS))
            await admin.flush()
            js = admin.jetstream(timeout=30)
            for name, repo, n_files, n_commits in sizes:
                run = await _run_repo(name=name, repo=repo, files=n_files, commits=n_commits, tasks=tasks,
                                      root=root, forge=forge, client=client, agent=agent, coder=coder,
                                      watch=watch, js=js, raw_nats=raw_nats, ns=NS, progress=progress)
                run.generate_seconds = round(generated[name], 2)
                runs.append(run)
            sandbox = agent.workbench.sandbox_name
        finally:
            for actor in (agent, coordinator):
                if actor is not None:
                    try:
                        await actor.stop()
                    except Exception as e:  # noqa: BLE001 - the bench's result matters more than a clean stop
                        log.warning("bench_task.stop_failed", actor=type(actor).__name__, error=str(e))
            for nc in connections:
                await nc.close()
    finally:
        bus.stop()
        shutil.rmtree(root, ignore_errors=True)
    large = runs[-1]
    stall_after, wall = cpu_stall_seconds(), time.perf_counter() - wall_before
    pressure = round((stall_after - stall_before) / wall, 3) if stall_before is not None and stall_after is not None \
        else -1.0
    return TaskBench(repos=runs, tasks_per_repo=tasks, target_s=TARGET_S, overhead_warm_large=large.overhead_warm,
                     ok=large.overhead_warm <= TARGET_S, nats=raw_nats.summary(), sandbox=sandbox,
                     security=security, cpus=os.cpu_count() or 1, loadavg=[load_before, loadavg()],
                     cpu_pressure=pressure)


# -- showing it ---------------------------------------------------------------------------------
def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def table_rows(run: RepoRun) -> list[tuple[str, ...]]:
    """phase, warm median, first task, raw floor, ratio, what it is."""
    out = []
    for r in run.rows:
        name = f"{r.name} (excluded)" if r.kind == "excluded" else r.name
        floor = f"{_s(r.floor)} ({r.floor_what})" if r.floor else "-"
        out.append((name, _s(r.warm), _s(r.first), floor, f"{r.ratio:.2f}x" if r.floor else "-", r.what))
    return out


def verdict_rows(result: TaskBench) -> list[tuple[str, ...]]:
    rows = []
    for run in result.repos:
        judged = run is result.repos[-1]
        rows.append((f"overhead per task, {run.name} repository, warm (median)", _s(run.overhead_warm),
                     f"<= {result.target_s:g} s" if judged else "-",
                     ("ok" if run.overhead_warm <= result.target_s else "MISSED") if judged else "-"))
        rows.append((f"overhead per task, {run.name} repository, first task", _s(run.overhead_first), "-", "-"))
    return rows


def footer(result: TaskBench, run: RepoRun) -> list[str]:
    n = result.nats
    tests = median([t.test_command for t in run.tasks if t.warm] or [t.test_command for t in run.tasks])
    return [
        (f"{run.files:,} files, {run.commits:,} commits (generated in {run.generate_seconds:.1f} s); "
         f"{len(run.tasks)} tasks one after another, the first cold, medians of the {len(run.tasks) - 1} warm; "
         f"{run.prs_on_forge}/{len(run.tasks)} pull requests on the forge"),
        (f"the tests' own command ({TEST_COMMAND!r} in the {result.sandbox} sandbox): {_s(tests)} of the "
         f"testing phase; after each task the background chores (the warm checkout's refill, the trash) "
         f"still ran for {_s(median([t.refill for t in run.tasks]))} (median, off the task's path)"),
        (f"raw NATS (same server, same run): round trip p50 {n['rtt_p50_ms']:.3f} ms, publish -> stored p50 "
         f"{n['stored_p50_ms']:.3f} ms, publish -> delivery p50 {n['hop_p50_ms']:.3f} ms; security "
         f"{result.security}"),
        (f"{result.cpus} cpus, load {result.loadavg[0]:.2f} -> {result.loadavg[1]:.2f}"
         + (f", CPU pressure {result.cpu_pressure:.0%} (some runnable task waiting for a core)"
            if result.cpu_pressure >= 0 else "")),
    ]
