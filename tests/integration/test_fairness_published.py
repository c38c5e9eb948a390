"""Every process knows the cluster's fairness policy: ``ccc up`` publishes the policy its
coordinator applies to the cluster's settings (``<ns>_config``, key ``fairness``), and
``ccc tasks``, ``ccc tasks show`` and ``ccc api`` (its JSON task view and its dashboard)
read it from there, so a task a repository limit holds back says so wherever it is looked
at. No policy stored: no fairness reasons; a stored value that does not decode: a clear
one-line error.

The scheduler's own words travel the same way: a real coordinator writes them on each
``task.assigned`` (its scheduling pass and its intake's direct assignment alike).

Against real nats-servers: ``ccc up`` and ``ccc api`` run as real processes, ``ccc tasks``
as a process or through click's runner (its own event loop, on a worker thread)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from datetime import UTC, datetime
from html import unescape
from pathlib import Path

import pytest
from click.testing import CliRunner

from actors.coordinator import Coordinator, CoordinatorConfig
from events import agent_state as ag
from events import task_state as ts
from events.codec import encode
from events.issue import IssueOpened
from events.store import EventStore
from events.subjects import Namespace
from events.task import Analysis, IssueRef, TaskAssigned
from infra.adapters.nats.cluster_config import FAIRNESS, read_setting
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import config_bucket, provision
from infra.adapters.nats.secure import SecureDir
from infra.shell.cli.main import cli
from projections.fairness import FairnessPolicy
from tests.conftest import eventually
from tests.support.e2e import Processes
from tests.support.e2e import ccc as run_ccc
from tests.support.session import nats_args

pytestmark = pytest.mark.timeout(120)

C = "coordinator"
WHY = ("lane: new issue; urgency 1.0 (priority normal, waited 0s); "
       "agent-1: backend specialist, the only one free (0/2 slots busy)")
LIMIT_WAIT = "fairness: repository acme/app at its limit (1 running)"


def ccc_args(nats_url: str, ns, *args: str) -> list[str]:
    return [*nats_args(nats_url), "--namespace", ns.prefix, *args]


async def ccc(nats_url: str, ns, *args: str):
    """``ccc <args>`` in-process against the session server (on a thread: it runs its
    own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, ccc_args(nats_url, ns, *args))


def assert_one_line_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert text in error, result.stderr


async def seed(store) -> None:
    """acme_app-1 has an agent (assigned, with the scheduler's words); acme_app-2 of the
    same repository waits in the queue, created ``waited`` seconds ago."""
    now = datetime.now(UTC)

    async def task(tid: str, number: int, *commands) -> None:
        state, last = None, 0
        issue = IssueRef(source="local", repo="acme/app", number=number, title=f"issue {number}", author="bob")
        for command in (ts.CreateTask(at=now, actor=C, task_id=tid, issue=issue), ts.StartAnalysis(at=now, actor=C),
                        ts.RecordAnalysis(at=now, actor=C, analysis=Analysis(specialty="backend")), *commands):
            events = ts.decide(state, command)
            last = (await store.append(events, expected_last_seq=last))[-1]
            state = ts.fold(events, state)

    await task("acme_app-1", 1, ts.AssignTask(at=now, actor=C, agent_id="agent-1", why=WHY))
    await task("acme_app-2", 2)


def rows(output: str) -> dict[str, dict]:
    return {row["task"]["task_id"]: row for row in map(json.loads, output.splitlines())}


def detail(output: str) -> dict[str, str]:
    """``ccc tasks show``'s ``label   value`` lines."""
    return {line[:15].strip(): line[16:] for line in output.splitlines() if not line.startswith("(")}


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", html)))


async def publish_with_ccc_up(nats_url: str, ns, root: Path, *flags: str) -> None:
    """``ccc up <flags> --agents 0 --no-api`` until it has started, then stopped (Ctrl-C)."""
    procs = Processes(root / "procs")
    try:
        up = procs.start("up", root / "data", *ccc_args(nats_url, ns, "up", *flags, "--agents", "0", "--no-api"))
        await asyncio.to_thread(up.wait_for_output, "Ctrl-C to stop.", 60)
        assert await asyncio.to_thread(up.stop, signal.SIGINT) == 0, up.stderr
    finally:
        procs.close()


async def test_ccc_up_publishes_the_policy_and_every_view_explains_the_wait(tmp_path):
    """The whole way, each part with its own role's credentials on the embedded secure
    server: the coordinator writes the policy, ``ccc tasks`` (cli) and ``ccc api`` (status)
    read it."""
    data = tmp_path / "data"
    procs = Processes(tmp_path)
    try:
        up = procs.start("up", data, "up", "--repo-limit", "1", "--aging", "600", "--agents", "0", "--no-api")
        await asyncio.to_thread(up.wait_for_output, "Ctrl-C to stop.", 60)
        admin = await connect((data / "nats.url").read_text().strip(), name="test-admin",
                              kit=SecureDir.of(data).kit("admin"))
        try:
            ns = Namespace()
            assert await read_setting(admin, ns, FAIRNESS, FairnessPolicy) == FairnessPolicy(repo_limit=1, aging=600.0)
            await seed(EventStore(admin, ns))
        finally:
            await admin.close()

        # ccc tasks: the board, and its JSON lines
        board = await asyncio.to_thread(run_ccc, data, "tasks", check=True)
        [line] = [x for x in board.stdout.splitlines() if x.startswith("acme_app-2")]
        assert LIMIT_WAIT in line
        by_id = rows((await asyncio.to_thread(run_ccc, data, "tasks", "--json", check=True)).stdout)
        assert by_id["acme_app-2"]["waiting"] == LIMIT_WAIT
        assert re.fullmatch(r"lane: new issue; urgency 1\.\d \(priority normal, waited [\dsmh ]+\)",
                            by_id["acme_app-2"]["queue"])
        assert by_id["acme_app-1"]["task"]["assigned_why"] == WHY and by_id["acme_app-1"]["queue"] == ""

        # ccc tasks show: one task in full
        fields = detail((await asyncio.to_thread(run_ccc, data, "tasks", "show", "acme_app-2", check=True)).stdout)
        assert fields["waiting"] == LIMIT_WAIT and fields["in the queue"].startswith("lane: new issue; urgency 1.")
        assert fields["state"].startswith("queued") and fields["issue"] == "local:acme/app#2 by bob"
        fields = detail((await asyncio.to_thread(run_ccc, data, "tasks", "show", "acme_app-1", check=True)).stdout)
        assert fields["why this agent"] == WHY and "in the queue" not in fields
        missing = await asyncio.to_thread(run_ccc, data, "tasks", "show", "acme_app-9")
        assert missing.returncode == 2 and missing.stderr.strip() == "error: no task acme_app-9"

        # ccc api: the JSON task view and the dashboard's task page
        api = procs.start("api", data, "api", "--port", "0")
        out = await asyncio.to_thread(api.wait_for_output, "status API at ", 60)
        base = re.search(r"status API at (\S+)", out).group(1)
        status, body = await asyncio.to_thread(get, f"{base}/api/v1/tasks/acme_app-2")
        queued = json.loads(body)
        assert status == 200 and queued["waiting"] == LIMIT_WAIT
        assert queued["queue"].startswith("lane: new issue; urgency 1.") and queued["assigned_why"] == ""
        _, body = await asyncio.to_thread(get, f"{base}/api/v1/tasks/acme_app-1")
        assert json.loads(body)["assigned_why"] == WHY
        _, html = await asyncio.to_thread(get, f"{base}/tasks/acme_app-2")
        page = text_of(html)
        assert f"waiting {LIMIT_WAIT}" in page and "in the queue lane: new issue; urgency 1." in page
        _, html = await asyncio.to_thread(get, f"{base}/tasks/acme_app-1")
        assert f"why this agent {WHY}" in text_of(html)
        assert api.stop(signal.SIGINT) == 0, api.stderr
        assert up.stop(signal.SIGINT) == 0, up.stderr
    finally:
        procs.close()


async def test_a_later_ccc_up_without_limits_replaces_the_policy(nats_url, ns, nc, store, tmp_path):
    """What is stored is what the coordinator applies now: an earlier run's limits do not
    linger. (Each ``ccc up``'s coordinator takes acme_app-1 back from its unknown agent when
    it starts: the test hands it out again, as a later pass would.)"""
    await provision(nc, ns)
    await seed(store)
    before = rows((await ccc(nats_url, ns, "tasks", "--json")).stdout)
    assert before["acme_app-1"]["task"]["status"] == "assigned"
    assert before["acme_app-2"]["waiting"] == "waiting for an agent: none is online"  # nothing stored: as before
    await publish_with_ccc_up(nats_url, ns, tmp_path / "one", "--repo-limit", "1")
    await hand_out_again(store)
    assert rows((await ccc(nats_url, ns, "tasks", "--json")).stdout)["acme_app-2"]["waiting"] == LIMIT_WAIT
    await publish_with_ccc_up(nats_url, ns, tmp_path / "two")
    assert await read_setting(nc, ns, FAIRNESS, FairnessPolicy) == FairnessPolicy()
    await hand_out_again(store)
    after = rows((await ccc(nats_url, ns, "tasks", "--json")).stdout)
    assert after["acme_app-1"]["task"]["status"] == "assigned"
    assert after["acme_app-2"]["waiting"] == "waiting for an agent: none is online"


async def hand_out_again(store) -> None:
    state, last = await store.load_task("acme_app-1")
    assert state.status == "queued" and state.status_reason == "agent_lost"
    await store.append(ts.decide(state, ts.AssignTask(at=datetime.now(UTC), actor=C, agent_id="agent-1")),
                       expected_last_seq=last)


@pytest.mark.parametrize("stored", [b"not json", b'{"repo_limit": 0}', b'{"aging": "soon"}'])
async def test_a_bad_stored_policy_is_a_clear_error(nats_url, ns, nc, store, stored):
    await provision(nc, ns)
    await seed(store)
    kv = await nc.jetstream().key_value(config_bucket(ns))
    await kv.put(FAIRNESS, stored)
    for args in (("tasks",), ("tasks", "--json"), ("tasks", "show", "acme_app-2"), ("api", "--port", "0")):
        assert_one_line_error(await ccc(nats_url, ns, *args), "cluster setting 'fairness' is not valid")
    await kv.put(FAIRNESS, b'{"repo_limit": 1}')  # fixed: the views explain again

    async def explained() -> bool:
        result = await ccc(nats_url, ns, "tasks", "--json")
        return result.exit_code == 0 and rows(result.stdout)["acme_app-2"]["waiting"] == LIMIT_WAIT

    await eventually(explained, timeout=20, interval=0.2)


async def test_the_coordinator_writes_its_choice_on_every_assignment(nc, ns, store):
    """Both ways a coordinator assigns: a scheduling pass (the task waited for an agent)
    and the intake's direct assignment (an agent was free when the analysis ended)."""
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, fairness=FairnessPolicy(repo_limit=2)))
    await coordinator.start()
    try:
        async def opened(number: int) -> None:
            issue = IssueOpened(event_id=f"test:acme/app#{number}", repo="acme/app", number=number,
                                title=f"Fix the API endpoint {number}", labels=("backend",),
                                occurred_at=datetime.now(UTC), author="bob", author_association="OWNER")
            await nc.jetstream().publish(ns.subject(issue.rel_subject), encode(issue),
                                         headers={"Nats-Msg-Id": issue.event_id})

        async def assigned(task_id: str) -> TaskAssigned | None:
            loaded = await store.load(ns.task_filter(task_id))
            return next((e.event for e in loaded.events if isinstance(e.event, TaskAssigned)), None)

        await opened(1)  # no agent yet: it waits in the queue
        await eventually(lambda: (t := coordinator.model.tasks.get("acme_app-1")) is not None and t.status == "queued")
        await store.append(ag.decide(None, ag.RegisterAgent(
            at=datetime.now(UTC), actor="be-1", agent_id="be-1", specialties=("backend",), capacity=2)),
            expected_last_seq=0)
        await eventually(lambda: assigned("acme_app-1"), timeout=20)
        first = await assigned("acme_app-1")
        assert re.fullmatch(r"lane: new issue; urgency 1\.\d \(priority normal, waited \d+s\); "
                            r"be-1: backend specialist, the only one free \(0/2 slots busy\); "
                            r"fairness: repository acme/app 0/2 running", first.why), first.why

        await opened(2)  # be-1 has a free slot: assigned right after the analysis
        await eventually(lambda: assigned("acme_app-2"), timeout=20)
        second = await assigned("acme_app-2")
        assert second.why.endswith("be-1: backend specialist, the only one free (1/2 slots busy); "
                                   "fairness: repository acme/app 1/2 running"), second.why
        await eventually(lambda: coordinator.model.tasks["acme_app-2"].assigned_why == second.why)
        assert coordinator.model.tasks["acme_app-1"].assigned_why == first.why
    finally:
        await coordinator.stop()
