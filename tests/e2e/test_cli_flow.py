"""End to end through real processes: ``ccc demo``, ``ccc up``, ``ccc agent`` and the
commands that talk to them (``issue publish``, ``tasks``, ``pr merge|close``,
``tasks cancel``, ``events``), the status API over HTTP, signals and cleanup.

Each test has its own data dir (its own embedded nats-server, forge, workspaces);
every process it starts is stopped by the ``procs`` fixture (SIGTERM, then SIGKILL,
then anything left under the test's directory is killed by pid)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from infra.adapters.forge.local import LocalForge
from tests.support.e2e import (
    FIX,
    REPO,
    Processes,
    alive,
    ccc,
    descendants,
    http_json,
    make_repo,
    processes_under,
    publish,
    sleep_step,
    sleeps_under,
    status_is,
    tasks,
    wait_for,
    wait_task,
    write_script,
)

pytestmark = pytest.mark.timeout(120)

UP_ARGS = ("--agents", "2", "--specialties", "backend,general", "--heartbeat-timeout", "2")


@pytest.fixture
def procs(tmp_path):
    owner = Processes(tmp_path)
    yield owner
    owner.close()
    print(owner.logs())  # pytest shows it only when the test failed


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    make_repo(d)
    return d


@pytest.fixture
def scripts(tmp_path) -> Path:
    s = tmp_path / "scripts"
    write_script(s, 1, FIX)
    write_script(s, 2, FIX)
    return s


def assert_one_line_error(result, code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


# -- 1. the demo ----------------------------------------------------------------------------
def test_demo_completes_every_task(tmp_path):
    env = {"TMPDIR": str(tmp_path)}  # the demo's own data dir goes here
    result = ccc(None, "demo", timeout=100, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["TASK", "ISSUE", "AGENT", "STATE", "ATTEMPT"]
    rows = [line for line in lines if line.startswith("demo_shop-")]
    assert len(rows) == 5 and all(" completed " in r for r in rows), result.stdout
    assert header[-1] == "CI" and "1 CI fix, merged by the queue" in rows[0], result.stdout
    # the PR to green: a CI fix round, a file lease, the merge queue, the prediction's score
    assert "CI fix round made it green: demo_shop-1" in result.stdout
    assert "waited for a file lease: demo_shop-5 (file lease: shop/cart.py held by demo_shop-1)" in result.stdout
    assert "merged by the merge queue, in order:" in result.stdout and "hit rate" in result.stdout
    assert "Traceback" not in result.stderr

    result = ccc(None, "demo", "--json", timeout=100, env=env)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 5
    assert {r["task"] for r in out} == {f"demo_shop-{n}" for n in (1, 2, 3, 4, 5)}
    assert all(r["state"] == "completed" and r["branch"].startswith("ccc/") for r in out)
    assert not list(tmp_path.glob("ccc-demo-*")), "the demo leaves its data dir behind"


# -- 2. up -> issue -> review -> merge -> completed ------------------------------------------
def test_issue_to_merged_pull_request(procs, data_dir, scripts):
    _, api = procs.up(data_dir, *UP_ARGS, "--script-dir", str(scripts))
    assert api.startswith("http://127.0.0.1:")
    task_id = publish(data_dir, "Fix add in calc.py", number=1)
    assert task_id == "acme_calc-1"
    task = wait_task(data_dir, task_id, status_is("review"), what="in review")
    assert task["tests_passed"] == 1 and task["tests_failed"] == 0 and task["agent_id"]

    forge = LocalForge(data_dir / "forge")
    assert task["branch"] in forge.branches(REPO)
    assert "return a + b" in forge.read_file(REPO, task["branch"], "calc.py")
    assert "return a - b" in forge.read_file(REPO, "main", "calc.py")  # not merged yet

    status, body = http_json(f"{api}/api/v1/tasks/{task_id}")
    assert status == 200 and body["task_id"] == task_id and body["status"] == "review"
    status, body = http_json(f"{api}/health")
    assert status == 200 and body["status"] == "ok" and body["nats_connected"] is True
    assert http_json(f"{api}/api/v1/tasks/acme_calc-99")[0] == 404

    merged = ccc(data_dir, "pr", "merge", task_id)
    assert merged.returncode == 0 and f"merged {task['branch']}" in merged.stdout, merged.stderr
    wait_task(data_dir, task_id, status_is("completed"), what="completed")
    assert "return a + b" in forge.read_file(REPO, "main", "calc.py")
    wait_for(lambda: http_json(f"{api}/api/v1/tasks/{task_id}")[1]["status"] == "completed", 10,
             "the status API to show completed")
    again = ccc(data_dir, "pr", "merge", task_id)
    assert_one_line_error(again, 2, "has no open pull request (it is completed)")


# -- 3. two issues in parallel -> two agents ------------------------------------------------
def test_two_issues_run_on_two_agents(procs, data_dir, tmp_path):
    scripts = tmp_path / "scripts"
    for n in (1, 2):  # slow enough that both are held at the same time
        write_script(scripts, n, [*sleep_step(2), *FIX])
    _, api = procs.up(data_dir, *UP_ARGS, "--script-dir", str(scripts))
    first = publish(data_dir, "Fix add", number=1)
    second = publish(data_dir, "Fix add again", number=2)
    a = wait_task(data_dir, first, status_is("review"), what="in review", api=api)
    b = wait_task(data_dir, second, status_is("review"), what="in review", api=api)
    assert {a["agent_id"], b["agent_id"]} == {"agent-1-backend", "agent-2-general"}
    assert a["attempt"] == b["attempt"] == 1


# -- 4. cancel a task in the middle of a long command ----------------------------------------
def test_cancel_stops_the_running_command(procs, data_dir, tmp_path):
    scripts = tmp_path / "scripts"
    write_script(scripts, 1, [*sleep_step(30), *FIX])
    _, api = procs.up(data_dir, *UP_ARGS, "--script-dir", str(scripts))
    task_id = publish(data_dir, "Slow fix", number=1)
    wait_task(data_dir, task_id, status_is("in_progress"), what="in progress", api=api)
    sleeping = wait_for(lambda: sleeps_under(data_dir, 30), 15, "the scripted sleep to start")

    result = ccc(data_dir, "tasks", "cancel", task_id, "--reason", "not needed")
    assert result.returncode == 0 and "cancellation of" in result.stdout, result.stderr
    task = wait_task(data_dir, task_id, status_is("cancelled"), timeout=20, what="cancelled", api=api)
    assert task["branch"] is None or task["branch"] == ""
    wait_for(lambda: not any(map(alive, sleeping)), 10, "the sleep to be killed")
    assert_one_line_error(ccc(data_dir, "tasks", "cancel", task_id), 2, "already cancelled")


# -- 5. a closed pull request fails the attempt; the retry policy runs attempt 2 -------------
def test_closed_pull_request_is_retried(procs, data_dir, scripts):
    _, api = procs.up(data_dir, *UP_ARGS, "--script-dir", str(scripts), "--retry-base", "0.2")
    task_id = publish(data_dir, "Fix add", number=1)
    first = wait_task(data_dir, task_id, status_is("review"), what="in review", api=api)
    result = ccc(data_dir, "pr", "close", task_id, "--reason", "wrong approach")
    assert result.returncode == 0 and "closed the pull request" in result.stdout, result.stderr

    events = [json.loads(line)["event"] for line in
              ccc(data_dir, "events", "--task", task_id, "--json", check=True).stdout.splitlines()]
    failed = [e for e in events if e["type"] == "task.failed"]
    assert failed and failed[-1]["reason"] == "wrong approach" and failed[-1]["phase"] == "review"
    second = wait_task(data_dir, task_id, lambda t: t["attempt"] == 2 and t["status"] == "review",
                       what="attempt 2 in review", api=api)
    assert second["agent_id"] and first["attempt"] == 1


# -- 6. standalone agent processes; one is SIGKILLed mid-task --------------------------------
def test_standalone_agents_and_a_killed_agent(procs, data_dir, tmp_path):
    scripts = tmp_path / "scripts"
    write_script(scripts, 1, FIX)
    write_script(scripts, 2, [*sleep_step(20), *FIX], FIX)  # attempt 1 is slow, attempt 2 quick
    _, api = procs.up(data_dir, "--agents", "0", "--heartbeat-timeout", "2")
    waiting = publish(data_dir, "Nobody to do this", number=3)  # no agent yet: it waits, queued
    wait_task(data_dir, waiting, status_is("queued"), what="queued", api=api)
    assert ccc(data_dir, "tasks", "cancel", waiting).returncode == 0
    wait_task(data_dir, waiting, status_is("cancelled"), what="cancelled", api=api)
    agent_args = ("agent", "--specialty", "backend", "--script-dir", str(scripts),
                  "--heartbeat-interval", "0.3")
    solo = procs.start("solo", data_dir, *agent_args, "--agent-id", "solo")
    solo.wait_for_output("agent solo (backend) registered")

    one = publish(data_dir, "Fix add", number=1)
    assert wait_task(data_dir, one, status_is("review"), what="in review", api=api)["agent_id"] == "solo"

    two = publish(data_dir, "Fix add slowly", number=2)
    wait_task(data_dir, two, lambda t: t["status"] == "in_progress" and t["agent_id"] == "solo",
              what="in progress on solo", api=api)
    wait_for(lambda: sleeps_under(data_dir, 20), 15, "the slow step to start")
    solo.stop(signal.SIGKILL)
    solo2 = procs.start("solo2", data_dir, *agent_args, "--agent-id", "solo2")
    solo2.wait_for_output("agent solo2 (backend) registered")

    task = wait_task(data_dir, two, lambda t: t["status"] == "review" and t["attempt"] == 2,
                     timeout=30, what="attempt 2 in review", api=api)
    assert task["agent_id"] == "solo2"
    events = [json.loads(line)["event"] for line in
              ccc(data_dir, "events", "--task", two, "--json", check=True).stdout.splitlines()]
    kinds = [(e["type"], e.get("reason") if e["type"] == "task.requeued" else e.get("agent_id")) for e in events]
    i = kinds.index(("task.requeued", "agent_lost"))
    assert events[i]["agent_id"] == "solo"  # the requeue names the agent it took the task from
    assert ("task.assigned", "solo") in kinds[:i] and ("task.assigned", "solo2") in kinds[i:], kinds
    status, agent = http_json(f"{api}/api/v1/agents/solo")
    assert status == 200 and agent["status"] == "offline"
    # (the killed agent's direct child gets SIGTERM by the parent-death signal, but a grandchild
    # such as the `sleep` under `sh -c` can outlive it until its own end: the fixture kills it)


# -- 7. SIGTERM to `ccc up`: clean exit, nothing left ------------------------------------------
def test_sigterm_stops_everything(procs, data_dir, tmp_path):
    scripts = tmp_path / "scripts"
    write_script(scripts, 1, [*sleep_step(30), *FIX])
    up, api = procs.up(data_dir, *UP_ARGS, "--script-dir", str(scripts), "--shutdown-grace", "60")
    assert (data_dir / "nats.url").is_file()
    # one embedded server per data dir: a second `up` is refused, the first keeps running
    url = (data_dir / "nats.url").read_text().strip()
    assert_one_line_error(ccc(data_dir, "up", "--no-api"), 2, "already running")
    assert (data_dir / "nats.url").read_text().strip() == url
    task_id = publish(data_dir, "Slow fix", number=1)
    wait_task(data_dir, task_id, status_is("in_progress"), what="in progress", api=api)
    wait_for(lambda: sleeps_under(data_dir, 30), 15, "the scripted sleep to start")
    family = descendants(up.pid)
    assert any("nats-server" in args for pid, _, args in processes_under(data_dir) if pid in family)

    started = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)  # the running task gets its grace (60 s) ...
    wait_for(lambda: "stopping:" in up.stderr, 10, "the graceful stop to begin")
    up.proc.send_signal(signal.SIGINT)  # ... unless a second signal says: now
    code = up.stop(signal.SIGTERM, timeout=20)
    assert code == 0, up.stderr
    assert time.monotonic() - started < 8
    assert "Traceback" not in up.stderr
    assert not (data_dir / "nats.url").exists()
    left = [pid for pid in family if alive(pid)]
    assert not left, [args for pid, _, args in processes_under(tmp_path) if pid in left]
    assert not [args for _, _, args in processes_under(data_dir)]
    # the task was handed back, not lost: the log says so
    task = tasks(data_dir)[task_id]
    assert task["status"] == "queued" and task["agent_id"] is None


# -- 8. bad input: one line, no traceback ------------------------------------------------------
def test_bad_input_is_reported_in_one_line(tmp_path):
    d = tmp_path / "data"
    assert_one_line_error(ccc(d, "up", "--specialties", "nonsense", "--no-api"), 2, "--specialties")
    assert not (d / "nats.url").exists()
    usage = ccc(d, "agent")
    assert usage.returncode == 2 and "Missing option '--specialty'" in usage.stderr
    assert "Traceback" not in usage.stderr
    assert_one_line_error(ccc(d, "pr", "merge", "nope-1"), 2, "no task nope-1")
    assert_one_line_error(ccc(d, "pr", "close", "bad.id"), 2, "task id")
    # joining commands need a running cluster (else a private server nobody can reach)
    assert_one_line_error(ccc(d, "agent", "--specialty", "backend"), 2, "no cluster is running")
    assert_one_line_error(ccc(d, "api", "--port", "0"), 2, "no cluster is running")
    assert_one_line_error(ccc(d, "up", "--heartbeat-timeout", "1", "--heartbeat-interval", "1"), 2,
                          "must be shorter than --heartbeat-timeout")
    assert_one_line_error(ccc(d, "repo", "import", "acme/x", str(tmp_path)), 2, "not a git repository")
    assert not processes_under(tmp_path)


# -- an idle agent declared offline (a stall) notices with its next heartbeat and comes back ----
def test_stalled_idle_agent_comes_back(procs, data_dir, scripts):
    _, api = procs.up(data_dir, "--agents", "0", "--heartbeat-timeout", "1")
    solo = procs.start("solo", data_dir, "agent", "--specialty", "backend", "--agent-id", "solo",
                       "--script-dir", str(scripts), "--heartbeat-interval", "0.2")
    solo.wait_for_output("agent solo (backend) registered")
    solo.proc.send_signal(signal.SIGSTOP)  # a stall longer than the heartbeat timeout
    try:
        wait_for(lambda: (http_json(f"{api}/api/v1/agents/solo")[1] or {}).get("status") == "offline", 10,
                 "solo to be declared offline")
    finally:
        solo.proc.send_signal(signal.SIGCONT)
    task_id = publish(data_dir, "Fix add", number=1)  # it is alive and heartbeating again
    wait_task(data_dir, task_id, status_is("review"), timeout=8, what="in review", api=api)


# -- a SIGKILLed `ccc up` does not orphan its nats-server (parent-death signal) --------------------
def test_sigkilled_up_leaves_no_server(procs, data_dir):
    up, _ = procs.up(data_dir, "--agents", "0", "--no-api")
    family = descendants(up.pid)
    servers = [pid for pid, _, args in processes_under(data_dir) if pid in family and "nats-server" in args]
    assert servers
    up.stop(signal.SIGKILL)
    wait_for(lambda: not any(map(alive, servers)), 5, "the nats-server to follow its parent")
