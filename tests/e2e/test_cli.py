"""End-to-end through the ``ccc`` command line, against the session's real nats-server.

Commands run their own event loop (``asyncio.run``), so in-process invocations go
through click's CliRunner on a worker thread; ``server``, ``--follow`` and ``api``
run as real subprocesses and are always stopped."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from events import agent_state as ag
from events import task_state as ts
from events.checks import CheckRun
from events.codec import encode
from events.task import Analysis, IssueRef, TaskStarted
from infra.shell.cli.main import cli
from tests.support.session import nats_args

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- helpers --------------------------------------------------------------------------
def invoke(args: list[str], env: dict | None = None, input: str | None = None):
    return CliRunner().invoke(cli, args, env=env, input=input)


async def ccc(nats_url, ns, *args, env=None, input=None):
    """Run ``ccc --nats-url .. --namespace .. <args>`` in-process (on a thread)."""
    args = [*nats_args(nats_url), "--namespace", ns.prefix, *args]
    return await asyncio.to_thread(invoke, args, env, input)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def assert_one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and text in result.stderr
    assert result.stdout == ""


async def _task(store, task_id: str, commands) -> ts.TaskState:
    state, last = await store.load_task(task_id)
    for cmd in commands:
        events = ts.decide(state, cmd)
        seqs = await store.append(events, expected_last_seq=last)
        state, last = ts.fold(events, state), seqs[-1]
    return state


async def _agent(store, agent_id: str, commands) -> ag.AgentState:
    state, last = await store.load_agent(agent_id)
    for cmd in commands:
        events = ag.decide(state, cmd)
        seqs = await store.append(events, expected_last_seq=last)
        state, last = ag.fold(events, state), seqs[-1]
    return state


def _create(task_id: str, n: int, title: str) -> ts.CreateTask:
    return ts.CreateTask(at=T0, actor="coordinator", task_id=task_id,
                         issue=IssueRef(source="local", repo="acme/web", number=n, title=title))


async def seed(store) -> dict:
    """A small real log: one task in progress with its agent, one pending task."""
    at = T0 + timedelta(minutes=1)
    await _task(store, "acme_web-1", [_create("acme_web-1", 1, "Fix login bug")])
    await _agent(store, "agent-1", [ag.RegisterAgent(at=T0, actor="agent-1", agent_id="agent-1",
                                                     specialties=("backend", "testing"), capacity=2)])
    await _task(store, "acme_web-1", [
        ts.StartAnalysis(at=at, actor="coordinator"),
        ts.RecordAnalysis(at=at, actor="coordinator",
                          analysis=Analysis(specialty="backend", priority="high")),
        ts.AssignTask(at=at, actor="coordinator", agent_id="agent-1"),
    ])
    assigned_seq = await store.last_seq()
    await _task(store, "acme_web-1", [ts.StartTask(at=at, actor="agent-1", agent_id="agent-1")])
    await _agent(store, "agent-1", [ag.StartAgentTask(at=at, actor="agent-1", task_id="acme_web-1")])
    await _task(store, "acme_web-2", [_create("acme_web-2", 2, "Add dark mode")])
    return {"assigned_seq": assigned_seq, "last_seq": await store.last_seq()}


async def add_bad(store) -> tuple[int, int]:
    """A garbage payload, and a well-formed event the state machine rejects."""
    js = store.js
    garbage = await js.publish(store.ns.subject("task.junk-1.created"), b"{not json")
    illegal = TaskStarted(event_id="acme_web-2:2", task_id="acme_web-2", version=2, occurred_at=T0,
                          correlation_id="acme_web-2", actor="agent-9", agent_id="agent-9")
    rejected = await js.publish(store.ns.subject(illegal.rel_subject), encode(illegal))
    return garbage.seq, rejected.seq


class Proc:
    """A ``ccc`` subprocess with its stdout lines on a queue; always stopped."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.shell.cli.main", *args], cwd=REPO_ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float = 20.0) -> str:
        return self.lines.get(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


# -- issue publish ------------------------------------------------------------------
async def test_issue_publish_allocates_and_prints_subject_and_seq(nats_url, ns):
    for n in (1, 2, 3):
        r = await ccc(nats_url, ns, "issue", "publish", "--repo", "acme/web", "--title", f"bug {n}")
        assert r.exit_code == 0, r.output
        assert f"opened local:acme/web#{n}: bug {n}" in r.stdout
        assert f"subject  {ns.prefix}.issue.local.acme_web.{n}.opened" in r.stdout
        assert f"seq      {n} ({ns.issues_stream})" in r.stdout
        assert f"task id  acme_web-{n}" in r.stdout
    r = await ccc(nats_url, ns, "issue", "publish", "--repo", "acme/web", "--title", "four",
                  "--label", "bug", "--label", "backend", "--json")
    assert r.exit_code == 0, r.output
    [obj] = json_lines(r.stdout)
    assert obj == {"subject": f"{ns.prefix}.issue.local.acme_web.4.opened", "stream": ns.issues_stream,
                   "seq": 4, "duplicate": False, "source": "local", "repo": "acme/web", "number": 4,
                   "event_id": "local:acme/web#4:opened", "task_id": "acme_web-4"}


async def test_issue_publish_same_number_is_duplicate(nats_url, ns):
    args = ("issue", "publish", "--repo", "solo", "--title", "t", "--number", "42", "--json")
    first = json_lines((await ccc(nats_url, ns, *args)).stdout)[0]
    r = await ccc(nats_url, ns, *args)
    again = json_lines(r.stdout)[0]
    assert r.exit_code == 0
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert again["seq"] == first["seq"] and again["task_id"] == "local_solo-42"
    human = await ccc(nats_url, ns, *args[:-1])
    assert human.exit_code == 0 and "duplicate: local:solo#42 was already published" in human.stdout


async def test_issue_body_from_stdin(nats_url, ns, nc):
    r = await ccc(nats_url, ns, "issue", "publish", "--repo", "a/b", "--title", "t", "--body", "-", "--json",
                  input="line one\nline two\n")
    assert r.exit_code == 0, r.output
    msg = await nc.jetstream().get_msg(ns.issues_stream, json_lines(r.stdout)[0]["seq"])
    assert json.loads(msg.data)["body"] == "line one\nline two\n"


# -- errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "env", "text"), [
    (["issue", "publish", "--repo", "a b", "--title", "t"], {}, "invalid repo 'a b'"),
    (["issue", "publish", "--repo", "a/b", "--title", "  "], {}, "non-empty title"),
    (["--nats-url", "foo://x", "tasks"], {}, "NATS_URL: 'foo://x'"),
    (["tasks"], {"NATS_URL": "foo://x"}, "NATS_URL: 'foo://x'"),
    (["tasks"], {"CCC_SYNC_INTERVAL": "bogus"}, "CCC_SYNC_INTERVAL"),
    (["--namespace", "Not-Valid", "events"], {}, "invalid namespace"),
    (["replay", "--task", "a", "--agent", "b"], {}, "not both"),
    (["events", "--task", "bad.id"], {}, "invalid task id"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, env, text):
    result = invoke(["--data-dir", str(tmp_path), *args], env={"NATS_URL": None, **env})
    assert_one_line_error(result, 2, text)


def test_unreachable_nats_is_one_line_exit_1(tmp_path):
    result = invoke(["--nats-url", "nats://127.0.0.1:1", "tasks"], env={})
    assert_one_line_error(result, 1, "cannot connect to NATS at nats://127.0.0.1:1")


def test_click_usage_error_exit_2(tmp_path):
    result = invoke(["--data-dir", str(tmp_path), "issue", "publish", "--repo", "a/b"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == "Error: Missing option '--title'."


def test_errors_through_main_have_no_traceback(tmp_path):
    env = {**os.environ, "CCC_DATA_DIR": str(tmp_path)}
    env.pop("NATS_URL", None)
    for args, code in ((["--nats-url", "foo://x", "tasks"], 2), (["issue", "publish", "--repo", "a/b"], 2),
                       (["--nats-url", "nats://127.0.0.1:1", "agents"], 1)):
        p = subprocess.run([sys.executable, "-m", "infra.shell.cli.main", *args], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == code, p.stderr
        assert "Traceback" not in p.stderr + p.stdout


# -- events ---------------------------------------------------------------------------
async def test_events_human_and_json(nats_url, ns, store):
    await seed(store)
    garbage_seq, rejected_seq = await add_bad(store)
    r = await ccc(nats_url, ns, "events")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "SUBJECT", "TYPE", "V", "DETAILS"]
    assert len(lines) == 1 + rejected_seq
    first = lines[1].split()
    assert first[:5] == ["1", "2026-03-01", "12:00:00", f"{ns.prefix}.task.acme_web-1.created",
                         "task.created"]
    assert "local:acme/web#1 'Fix login bug'" in lines[1]
    assigned = f"{ns.prefix}.task.acme_web-1.assigned.agent-1"
    assert any(assigned in ln and "agent_id=agent-1" in ln for ln in lines)
    bad = next(ln for ln in lines if ln.split()[0] == str(garbage_seq))
    assert f"{ns.prefix}.task.junk-1.created" in bad and "BAD" in bad
    assert "\x1b[" not in r.stdout  # no colour codes when not a terminal

    r = await ccc(nats_url, ns, "events", "--json")
    objs = json_lines(r.stdout)
    assert [o["seq"] for o in objs] == list(range(1, rejected_seq + 1))
    assert objs[0]["subject"] == f"{ns.prefix}.task.acme_web-1.created"
    assert objs[0]["event"]["type"] == "task.created" and objs[0]["event"]["issue"]["number"] == 1
    assert objs[garbage_seq - 1]["bad"] is True and objs[garbage_seq - 1]["error"]
    assert "event" not in objs[garbage_seq - 1]
    # the rejected event decodes fine: `events` shows it; `replay`/`tasks` reject it
    assert objs[rejected_seq - 1]["event"]["type"] == "task.started"


async def test_events_filters_and_from_seq(nats_url, ns, store):
    await seed(store)
    r = await ccc(nats_url, ns, "events", "--task", "acme_web-1", "--json")
    objs = json_lines(r.stdout)
    assert [o["event"]["type"] for o in objs] == [
        "task.created", "task.analysis_started", "task.analyzed", "task.assigned", "task.started"]
    r = await ccc(nats_url, ns, "events", "--agent", "agent-1", "--json")
    assert [o["event"]["type"] for o in json_lines(r.stdout)] == ["agent.registered", "agent.task_started"]
    r = await ccc(nats_url, ns, "events", "--from-seq", "7", "--json")
    assert [o["seq"] for o in json_lines(r.stdout)] == [7, 8]
    r = await ccc(nats_url, ns, "events", "--task", "nope", "--json")
    assert r.exit_code == 0 and r.stdout == ""


async def test_events_follow_until_interrupted(nats_url, ns, store, procs):
    await seed(store)
    p = Proc(*nats_args(nats_url), "--namespace", ns.prefix, "events", "--follow", "--json")
    procs.append(p)
    seen = [json.loads(await asyncio.to_thread(p.next_line)) for _ in range(8)]
    assert [o["seq"] for o in seen] == list(range(1, 9))
    await _task(store, "acme_web-3", [_create("acme_web-3", 3, "New one")])
    new = json.loads(await asyncio.to_thread(p.next_line))
    assert new["seq"] == 9 and new["event"]["task_id"] == "acme_web-3"
    code, err = await asyncio.to_thread(p.stop, signal.SIGINT)
    assert code == 0 and "Traceback" not in err


# -- replay ---------------------------------------------------------------------------
async def test_replay_task_shows_state_after_each_event(nats_url, ns, store):
    marks = await seed(store)
    r = await ccc(nats_url, ns, "replay", "--task", "acme_web-1")
    assert r.exit_code == 0, r.output
    states = [ln.split("-> ", 1)[1] for ln in r.stdout.splitlines() if "-> task" in ln]
    assert [s.split()[2] for s in states] == ["pending", "analyzing", "queued", "assigned", "in_progress"]
    for part in ("agent agent-1", "specialty backend", "priority high"):
        assert part in states[-1]
    assert r.stdout.splitlines()[-1] == (
        f"replayed 5 events up to seq {marks['assigned_seq'] + 1}: 5 applied, 0 rejected, 0 bad")

    r = await ccc(nats_url, ns, "replay", "--task", "acme_web-1", "--json")
    objs = json_lines(r.stdout)
    statuses = [o["state"]["status"] for o in objs]
    assert statuses == ["pending", "analyzing", "queued", "assigned", "in_progress"]
    assert [o["state"]["version"] for o in objs] == [1, 2, 3, 4, 5]
    assert objs[-1]["state"]["agent_id"] == "agent-1" and objs[-1]["event"]["type"] == "task.started"


async def test_replay_until_seq_is_time_travel(nats_url, ns, store):
    marks = await seed(store)
    until = str(marks["assigned_seq"])
    r = await ccc(nats_url, ns, "replay", "--task", "acme_web-1", "--until-seq", until, "--json")
    objs = json_lines(r.stdout)
    assert objs[-1]["seq"] == marks["assigned_seq"] and objs[-1]["state"]["status"] == "assigned"
    r = await ccc(nats_url, ns, "replay", "--until-seq", "2", "--json")
    objs = json_lines(r.stdout)
    assert [o["seq"] for o in objs] == [1, 2]
    assert objs[1]["state"]["agent_id"] == "agent-1" and objs[1]["state"]["status"] == "idle"


async def test_replay_shows_rejected_and_bad_and_goes_on(nats_url, ns, store):
    await seed(store)
    garbage_seq, rejected_seq = await add_bad(store)
    await _agent(store, "agent-2", [ag.RegisterAgent(at=T0, actor="agent-2", agent_id="agent-2",
                                                     specialties=("frontend",))])
    r = await ccc(nats_url, ns, "replay")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert ("REJECTED IllegalTransition: task acme_web-2: cannot task.started while pending; "
            "state unchanged") in out
    assert "-> agent agent-2  idle" in out  # after the rejected one: replay went on
    assert out.splitlines()[-1].endswith("9 applied, 1 rejected, 1 bad")
    objs = json_lines((await ccc(nats_url, ns, "replay", "--json")).stdout)
    by_seq = {o["seq"]: o for o in objs}
    assert by_seq[garbage_seq]["bad"] is True
    rej = by_seq[rejected_seq]
    assert rej["rejected"] is True and "IllegalTransition" in rej["error"]
    assert rej["state"]["status"] == "pending"  # the state it was rejected in
    assert objs[-1]["state"]["agent_id"] == "agent-2"


# -- tasks / agents / bad events -------------------------------------------------
async def test_tasks_and_agents_tables(nats_url, ns, store):
    marks = await seed(store)
    r = await ccc(nats_url, ns, "tasks")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.stdout.splitlines()]
    assert rows[0] == ["TASK", "STATE", "SPECIALTY", "PRIORITY", "AGENT", "ATTEMPT", "TITLE", "WAITING"]
    assert rows[1] == ["acme_web-1", "in_progress", "backend", "high", "agent-1", "1/3",
                       "Fix", "login", "bug", "-"]  # with its agent: not waiting
    assert rows[2] == ["acme_web-2", "pending", "general", "normal", "-", "1/3", "Add", "dark", "mode",
                       "waiting", "for", "analysis"]
    assert r.stdout.splitlines()[3] == f"2 tasks: 1 in_progress, 1 pending  (log at seq {marks['last_seq']})"
    assert "bad events" not in r.stdout
    # columns are aligned: every row starts its STATE column at the same offset
    lines = r.stdout.splitlines()[:3]
    assert len({ln.index(word) for ln, word in zip(lines, ["STATE", "in_progress", "pending"])}) == 1

    r = await ccc(nats_url, ns, "tasks", "--state", "pending")
    assert [ln.split()[0] for ln in r.stdout.splitlines()[1:-1]] == ["acme_web-2"]
    assert "1 of 2 tasks" in r.stdout
    r = await ccc(nats_url, ns, "tasks", "--specialty", "backend", "--json")
    [obj] = json_lines(r.stdout)
    assert obj["task"]["task_id"] == "acme_web-1" and obj["task"]["status"] == "in_progress"
    assert obj["seq"] == marks["assigned_seq"] + 1 and obj["waiting"] == ""

    r = await ccc(nats_url, ns, "agents")
    assert r.exit_code == 0, r.output
    rows = [ln.split() for ln in r.stdout.splitlines()]
    assert rows[0] == ["AGENT", "STATE", "SPECIALTIES", "LOAD", "ACTIVE", "TASKS", "DONE", "FAILED"]
    assert rows[1] == ["agent-1", "busy", "backend,testing", "1/2", "acme_web-1", "0", "0"]
    assert "1 agents: 1 busy; cluster load 1/2" in r.stdout
    r = await ccc(nats_url, ns, "agents", "--json")
    [obj] = json_lines(r.stdout)
    assert obj["agent"]["active_tasks"] == ["acme_web-1"] and obj["agent"]["capacity"] == 2
    r = await ccc(nats_url, ns, "agents", "--state", "idle", "--json")
    assert r.exit_code == 0 and r.stdout == ""


async def test_tasks_say_why_they_wait(nats_url, ns, store):
    """The WAITING column (and ``waiting`` in --json): checks running, queued for merge,
    needs a human, a file lease, from a real log."""
    at = T0 + timedelta(minutes=1)
    head = "c0ffee" + "0" * 34
    green = CheckRun(name="test", conclusion="success")

    def to_pr(n: int, paths: tuple[str, ...] = ()) -> list:
        return [ts.StartAnalysis(at=at, actor="coordinator"),
                ts.RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(paths=paths)),
                ts.AssignTask(at=at, actor="coordinator", agent_id="agent-1"),
                ts.StartTask(at=at, actor="agent-1", agent_id="agent-1"),
                ts.StartTests(at=at, actor="agent-1", agent_id="agent-1", files_changed=("app.py",)),
                ts.OpenPullRequest(at=at, actor="agent-1", agent_id="agent-1", branch=f"ccc/{n}",
                                   pr_number=n, head_sha=head, base_branch="main")]

    await _task(store, "acme_web-1", [_create("acme_web-1", 1, "Checks"), *to_pr(1, ("app.py",))])
    approval = CheckRun(name="ci", conclusion="action_required")
    await _task(store, "acme_web-2", [_create("acme_web-2", 2, "Approval"), *to_pr(2), ts.RecordChecks(
        at=at, actor="coordinator", head_sha=head, checks=(approval,))])
    await _task(store, "acme_web-3", [_create("acme_web-3", 3, "Queue"), *to_pr(3), ts.RecordChecks(
        at=at, actor="coordinator", head_sha=head, checks=(green,)),
        ts.ApprovePullRequest(at=at, actor="coordinator", by="alice", merge_queue=True)])
    await _task(store, "acme_web-4", [
        _create("acme_web-4", 4, "Lease"), ts.StartAnalysis(at=at, actor="coordinator"),
        ts.RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(paths=("app.py", "b.py")))])

    r = await ccc(nats_url, ns, "tasks")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    column = lines[0].index("WAITING")
    waiting = {ln.split()[0]: ln[column:] for ln in lines[1:5]}
    assert waiting["acme_web-1"].startswith("checks running on c0ffee0 since ")
    assert waiting["acme_web-2"] == ("needs a human: a maintainer approves the pending workflow run(s) "
                                     "on the pull request")
    assert waiting["acme_web-3"] == "queued for merge (position 1 of 1)"
    assert waiting["acme_web-4"] == "file lease: app.py held by acme_web-1"
    objs = {o["task"]["task_id"]: o for o in json_lines((await ccc(nats_url, ns, "tasks", "--json")).stdout)}
    assert {tid: o["waiting"] for tid, o in objs.items()} == {
        tid: text.rstrip() for tid, text in waiting.items()}
    assert objs["acme_web-3"]["task"]["status"] == "merge_queued"


async def test_bad_events_are_counted_not_fatal(nats_url, ns, store):
    await seed(store)
    garbage_seq, rejected_seq = await add_bad(store)
    await _task(store, "acme_web-3", [_create("acme_web-3", 3, "After the garbage")])
    r = await ccc(nats_url, ns, "tasks")
    assert r.exit_code == 0, r.output
    assert "acme_web-3" in r.stdout  # the log after the bad messages was applied
    assert "bad events: 2 (ccc bad-events lists them)" in r.stdout
    assert "bad events: 2" in (await ccc(nats_url, ns, "agents")).stdout

    r = await ccc(nats_url, ns, "bad-events")
    rows = r.stdout.splitlines()
    assert rows[0].split() == ["SEQ", "SUBJECT", "ERROR"]
    assert rows[1].split()[:2] == [str(garbage_seq), f"{ns.prefix}.task.junk-1.created"]
    assert rows[2].split()[:3] == [str(rejected_seq), f"{ns.prefix}.task.acme_web-2.started",
                                   "IllegalTransition:"]
    objs = json_lines((await ccc(nats_url, ns, "bad-events", "--json")).stdout)
    assert [(o["seq"], o["bad"]) for o in objs] == [(garbage_seq, True), (rejected_seq, True)]


async def test_empty_log(nats_url, ns):
    r = await ccc(nats_url, ns, "tasks")
    assert r.exit_code == 0 and "0 tasks  (log at seq 0)" in r.stdout
    r = await ccc(nats_url, ns, "replay")
    assert r.exit_code == 0 and r.stdout.splitlines()[-1].startswith("replayed 0 events")


# -- server -----------------------------------------------------------------------
def run_ccc(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.shell.cli.main", *args], cwd=REPO_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=30)


def test_server_writes_url_and_stops_cleanly(tmp_path, procs):
    data_dir = tmp_path / "data"
    env = {"NATS_URL": "", "CCC_NAMESPACE": "srv", "CCC_DATA_DIR": str(data_dir)}
    p = Proc("server", "--port", "0", "--data-dir", str(data_dir), env=env)
    procs.append(p)
    first = p.next_line()
    assert first.startswith("nats-server ready at tls://127.0.0.1:")  # secure by default
    assert first.endswith("(mutual TLS, nkey users, encrypted store)")
    url = first.split()[3]
    url_file = data_dir / "nats.url"
    assert url_file.read_text().strip() == url
    # another command without --nats-url finds the running server through nats.url
    issue = run_ccc("issue", "publish", "--repo", "a/b", "--title", "via the url file", "--json", env=env)
    assert issue.returncode == 0, issue.stderr
    assert json.loads(issue.stdout)["subject"] == "srv.issue.local.a_b.1.opened"
    # a second server for the same data dir is refused
    second = run_ccc("server", env=env)
    assert second.returncode == 2 and second.stderr.startswith("error: a server for")
    code, err = p.stop(signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
    assert not url_file.exists()
    # with no server running, a command starts the data dir's server for itself: same data
    again = run_ccc("issue", "publish", "--repo", "a/b", "--title", "second", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["number"] == 2
    assert not url_file.exists()


def test_stale_url_file_is_ignored(tmp_path):
    (tmp_path / "nats.url").write_text("nats://127.0.0.1:1\n")  # a server that was SIGKILLed
    r = run_ccc("tasks", env={"NATS_URL": "", "CCC_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "0 tasks" in r.stdout


# -- bench ---------------------------------------------------------------------------
def test_bench_store_json():
    r = invoke(["bench", "store", "--events", "700", "--rounds", "1", "--json"])
    assert r.exit_code == 0, r.output
    [obj] = json_lines(r.stdout)
    assert obj["events"] == 700 and obj["rounds"] == 1
    for key in ("append_ratio", "rebuild_ratio", "raw_publish_per_s", "append_per_s", "raw_replay_per_s",
                "rebuild_per_s"):
        assert obj[key] > 0
    assert (obj["append_target"], obj["rebuild_target"]) == (0.5, 0.75)
    assert "round 1/1" in r.stderr


# -- status API -------------------------------------------------------------------
async def test_api_serves_and_stops(nats_url, ns, store, procs):
    pytest.importorskip("infra.adapters.http.status_server")
    await seed(store)
    p = Proc(*nats_args(nats_url), "--namespace", ns.prefix, "api", "--port", "0")
    procs.append(p)
    line = await asyncio.to_thread(p.next_line)
    assert line.startswith("status API at http://127.0.0.1:")
    base = line.split()[3]
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/health", timeout=10).read())
    assert body
    code, err = await asyncio.to_thread(p.stop, signal.SIGTERM)
    assert code == 0, err
    assert "Traceback" not in err
