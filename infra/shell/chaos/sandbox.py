"""The sandbox of one ``ccc chaos`` run: the sample repository, the recorded scripts,
the actor processes and the issues it publishes (:class:`Sandbox`), and the
:class:`Tracker` that follows the run's progress from the event log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client

from events.aio import cancel_and_wait, within
from events.codec import encode
from events.store import EventStore
from events.subjects import Namespace, repo_token, task_id_for
from projections.read_model import ReadModel

from infra.adapters.forge.local import LocalForge
from infra.adapters.nats.issue_publisher import new_issue
from infra.adapters.nats.cluster import wait_for_jetstream
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import provision
from infra.adapters.nats.server import EmbeddedServer
from infra.shell.chaos.checks import PR_UP
from infra.shell.chaos.model import ChaosOptions
from infra.shell.chaos.processes import CCC, READY, Proc, clean_env, processes_under
from infra.shell.chaos.security import ChaosSecurity

REPO = "chaos/calc"
CALC = "def add(a, b):\n    return a - b\n"
TEST = ("import unittest\n\nfrom calc import add\n\n\n"
        "class AddTest(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
REPO_FILES = {"calc.py": CALC, "tests/__init__.py": "", "tests/test_calc.py": TEST,
              ".ccc/test-command": "python3 -m unittest discover -s tests\n"}
FIX = {"edit": {"path": "calc.py", "old": "return a - b", "new": "return a + b"}}

# The CI-loop variant (scenario ``ci-loop``): a green base whose CI runs one more test
# than the agents' own test run does. Each issue's first push adds a module that still
# holds a FIXME: the agent's tests pass (the CI-only test is skipped without CI=true),
# the forge's CI fails naming the module (so the failure is the change's), and the
# recorded CI fix removes the FIXME. The CI-only test takes CI_SECONDS, so a CI run
# lasts long enough for a fault to land in the middle of it.
CI_REPO = "chaos/ci"
CI_SECONDS = 1.5
CI_ONLY_TEST = (
    '"""Runs only in CI (CI=true): no module under features/ may still hold a FIXME."""\n\n'
    "import os\nimport pathlib\nimport time\nimport unittest\n\n\n"
    '@unittest.skipUnless(os.environ.get("CI") == "true", "runs in CI only")\n'
    "class NoFixmeLeftTest(unittest.TestCase):\n"
    "    def test_no_fixme_left(self):\n"
    f"        time.sleep({CI_SECONDS})  # a CI run takes a while\n"
    '        for path in sorted(pathlib.Path("features").glob("*.py")):\n'
    '            if "FIXME" in path.read_text():\n'
    '                self.fail(f"{path} still holds a FIXME")\n')
CI_REPO_FILES = {"calc.py": "def add(a, b):\n    return a + b\n", "features/__init__.py": "",
                 "tests/__init__.py": "", "tests/test_calc.py": TEST, "tests/test_ci_only.py": CI_ONLY_TEST,
                 ".ccc/test-command": "python3 -m unittest discover -s tests\n"}
CI_FIXME = "    # FIXME: tidy up before merging\n"


def ci_feature(number: int) -> tuple[str, str]:
    """The module issue ``number`` of the CI-loop variant adds, and its first content."""
    return f"features/f{number}.py", f"def feature_{number}():\n{CI_FIXME}    return {number}\n"


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
        # the run's credentials (None: --insecure); the server's data dir is <root>/nats
        self.security = None if options.insecure else ChaosSecurity(self.server_dir, ns)

    @property
    def server_dir(self) -> Path:
        """The data dir of the run's nats-server (or the root of its 3-node cluster)."""
        return self.root / "nats"

    async def connect(self, url: str, name: str = "ccc-chaos") -> Client:
        """The harness's own connection: admin on a secure run."""
        if self.security is not None:
            return await self.security.connect_admin(url, name)
        return await connect(url, name=name, quiet=True)

    def embedded_server(self) -> EmbeddedServer:
        """The run's one nats-server (fsync on every write): secure unless ``--insecure``."""
        sec = self.security
        secure, js_key = (sec.secure, sec.js_key) if sec is not None else (None, "")
        return EmbeddedServer(self.server_dir, sync_interval="always", name="chaos", secure=secure, js_key=js_key)

    async def open_bus(self, url: str, *, replicas: int = 1, cluster: bool = False) -> tuple[Client, list[str]]:
        """The harness's connection to the run's server, strangers checked (secure runs:
        what the server let in that it should not have), the namespace provisioned."""
        nc = await self.connect(url)
        try:
            if cluster:
                await wait_for_jetstream(nc)
            refused = await self.security.strangers_refused(url) if self.security is not None else []
            await provision(nc, self.ns, replicas=replicas)
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        return nc, refused

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

    def coordinator(self, name: str, url: str, *extra: str) -> Proc:
        """``ccc up --agents 0 --no-api`` (plus ``extra`` arguments of ``ccc up``)."""
        data = self.root / name
        data.mkdir(exist_ok=True)
        if self.security is not None:  # admin to provision, the coordinator's own user to run
            self.security.share_with(data)
        return self.add(name, self._ccc(
            url, data, "up", "--agents", "0", "--no-api", "--heartbeat-timeout", str(self.options.heartbeat_timeout),
            "--retry-base", "0.2", "--max-attempts", "10", "--shutdown-grace", "1",
            "--forge-root", str(self.forge_root), *extra))

    def autoscaling_coordinator(self, name: str, url: str, *, bounds: tuple[int, int], specialty: str,
                                cooldown_up: float, cooldown_down: float) -> Proc:
        """A coordinator whose ``ccc up`` also runs the autoscaler (``--autoscale MIN:MAX``)
        and so the agents it starts, in that process: they get what the sandbox's agent
        processes get (the recorded sessions, this forge, the agents' capacity)."""
        return self.coordinator(
            name, url, "--autoscale", f"{bounds[0]}:{bounds[1]}", "--specialties", specialty,
            "--capacity", str(self.options.capacity), "--script-dir", str(self.scripts),
            "--autoscale-cooldown-up", str(cooldown_up), "--autoscale-cooldown-down", str(cooldown_down))

    def agent(self, agent_id: str, url: str, *, capacity: int | None = None, grace: float = 0.5) -> Proc:
        data = self.root / agent_id
        data.mkdir(exist_ok=True)
        # its own kit (registered by the run before it starts: ChaosSecurity.register_agent)
        creds = self.security.creds_args("agent", agent_id) if self.security is not None else []
        return self.add(agent_id, self._ccc(
            url, data, *creds, "agent", "--specialty", "backend", "--agent-id", agent_id,
            "--capacity", str(capacity or self.options.capacity), "--script-dir", str(self.scripts),
            "--forge-root", str(self.forge_root), "--workspace-root", str(self.workspaces),
            "--heartbeat-interval", "0.3", "--shutdown-grace", str(grace)))

    async def start(self, *names: str, timeout: float = 60.0) -> dict[str, float]:
        """Start processes (all at once) and wait until each says it is ready."""
        for n in names:
            self.procs[n].start()
        ready = await asyncio.gather(*(self.procs[n].wait_for_output(READY[self._kind(n)], timeout)
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

    def denials(self, *names: str) -> list[str]:
        """What the server refused the actor processes (``names``; default: all), from
        their logs: a ``nats.error`` line naming a permissions or authorization
        violation. On a secure run each process has only its role's rights, and a right
        a role lacks may show only here (a refused publish is an error callback, the
        actor may carry on without it), so every denial is a violation of the run."""
        out = []
        for name in names or tuple(self.procs):
            try:
                text = self.procs[name].err_path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                low = line.lower()
                if "permissions violation" in low or "authorization violation" in low:
                    out.append(f"security: {name} was refused: {line.strip()[:240]}")
                    if len(out) >= 20:
                        return out
        return out

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

    # -- issues of the CI-loop variant --
    def write_ci_script(self, number: int, work_seconds: float | None = None) -> None:
        """The recorded sessions of CI-loop issue ``number``: the implementation adds its
        module with a FIXME (the agent's tests pass, the forge's CI fails), the first CI
        fix removes the FIXME. Both sleep first, so an agent can be killed mid-round."""
        seconds = self.options.work_seconds if work_seconds is None else work_seconds
        steps = ([{"run": {"command": f"sleep {seconds:.2f}", "timeout": seconds + 60}}] if seconds > 0 else [])
        path, content = ci_feature(number)
        body = {"attempts": [{"steps": [*steps, {"write": {"path": path, "content": content}}],
                              "summary": f"add feature {number}"}],
                "ci_fixes": [{"steps": [*steps, {"edit": {"path": path, "old": CI_FIXME, "new": ""}}],
                              "summary": f"remove the FIXME CI found in {path}"}]}
        (self.scripts / f"{repo_token(CI_REPO)}-{number}.json").write_text(json.dumps(body))

    async def publish_ci_issues(self, nc: Client, numbers: list[int]) -> int:
        """Publish ``IssueOpened`` of the CI-loop variant for each number (all at once),
        its repository made on the forge first."""
        if not self.forge.exists(CI_REPO):
            self.forge.create_repo(CI_REPO, CI_REPO_FILES)
        js = nc.jetstream(timeout=10.0)
        events = []
        for number in numbers:
            self.write_ci_script(number)
            events.append(new_issue(repo=CI_REPO, title=f"Add feature {number} (chaos CI {number})",
                                    number=number, labels=("backend",), actor="chaos"))
            self.issues[task_id_for(CI_REPO, number)] = (CI_REPO, number)
        acks = await asyncio.gather(*(js.publish(self.ns.subject(e.rel_subject), encode(e),
                                                 headers={"Nats-Msg-Id": e.event_id}, stream=self.ns.issues_stream)
                                      for e in events))
        now = time.time()
        for e in events:
            self.published[e.event_id] = now
        return sum(1 for a in acks if not a.duplicate)


# -- following progress ------------------------------------------------------------------------
class Tracker:
    """A read model of the run, kept current by short catch-up reads (a fresh ordered
    consumer each time, so it rides out server restarts and leader elections)."""

    def __init__(self, nc: Client, ns: Namespace) -> None:
        self.store = EventStore(nc, ns, timeout=3.0)
        self.model = ReadModel(ns.prefix)
        self._task: asyncio.Task | None = None
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
        # a restarting server or an election fails a read (timeout, StoreUnavailable,
        # a client error): the next poll tries again
        with contextlib.suppress(Exception):
            await within(self.store.replay(self._apply, from_seq=self.model.last_seq + 1), 5.0)

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

    def all_in(self, task_ids, states=PR_UP) -> bool:
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
