"""``ccc chaos``: the fault suite. It proves, with figures, that nothing is lost and
nothing happens twice whatever fails.

Each scenario run builds a throwaway world under a temp dir: its own nats-server (or a
3-node JetStream cluster), a tiny sample repository on the local forge, recorded
sessions for the scripted coder, and the real actors as real processes
(``ccc up --agents 0 --no-api`` for a coordinator, ``ccc agent`` for each agent).
It publishes N issues at once, injects its fault at random moments while they are in
flight, waits (bounded) until every task is in review, stops everything and then
judges the run from the event log alone (:mod:`infra.chaos_checks`).

Recovery times are read from the log's own timestamps (the stream's append times),
measured from the harness's wall clock at the fault; the scenarios say from what to
what (:mod:`infra.chaos_scenarios`).

This module: options, the sandbox (repository, scripts, processes), progress
tracking, aggregation, the table and the ``ccc chaos`` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import click
import msgspec
import structlog
from nats.aio.client import Client

from events.codec import encode
from events.errors import StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace, task_id_for
from projections.read_model import ReadModel

from .aio import cancel_and_wait, within
from .chaos_checks import percentile
from .forge_local import LocalForge
from .issues import new_issue

log = structlog.get_logger("ccc.chaos")

REPO = "chaos/calc"
CALC = "def add(a, b):\n    return a - b\n"
TEST = ("import unittest\n\nfrom calc import add\n\n\n"
        "class AddTest(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
REPO_FILES = {"calc.py": CALC, "tests/__init__.py": "", "tests/test_calc.py": TEST,
              ".ccc/test-command": "python3 -m unittest discover -s tests\n"}
FIX = {"edit": {"path": "calc.py", "old": "return a - b", "new": "return a + b"}}

_CCC_SCRIPT = Path(sys.executable).parent / "ccc"
CCC = [str(_CCC_SCRIPT)] if _CCC_SCRIPT.is_file() else [sys.executable, "-m", "infra.cli"]


class ChaosOptions(msgspec.Struct, kw_only=True):
    quick: bool = False
    tasks: int | None = None  # issues per run (default: 12 quick, 40 full)
    runs: int | None = None  # runs per scenario (default: per scenario)
    seed: int | None = None
    keep: bool = False  # keep every sandbox (failed runs are always kept)
    work_dir: str | None = None
    agents: int = 3
    capacity: int = 2
    heartbeat_timeout: float = 2.0
    work_seconds: float = 2.5  # each recorded session sleeps this long: tasks stay in flight
    run_timeout: float | None = None

    @property
    def n_tasks(self) -> int:
        return self.tasks or (12 if self.quick else 40)

    @property
    def timeout(self) -> float:
        return self.run_timeout or (60.0 if self.quick else 240.0)

    # a run whose log has not grown for this long (after the faults) is stuck: longer
    # than a consumer's ack wait (30 s), after which an unacknowledged message comes back
    stall: float = 40.0


class RunResult(msgspec.Struct, kw_only=True):
    scenario: str
    run: int
    tasks: int
    lost: int
    duplicated: int
    other: int  # illegal histories, stale transitions, unmet scenario expectations
    recoveries: list[float] = []
    faults: int = 0
    seconds: float = 0.0
    final_states: dict[str, int] = {}
    notes: list[str] = []
    violations: list[str] = []
    sandbox: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.other == 0


class ScenarioResult(msgspec.Struct, kw_only=True):
    scenario: str
    runs: int
    tasks: int
    lost: int
    duplicated: int
    other: int
    faults: int
    recovery_p50: float | None
    recovery_max: float | None
    recovery_target: float | None
    recovery_what: str
    seconds: float
    ok: bool
    target_met: bool | None
    expected_failure: str = ""  # a known bug, reported loudly; see KNOWN_FAILURES
    notes: list[str] = []
    violations: list[str] = []
    sandboxes: list[str] = []


def summarise(name: str, runs: list[RunResult], target: float | None, what: str,
              expected_failure: str = "") -> ScenarioResult:
    rec = [r for run in runs for r in run.recoveries]
    p50, worst = percentile(rec, 0.5), (max(rec) if rec else None)
    lost = sum(r.lost for r in runs)
    dup = sum(r.duplicated for r in runs)
    other = sum(r.other for r in runs)
    return ScenarioResult(
        scenario=name, runs=len(runs), tasks=sum(r.tasks for r in runs), lost=lost, duplicated=dup,
        other=other, faults=sum(r.faults for r in runs),
        recovery_p50=None if p50 is None else round(p50, 3),
        recovery_max=None if worst is None else round(worst, 3), recovery_target=target,
        recovery_what=what, seconds=round(sum(r.seconds for r in runs), 1),
        ok=lost == 0 and dup == 0 and other == 0,
        target_met=None if target is None or worst is None else worst <= target,
        expected_failure=expected_failure,
        notes=[f"run {r.run}: {n}" for r in runs for n in r.notes],
        violations=[f"run {r.run}: {v}" for r in runs for v in r.violations][:100],
        sandboxes=[r.sandbox for r in runs if r.sandbox],
    )


# -- processes ---------------------------------------------------------------------------------
def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without anything that would point ``ccc`` elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCC_", "NATS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Proc:
    """One ``ccc`` process in its own session (so a crash can take its whole process
    group, as a host crash would). Output is appended to files across restarts."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0  # wall clock
        self._out_offset = 0
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        out = open(self.out_path, "ab")  # noqa: SIM115 - handed to the child
        err = open(self.err_path, "ab")  # noqa: SIM115
        self._out_offset = out.tell()
        try:
            self.started_at = time.time()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, cwd=str(self.out_path.parent))
        finally:
            out.close()
            err.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self._out_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def wait_for_output(self, text: str, timeout: float = 30.0) -> float:
        """Wait until this incarnation printed ``text``; returns the wall time seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return time.time()
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode if self.proc else '?'}: "
                                   f"{self.stderr_tail()}")
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{self.name} did not print {text!r} in {timeout}s: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int, group: bool = False) -> None:
        if not self.running:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.proc.pid, sig)  # session leader: pid == pgid
            else:
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process and its process group (the workspace commands run in
        sessions of their own and are reaped by the sandbox)."""
        self.signal(signal.SIGKILL, group=True)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
        return self.proc.returncode


def _ps() -> list[tuple[int, int, str]]:
    rows = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rows.append((int(d.name), ppid, args))
        except (OSError, IndexError, ValueError):
            continue
    return rows


def processes_under(root: Path) -> list[tuple[int, int, str]]:
    """Live processes whose command line or working directory is inside ``root``:
    everything a sandbox started, directly or not."""
    root_s = str(root.resolve())
    me = os.getpid()
    found = []
    for pid, ppid, args in _ps():
        if pid == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if root_s in args or cwd.startswith(root_s):
            found.append((pid, ppid, args))
    return found


# -- the sandbox -------------------------------------------------------------------------------
class Sandbox:
    """One run's world: a directory with the forge, the scripts, one data dir per
    process and their logs. Closing it stops every process it started and kills, by
    pid, anything still running under its directory."""

    def __init__(self, root: Path, ns: Namespace, options: ChaosOptions, rng: random.Random) -> None:
        self.root = root
        self.ns = ns
        self.options = options
        self.rng = rng
        self.procs: dict[str, Proc] = {}
        self.forge_root = root / "forge"
        self.scripts = root / "scripts"
        self.workspaces = root / "workspaces"
        self.logs = root / "logs"
        for d in (self.scripts, self.workspaces, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.forge = LocalForge(self.forge_root)
        self.forge.create_repo(REPO, REPO_FILES)
        self.issues: dict[str, tuple[str, int]] = {}
        self.published: dict[str, float] = {}  # issue event id -> when it was published
        self.env: dict[str, str] = {}

    def write_script(self, number: int, work_seconds: float | None = None) -> None:
        seconds = self.options.work_seconds if work_seconds is None else work_seconds
        steps = ([{"run": {"command": f"sleep {seconds:.2f}", "timeout": seconds + 60}}] if seconds > 0 else [])
        body = {"attempts": [{"steps": [*steps, FIX], "summary": "fix add"}]}
        token = task_id_for(REPO, number).rsplit("-", 1)[0]
        (self.scripts / f"{token}-{number}.json").write_text(json.dumps(body))

    # -- actor processes --
    def _ccc(self, url: str, data_dir: Path, *args: str) -> list[str]:
        return [*CCC, "--nats-url", url, "--namespace", self.ns.prefix, "--data-dir", str(data_dir),
                "--log-level", "info", *args]

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.logs, clean_env({**self.env, **(env or {})}))
        self.procs[name] = proc
        return proc

    def coordinator(self, name: str, url: str) -> Proc:
        data = self.root / name
        data.mkdir(exist_ok=True)
        return self.add(name, self._ccc(
            url, data, "up", "--agents", "0", "--no-api", "--heartbeat-timeout", str(self.options.heartbeat_timeout),
            "--retry-base", "0.2", "--max-attempts", "10", "--shutdown-grace", "1"))

    def agent(self, agent_id: str, url: str, *, capacity: int | None = None, grace: float = 0.5) -> Proc:
        data = self.root / agent_id
        data.mkdir(exist_ok=True)
        return self.add(agent_id, self._ccc(
            url, data, "agent", "--specialty", "backend", "--agent-id", agent_id,
            "--capacity", str(capacity or self.options.capacity), "--script-dir", str(self.scripts),
            "--forge-root", str(self.forge_root), "--workspace-root", str(self.workspaces),
            "--heartbeat-interval", "0.3", "--shutdown-grace", str(grace)))

    async def start(self, *names: str, timeout: float = 60.0) -> dict[str, float]:
        """Start processes (all at once) and wait until each says it is ready."""
        for n in names:
            self.procs[n].start()
        ready = await asyncio.gather(*(self.procs[n].wait_for_output(_READY[self._kind(n)], timeout)
                                       for n in names))
        return dict(zip(names, ready))

    def _kind(self, name: str) -> str:
        return "agent" if "agent" in self.procs[name].argv[len(CCC):] else "up"

    async def close(self, *, keep_servers: bool = False) -> list[str]:
        """Stop every actor process (SIGTERM, then SIGKILL) and kill, by pid, whatever
        else still runs under the sandbox (workspace commands of killed agents; with
        ``keep_servers`` the nats-servers are left to the scenario, which still needs
        them to read the log). Returns notes about unexpected exit codes."""
        notes = []
        codes = await asyncio.gather(*(p.stop() for p in self.procs.values()))
        for p, code in zip(self.procs.values(), codes):
            if code not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                notes.append(f"{p.name} exited with {code}: {p.stderr_tail(2)}")
        for pid, _, args in processes_under(self.root):
            if keep_servers and "nats-server" in args:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return notes

    # -- issues --
    async def publish_issues(self, nc: Client, numbers: list[int], copies: int = 1) -> int:
        """Publish ``IssueOpened`` for each number (all at once); with ``copies`` > 1
        each issue is delivered that many times under distinct event and message ids,
        as a webhook redelivered with new delivery ids would be."""
        js = nc.jetstream(timeout=10.0)
        futures = []
        ids = []
        for number in numbers:
            self.write_script(number)
            event = new_issue(repo=REPO, title=f"Fix add (chaos {number})", number=number,
                              labels=("backend",), actor="chaos")
            self.issues[task_id_for(REPO, number)] = (REPO, number)
            for k in range(copies):
                e = event if k == 0 else msgspec.structs.replace(event, event_id=f"{event.event_id}:redelivery-{k}")
                ids.append(e.event_id)
                futures.append(js.publish(self.ns.subject(e.rel_subject), encode(e),
                                          headers={"Nats-Msg-Id": e.event_id}, stream=self.ns.issues_stream))
        acks = await asyncio.gather(*futures)
        now = time.time()
        for e_id in ids:
            self.published[e_id] = now
        return sum(1 for a in acks if not a.duplicate)


_READY = {"up": "claude-code-cluster is up", "agent": "registered; Ctrl-C"}


# -- following progress ------------------------------------------------------------------------
class Tracker:
    """A read model of the run, kept current by short catch-up reads (a fresh ordered
    consumer each time, so it rides out server restarts and leader elections)."""

    def __init__(self, nc: Client, ns: Namespace) -> None:
        self.store = EventStore(nc, ns, timeout=3.0)
        self.model = ReadModel(ns.prefix)
        self._task: asyncio.Task | None = None
        self.errors = 0
        self.seen: dict[int, str | None] = {}  # seq -> event id of everything read
        self.last_change = time.monotonic()

    def _apply(self, seq: int, item) -> None:
        self.seen[seq] = getattr(item, "event_id", None)
        self.model.apply(seq, item)
        self.last_change = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the log last grew (as this tracker saw it)."""
        return time.monotonic() - self.last_change

    async def poll(self) -> None:
        try:
            await within(self.store.replay(self._apply, from_seq=self.model.last_seq + 1), 5.0)
        except (TimeoutError, StoreUnavailable, Exception):  # noqa: BLE001 - try again later
            self.errors += 1

    async def _loop(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="chaos-tracker")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    def statuses(self, task_ids) -> dict[str, str]:
        return {t: (s.status if (s := self.model.tasks.get(t)) else "absent") for t in task_ids}

    def all_in(self, task_ids, states=("review", "completed")) -> bool:
        return all((s := self.model.tasks.get(t)) is not None and s.status in states for t in task_ids)

    async def wait(self, cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            await asyncio.sleep(interval)
        return cond()

    def in_flight(self) -> list[tuple[str, str, str]]:
        """(task, agent, status) of tasks an agent is working on."""
        return [(t, s.agent_id or "", s.status) for t, s in self.model.tasks.items()
                if s.status in ("in_progress", "testing") and s.agent_id]


# -- running scenarios -------------------------------------------------------------------------
def new_namespace() -> Namespace:
    # no "_": see the dead-letter subject note in the report
    return Namespace("chaos" + uuid.uuid4().hex[:8])


async def run_chaos(names: list[str], options: ChaosOptions,
                    progress: Callable[[str], None] | None = None) -> list[ScenarioResult]:
    from .chaos_scenarios import SCENARIOS

    rng = random.Random(options.seed)
    base = Path(options.work_dir) if options.work_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        spec = SCENARIOS[name]
        runs: list[RunResult] = []
        n_runs = options.runs or (spec.quick_runs if options.quick else spec.full_runs)
        for i in range(1, n_runs + 1):
            root = Path(tempfile.mkdtemp(prefix=f"ccc-chaos-{name}-", dir=base))
            sandbox = Sandbox(root, new_namespace(), options, random.Random(rng.random()))
            started = time.monotonic()
            try:
                result = await spec.run(sandbox, i)
            except Exception as e:
                log.exception("chaos.run_crashed", scenario=name, run=i)
                result = RunResult(scenario=name, run=i, tasks=len(sandbox.issues), lost=len(sandbox.issues),
                                   duplicated=0, other=1,
                                   violations=[f"harness: the run crashed: {type(e).__name__}: {e}"])
            finally:
                with contextlib.suppress(Exception):
                    await sandbox.close()
            result.seconds = round(time.monotonic() - started, 1)
            if options.keep or not result.ok:
                result.sandbox = str(root)
            else:
                shutil.rmtree(root, ignore_errors=True)
            runs.append(result)
            if progress is not None:
                progress(f"{name} run {i}/{n_runs}: {result.tasks} tasks, lost {result.lost}, "
                         f"duplicated {result.duplicated}, other {result.other}, "
                         f"{result.seconds}s")
        results.append(summarise(name, runs, spec.target, spec.recovery, spec.expected_failure))
    return results


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


@click.command("chaos")
@click.option("--quick", is_flag=True, help="Fewer tasks and runs: a CI-sized pass (a few minutes).")
@click.option("--scenario", "scenarios", multiple=True, metavar="NAME",
              help="Run only this scenario (repeatable). Default: all.")
@click.option("--tasks", type=click.IntRange(1, 500), default=None, help="Issues per run [12 quick, 40 full].")
@click.option("--runs", type=click.IntRange(1, 50), default=None, help="Runs per scenario [per scenario].")
@click.option("--seed", type=int, default=None, help="Random seed for the fault timing.")
@click.option("--keep", is_flag=True, help="Keep every run's sandbox (failed runs are always kept).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where sandboxes go [default: the temp dir].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scenario.")
def chaos_cmd(quick, scenarios, tasks, runs, seed, keep, work_dir, as_json) -> None:
    """The fault suite: crashes, restarts, duplicates, poison messages, a 3-node cluster.

    Starts its own throwaway NATS servers and actor processes, runs each scenario with
    many tasks in flight, checks the invariants from the event log and prints one row
    per scenario. Exits 1 if anything was lost, duplicated or corrupted."""
    from .chaos_scenarios import SCENARIOS
    from .cli import run_async
    from .cli_read import emit_json, print_table

    names = list(scenarios) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
                                 param_hint="--scenario")
    options = ChaosOptions(quick=quick, tasks=tasks, runs=runs, seed=seed, keep=keep, work_dir=work_dir)
    results = run_async(run_chaos(names, options, progress=lambda line: click.echo(f"chaos: {line}", err=True)))
    assert isinstance(results, list)
    if as_json:
        for r in results:
            emit_json(r)
    else:
        rows = []
        for r in results:
            target = "-" if r.recovery_target is None else f"<= {r.recovery_target:g}s"
            verdict = "ok" if r.ok else ("FAIL (known bug)" if r.expected_failure else "FAIL")
            if r.ok and r.target_met is False:
                verdict = "ok, SLOW"
            rows.append((r.scenario, r.runs, r.tasks, r.lost, r.duplicated, r.other, r.faults,
                         _fmt(r.recovery_p50), _fmt(r.recovery_max), target, verdict))
        footer = [f"recovery: {r.scenario}: {r.recovery_what}" for r in results if r.recovery_what]
        for r in results:
            if r.expected_failure:
                footer.append(f"KNOWN BUG ({r.scenario}): {r.expected_failure}")
            for v in r.violations[:10]:
                footer.append(f"{r.scenario}: {v}")
            for n in r.notes[:10]:
                footer.append(f"{r.scenario}: {n}")
            for s in r.sandboxes:
                footer.append(f"{r.scenario}: kept {s}")
        print_table(("SCENARIO", "RUNS", "TASKS", "LOST", "DUPLICATED", "OTHER", "FAULTS",
                     "RECOVERY P50", "RECOVERY MAX", "TARGET", "RESULT"), rows, footer=footer)
    if not all(r.ok for r in results):
        sys.exit(1)
