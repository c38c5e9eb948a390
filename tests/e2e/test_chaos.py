"""The fault suite: the log checks as pure functions, the 3-node cluster helper (secure:
mutual TLS and users on the client port, TLS routes with their own CA, an encrypted
store), a subset of ``ccc chaos --quick`` through the Python API (secure, the default),
and scenarios through the CLI (secure, and ``--insecure``). Scenarios that fail because
of a known, reported bug are xfailed with its description (see ``Spec.expected_failure``
in ``infra/shell/chaos/scenarios.py``)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats
import pytest

from events import agent_state as ag
from events import task_state as ts
from events.subjects import Namespace
from events.task import Analysis, IssueRef, TaskAssigned
from events.checks import CheckRun
from events.work_reports import ChangesPushed, PullRequestOpened
from events.codec import encode
from events.errors import ConfigError, StoreUnavailable
from infra.shell.chaos.checks import LogRecord, check_log, finished_by_other, percentile, read_log
from infra.shell.chaos.ci_loop import check_ci_loop
from infra.shell.chaos.model import ChaosOptions
from infra.shell.chaos.processes import CCC, clean_env
from infra.shell.chaos.sandbox import CI_REPO, CI_REPO_FILES, Sandbox
from infra.adapters.forge.local import LocalForge
from infra.adapters.git import gitops
from infra.shell.chaos.scenarios import SCENARIOS
from infra.shell.chaos.suite import run_chaos
from infra.adapters.nats.cluster import (
    NatsCluster,
    free_ports,
    stream_leader,
    wait_for_jetstream,
    wait_for_leader,
)
from infra.adapters.nats.connection import connect
from infra.adapters.nats.issue_publisher import new_issue
from infra.adapters.nats.pki import CertificateAuthority
from infra.adapters.nats.provisioning import provision
from infra.adapters.nats.secure import KitFiles, SecureDir
from infra.adapters.nats.server import server_binary
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(300)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ISSUE = IssueRef(source="local", repo="chaos/calc", number=1, title="Fix add")


# -- the checks, pure -----------------------------------------------------------------------
class Log:
    """Builds a log the way the actors would, through decide()."""

    def __init__(self) -> None:
        self.records: list[LogRecord] = []
        self.tasks: dict[str, ts.TaskState | None] = {}
        self.agents: dict[str, ag.AgentState | None] = {}

    def _add(self, events) -> None:
        for e in events:
            self.records.append(LogRecord(len(self.records) + 1, "ccc." + e.rel_subject,
                                          (T0 + timedelta(seconds=len(self.records))).timestamp(), e))

    def task(self, tid: str, command) -> None:
        events = ts.decide(self.tasks.get(tid), command)
        for e in events:
            self.tasks[tid] = ts.evolve(self.tasks.get(tid), e)
        self._add(events)

    def agent(self, aid: str, command) -> list:
        events = ag.decide(self.agents.get(aid), command)
        for e in events:
            self.agents[aid] = ag.evolve(self.agents.get(aid), e)
        self._add(events)
        return events


def happy_path(log: Log, tid: str = "chaos_calc-1", agent: str = "a1") -> None:
    c = {"at": T0, "actor": "coordinator"}
    if agent not in log.agents:
        log.agent(agent, ag.RegisterAgent(at=T0, actor=agent, agent_id=agent, specialties=("backend",)))
    log.task(tid, ts.CreateTask(**c, task_id=tid, issue=ISSUE))
    log.task(tid, ts.StartAnalysis(**c))
    log.task(tid, ts.RecordAnalysis(**c, analysis=Analysis(specialty="backend")))
    log.task(tid, ts.AssignTask(**c, agent_id=agent))
    [started] = log.agent(agent, ag.StartAgentTask(at=T0, actor=agent, task_id=tid, attempt=1))
    log.task(tid, ts.StartTask(**c, agent_id=agent, causation_id=started.event_id))
    log.task(tid, ts.StartTests(**c, agent_id=agent))
    [pr] = log.agent(agent, ag.ReportWork(at=T0, actor=agent, task_id=tid, attempt=1,
                                          report=PullRequestOpened(branch="ccc/x")))
    log.task(tid, ts.OpenPullRequest(**c, agent_id=agent, branch="ccc/x", causation_id=pr.event_id))


ISSUES = {"chaos_calc-1": ("chaos/calc", 1)}


def test_a_clean_log_passes():
    log = Log()
    happy_path(log)
    v = check_log(log.records, ISSUES)
    # (the pull request is up: its checks are awaited)
    assert v.ok and v.tasks == 1 and v.final_states == {"checking": 1}, v.violations


def test_an_issue_without_a_task_and_a_stuck_task_are_lost():
    log = Log()
    happy_path(log)
    log.task("chaos_calc-2", ts.CreateTask(at=T0, actor="c", task_id="chaos_calc-2",
                                           issue=IssueRef(source="local", repo="chaos/calc", number=2, title="x")))
    v = check_log(log.records, {**ISSUES, "chaos_calc-2": ("chaos/calc", 2), "chaos_calc-3": ("chaos/calc", 3)})
    assert v.lost == 2 and v.duplicated == 0
    assert any("chaos_calc-2: stuck in pending" in x for x in v.violations)
    assert any("chaos/calc#3: no task created" in x for x in v.violations)


def test_a_second_assignment_in_the_same_attempt_is_a_duplicate_and_illegal():
    log = Log()
    happy_path(log)
    assigned = next(r for r in log.records if r.item.__struct_config__.tag == "task.assigned")
    # a second coordinator's assignment of the same attempt smuggled in right after it
    from msgspec.structs import replace

    twin = replace(assigned.item, agent_id="a2")
    records = log.records[:assigned.seq] + [LogRecord(0, assigned.subject, assigned.at, twin)] + \
        log.records[assigned.seq:]
    records = [LogRecord(i + 1, r.subject, r.at, r.item) for i, r in enumerate(records)]
    v = check_log(records, ISSUES)
    assert v.duplicated == 1 and v.illegal >= 1  # it also breaks the version sequence


def test_two_pr_reports_for_one_attempt_are_duplicates():
    log = Log()
    happy_path(log)
    pr = next(r for r in log.records if r.item.__struct_config__.tag == "agent.pr_opened")
    from msgspec.structs import replace

    again = replace(pr.item, version=pr.item.version + 1, event_id=f"a1:{pr.item.version + 1}")
    v = check_log([*log.records, LogRecord(len(log.records) + 1, pr.subject, pr.at, again)], ISSUES)
    assert v.duplicated == 1


def test_a_transition_caused_by_a_stale_report_is_flagged():
    log = Log()
    c = {"at": T0, "actor": "coordinator"}
    happy_path(log)
    tid = "chaos_calc-9"
    issue = IssueRef(source="local", repo="chaos/calc", number=9, title="x")
    log.task(tid, ts.CreateTask(**c, task_id=tid, issue=issue))
    log.task(tid, ts.StartAnalysis(**c))
    log.task(tid, ts.RecordAnalysis(**c))
    log.task(tid, ts.AssignTask(**c, agent_id="a1"))
    [old] = log.agent("a1", ag.StartAgentTask(at=T0, actor="a1", task_id=tid, attempt=1))
    log.task(tid, ts.RequeueTask(**c, reason="agent_lost", agent_id="a1"))  # attempt 2
    log.task(tid, ts.AssignTask(**c, agent_id="a1"))
    log.task(tid, ts.StartTask(**c, agent_id="a1", causation_id=old.event_id))  # acted on the attempt-1 report
    v = check_log(log.records, {**ISSUES, tid: ("chaos/calc", 9)}, expected_final=("review", "in_progress"))
    assert v.illegal == 1 and "stale report" in v.violations[0]


def test_injected_poison_is_not_counted_but_other_bad_messages_are():
    from events.codec import BadMessage

    log = Log()
    happy_path(log)
    n = len(log.records)
    bad = [LogRecord(n + i, "ccc.task.chaos_calc-1.assigned.a1", T0.timestamp(),
                     BadMessage(seq=n + i, subject="ccc.task.chaos_calc-1.assigned.a1", error="poison"))
           for i in (1, 2)]
    records = log.records + bad
    assert check_log(records, ISSUES, injected_bad={n + 1, n + 2}).ok
    v = check_log(records, ISSUES, injected_bad={n + 1})
    assert v.illegal >= 1 and v.bad_events == 1


def test_percentile():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.5) == 1.5


# -- the CI loop's judgement, pure (but for the forge's branch) -----------------------------------
CI_TASK = "chaos_ci-1"
CI_ISSUES = {CI_TASK: (CI_REPO, 1)}
CI_BRANCH = "ccc/chaos_ci-1-add-feature-1"
RED = CheckRun(name="ccc/test", conclusion="failure", log_tail="AssertionError: features/f1.py still holds a FIXME")
GREEN = CheckRun(name="ccc/test", conclusion="success")


def ci_loop_path(log: Log, heads: list[str], agent: str = "a1") -> None:
    """A task through the CI loop as the actors write it, all in attempt 1: a round per
    head (its implementation, then CI fixes), each pushed and reported by ``agent``;
    every head but the last fails its checks because of the change, the last passes."""
    c = {"at": T0, "actor": "coordinator"}
    a = {"at": T0, "actor": agent, "task_id": CI_TASK, "attempt": 1}
    log.agent(agent, ag.RegisterAgent(at=T0, actor=agent, agent_id=agent, specialties=("backend",)))
    log.task(CI_TASK, ts.CreateTask(**c, task_id=CI_TASK,
                                    issue=IssueRef(source="local", repo=CI_REPO, number=1, title="Add feature 1")))
    log.task(CI_TASK, ts.StartAnalysis(**c))
    log.task(CI_TASK, ts.RecordAnalysis(**c, analysis=Analysis(specialty="backend")))
    for i, head in enumerate(heads):
        log.task(CI_TASK, ts.AssignTask(**c, agent_id=agent))
        [started] = log.agent(agent, ag.StartAgentTask(**a))
        log.task(CI_TASK, ts.StartTask(**c, agent_id=agent, causation_id=started.event_id))
        log.task(CI_TASK, ts.StartTests(**c, agent_id=agent, files_changed=("features/f1.py",)))
        log.agent(agent, ag.ReportWork(**a, report=ChangesPushed(branch=CI_BRANCH, commit=head)))
        [pr] = log.agent(agent, ag.ReportWork(**a, report=PullRequestOpened(branch=CI_BRANCH, head_sha=head)))
        log.task(CI_TASK, ts.OpenPullRequest(**c, agent_id=agent, branch=CI_BRANCH, head_sha=head,
                                             causation_id=pr.event_id))
        log.agent(agent, ag.ReleaseAgentTask(**a))
        log.task(CI_TASK, ts.RecordChecks(**c, head_sha=head, checks=(GREEN if i == len(heads) - 1 else RED,),
                                          base={"ccc/test": "success"}))


def ci_forge(tmp_path: Path) -> tuple[LocalForge, str]:
    """The CI-loop repository with the task's branch; returns the forge and the branch's head."""
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo(CI_REPO, CI_REPO_FILES)
    head = forge.branch_sha(CI_REPO, "main")
    gitops.run_git(forge.repo_path(CI_REPO), "update-ref", f"refs/heads/{CI_BRANCH}", head)
    return forge, head


def test_rounds_of_one_attempt_are_not_duplicates_but_a_repeat_within_a_round_is():
    """A CI fix round assigns, pushes and reports the pull request again in the same
    attempt: counted per round, not as a duplicate; a second report in one round is one."""
    log = Log()
    ci_loop_path(log, ["a" * 40, "b" * 40])
    v = check_log(log.records, CI_ISSUES, expected_final=("review",))
    assert v.ok and v.final_states == {"review": 1}, v.violations
    pr = [r for r in log.records if r.item.__struct_config__.tag == "agent.pr_opened"][-1]
    from msgspec.structs import replace

    again = replace(pr.item, version=log.agents["a1"].version + 1, event_id="a1:again")
    v = check_log([*log.records, LogRecord(len(log.records) + 1, pr.subject, pr.at, again)], CI_ISSUES,
                  expected_final=("review",))
    assert v.duplicated == 1
    assert f"duplicated: {CI_TASK} attempt 1, CI fix 1: 2 agent.pr_opened reports" in v.violations


def test_the_ci_loop_judgement_passes_one_fix_round_green_on_the_forge_head(tmp_path):
    forge, head = ci_forge(tmp_path)
    log = Log()
    ci_loop_path(log, ["a" * 40, head])
    v = check_ci_loop(log.records, forge, "ccc")
    assert (v.duplicated, v.other) == (0, 0), v.violations
    assert v.notes == [("rounds: 1 CI fix round(s) for 1 task(s); 0 round(s) taken from a lost agent; "
                        "attempts {1: 1}")]


def test_the_ci_loop_judgement_flags_extra_rounds_a_second_green_and_a_stale_branch(tmp_path):
    forge, head = ci_forge(tmp_path)
    log = Log()
    ci_loop_path(log, ["a" * 40, "b" * 40, "c" * 40])  # two fix rounds; the forge holds neither
    passed = log.records[-1]
    assert passed.item.__struct_config__.tag == "task.checks_passed"
    from msgspec.structs import replace

    twice = replace(passed.item, version=passed.item.version + 1, event_id=f"{CI_TASK}:again")
    v = check_ci_loop([*log.records, LogRecord(passed.seq + 1, passed.subject, passed.at, twice)], forge, "ccc")
    text = "\n".join(v.violations)
    assert "2 CI fix round(s) queued, ci_fixes 2; expected exactly 1" in text
    assert "checks failed 2 time(s) (change, change)" in text
    assert v.duplicated == 1 and f"2 task.checks_passed for head {'c' * 10}" in text
    assert f"holds {head[:10]}, not {'c' * 10}" in text


# -- the 3-node cluster --------------------------------------------------------------------
def secure_dir(tmp_path: Path, ns: Namespace) -> SecureDir:
    secure = SecureDir.of(tmp_path)
    secure.init(ns)
    return secure


def secure_cluster(tmp_path: Path, ns: Namespace) -> NatsCluster:
    secure = secure_dir(tmp_path, ns)
    return NatsCluster(tmp_path / "nats", secure=secure, js_key=secure.js_key())


async def test_three_node_cluster_elects_a_new_leader_and_keeps_acknowledged_writes(tmp_path):
    """Secure, as ``ccc chaos`` runs it: TLS and users on the client port, TLS between
    the nodes (the election and the replication run over those routes), and every
    node's store encrypted."""
    ns = Namespace("clustertest")
    with secure_cluster(tmp_path, ns) as cluster:
        assert len(cluster.url.split(",")) == 3 and all(u.startswith("tls://") for u in cluster.url.split(","))
        conf = cluster.nodes[0].config_path.read_text()
        assert 'include "../../secure/auth.conf"' in conf  # relative: nats-server joins include paths
        assert conf.count("verify: true") == 2  # the client port and the routes
        assert cluster.js_key not in conf  # the store key comes from the environment
        nc = await connect(cluster.url, name="test-cluster", quiet=True, kit=cluster.secure.kit("admin"))
        try:
            await wait_for_jetstream(nc)
            await provision(nc, ns, replicas=3)
            info = await nc.jetstream().stream_info(ns.events_stream)
            assert info.config.num_replicas == 3
            leader = await wait_for_leader(nc, ns.events_stream)
            assert leader in {"n1", "n2", "n3"}
            js = nc.jetstream(timeout=2.0)

            async def append(i: int) -> None:
                started = time.monotonic()
                while True:  # retry with the same dedup id (e.g. across the election)
                    try:
                        await js.publish(f"{ns.prefix}.agent.a.x", b"{}", headers={"Nats-Msg-Id": f"m{i}"})
                        return
                    except Exception:  # noqa: BLE001 - no leader (yet), or a slow ack
                        assert time.monotonic() - started < 30, "no stream leader for 30 s"
                        await asyncio.sleep(0.05)

            for i in range(20):
                await append(i)
            cluster.kill(leader)
            await append(20)
            assert await stream_leader(nc, ns.events_stream) not in (None, leader)
            records = await read_log(nc, ns)
            assert [r.seq for r in records] == list(range(1, 22))  # nothing acknowledged was lost
            cluster.start_node(leader)  # it rejoins on the same ports and store
            assert cluster.node(leader).running
            # encrypted at rest on every node: an issue title never reaches a disk in plaintext
            marker = f"Plaintext-marker-{uuid.uuid4().hex}"
            issue = new_issue(repo="chaos/calc", title=marker, number=7, actor="test")
            await wait_for_leader(nc, ns.issues_stream)
            await js.publish(ns.subject(issue.rel_subject), encode(issue), stream=ns.issues_stream)
            for node in cluster.nodes:
                assert "Encryption:      ChaCha20-Poly1305" in node.log_file.read_text()
            stores = [n.dir / "jetstream" for n in cluster.nodes]
            assert not [p for d in stores for p in d.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
        finally:
            await nc.close()


class RogueNode:
    """A nats-server of our own that tries to join the cluster as a route: no users of
    its own (a client of it may read everything it receives), routes to every node."""

    def __init__(self, root: Path, name: str, cluster: NatsCluster, cert: Path, key: Path) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.port, cluster_port = free_ports(2)
        # a route to every node (a message crosses one route only: it must reach each)
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in cluster.nodes)
        conf = self.dir / "rogue.conf"
        conf.write_text(
            f'server_name: "{name}"\nlisten: "127.0.0.1:{self.port}"\n'
            "cluster {\n"
            f'  name: "{cluster.name}"\n  listen: "127.0.0.1:{cluster_port}"\n'
            f"  routes: [{routes}]\n"
            # it trusts the routes' CA (public, like any CA certificate): only its own
            # certificate decides whether the node lets it in
            f'  tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{cluster.routes_dir / "ca.pem"}", '
            "verify: true, timeout: 3 }\n"
            "}\n")
        self.proc = subprocess.Popen([server_binary(), "-c", str(conf), "-l", str(self.dir / "log")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    async def hears(self, admin, subject: str, seconds: float) -> bool:
        """Does a client of this node receive what the cluster's admin publishes?"""
        nc = None
        deadline = time.monotonic() + seconds
        while nc is None:
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{self.port}", allow_reconnect=False,
                                        max_reconnect_attempts=1, connect_timeout=1)
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, "the rogue node did not start"
                await asyncio.sleep(0.1)
        try:
            sub = await nc.subscribe(subject)
            await nc.flush()
            while time.monotonic() < deadline:
                await admin.publish(subject, b"secret")
                await admin.flush()
                try:
                    await sub.next_msg(timeout=0.5)
                    return True
                except nats.errors.TimeoutError:
                    continue
            return False
        finally:
            await nc.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


async def test_secure_cluster_routes_admit_only_certificates_of_the_routes_ca(tmp_path):
    """Every agent holds a client certificate of the clients' CA: were the routes to
    trust that CA, an agent's kit could join the cluster as a route and read (and
    write) everything, past its permissions. The routes have a CA of their own."""
    ns = Namespace("routetest")
    with secure_cluster(tmp_path, ns) as cluster:
        agent = cluster.secure.add_agent(ns, "a1")
        subject = f"{ns.prefix}.task.rogue-probe"
        admin = await connect(cluster.url, name="test-rogue", quiet=True, kit=cluster.secure.kit("admin"))
        rogue = RogueNode(tmp_path, "rogue", cluster, agent.cert, agent.key)
        try:
            assert not await rogue.hears(admin, subject, 6.0)
        finally:
            rogue.stop()
        # the control: the same node with a certificate of the routes' CA does join
        routes_ca = CertificateAuthority.load(cluster.routes_dir / "ca.pem", cluster.routes_dir / "ca-key.pem")
        routes_ca.issue(tmp_path / "n4.pem", tmp_path / "n4-key.pem", common_name="ccc route n4", server=True,
                        hosts=("127.0.0.1", "localhost"))
        member = RogueNode(tmp_path, "n4", cluster, tmp_path / "n4.pem", tmp_path / "n4-key.pem")
        try:
            assert await member.hears(admin, subject, 20.0)
        finally:
            member.stop()
            await admin.close()


async def test_secure_cluster_admits_and_drops_an_agent_on_every_node_without_a_restart(tmp_path):
    ns = Namespace("reloadtest")
    with secure_cluster(tmp_path, ns) as cluster:
        pids = cluster.pids()
        added = cluster.secure.add_agent(ns, "late")
        # what a remote machine holds (revoking deletes the kit here, not there)
        kit = KitFiles.load(shutil.copytree(added.seed.parent, tmp_path / "remote-kit"))
        assert cluster.reload() == ["n1", "n2", "n3"]
        held = []
        for node in cluster.nodes:
            url = node.url.replace("nats://", "tls://")

            async def admitted(url=url) -> bool:
                try:
                    held.append(await connect(url, name="test-late", quiet=True, kit=kit, reconnect=False))
                except StoreUnavailable:
                    return False
                return True

            await eventually(admitted, timeout=10)
        assert cluster.secure.revoke_agent(ns, "late")
        cluster.reload()
        await eventually(lambda: not any(nc.is_connected for nc in held), timeout=10)
        for node in cluster.nodes:
            with pytest.raises(StoreUnavailable):
                await connect(node.url.replace("nats://", "tls://"), quiet=True, kit=kit, reconnect=False)
        assert cluster.pids() == pids  # no node was restarted
        for nc in held:
            await nc.close()


def test_a_secure_cluster_needs_an_initialised_secure_dir(tmp_path):
    with pytest.raises(ConfigError, match="holds no cluster credentials"):
        NatsCluster(tmp_path / "nats", secure=SecureDir.of(tmp_path))


def test_the_sandbox_reports_what_the_server_refused_its_processes(tmp_path):
    sb = Sandbox(tmp_path, Namespace("denials"), ChaosOptions(quick=True), random.Random(1))
    proc = sb.add("agent-1", ["true"])
    proc.err_path.write_text(
        '{"level": "info", "event": "agent.registered"}\n'
        '{"level": "warning", "event": "nats.error", "error": "nats: permissions violation for publish to '
        '\\"denials.dlq.agent-agent-1\\""}\n')
    [found] = sb.denials()
    assert found.startswith("security: agent-1 was refused") and "denials.dlq" in found
    assert sb.security is not None and sb.security.secure.exists()  # secure unless told otherwise
    assert Sandbox(tmp_path / "plain", Namespace("denials"), ChaosOptions(insecure=True),
                   random.Random(1)).security is None


# -- scenarios through the Python API ---------------------------------------------------------
QUICK = ChaosOptions(quick=True, tasks=12, run_timeout=90.0)


@pytest.mark.parametrize("name", ["coordinator", "agent", "duplicates-and-poison"])
async def test_quick_scenario(name, tmp_path):
    [result] = await run_chaos([name], msgspec_replace(QUICK, work_dir=str(tmp_path)))
    assert result.runs == 1 and result.tasks >= 12
    assert result.faults > 0
    # secure (the default), and checked to be: strangers refused, nothing refused to the actors
    assert result.secure
    assert any("security: on" in n and "strangers (no certificate, no user, plain text) refused" in n
               for n in result.notes), result.notes
    if not result.ok and SCENARIOS[name].expected_failure:
        pytest.xfail(f"known bug: {SCENARIOS[name].expected_failure} | {result.violations[:3]}")
    assert result.lost == 0 and result.duplicated == 0, result.violations
    assert result.other == 0, result.violations
    if name == "coordinator" and result.recovery_max is not None:  # None: every sample censored
        assert result.target_met, result


async def test_ci_loop_scenario_kills_the_coordinator_mid_ci_and_an_agent_in_a_fix_round(tmp_path):
    """Three issues whose first push fails the forge's CI and whose fix passes: the
    coordinator (which runs the CI) is killed while checks run, an agent while it works
    on a fix round. Every task ends green once, after exactly one fix round."""
    options = msgspec_replace(QUICK, tasks=3, run_timeout=240.0, work_dir=str(tmp_path))
    [result] = await run_chaos(["ci-loop"], options)
    assert result.runs == 1 and result.tasks == 3 and result.faults == 2, result
    assert result.lost == 0 and result.duplicated == 0 and result.other == 0, result.violations
    notes = "\n".join(result.notes)
    # one fix round per task; the killed agent's (one or two: its capacity) re-queued
    assert re.search(r"rounds: 3 CI fix round\(s\) for 3 task\(s\); [12] round\(s\) taken from a lost agent",
                     notes), notes
    assert "recovery: agent killed in a CI fix round -> the round re-queued" in notes, notes
    # the figure is read from the log; the kill may (rarely) land between two runs
    assert ("recovery: coordinator killed mid-CI (its first push) -> " in notes
            or "interrupted no run" in notes), notes
    assert result.recovery_max is not None and result.target_met, result


def msgspec_replace(options: ChaosOptions, **changes) -> ChaosOptions:
    import msgspec

    return msgspec.structs.replace(options, **changes)


# -- and one through the CLI -------------------------------------------------------------------
def test_cli_runs_a_scenario_and_prints_one_json_object(tmp_path):
    result = subprocess.run(
        [*CCC, "chaos", "--quick", "--scenario", "two-coordinators", "--tasks", "6", "--json",
         "--work-dir", str(tmp_path)],
        check=False, env=clean_env(), capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout + result.stderr
    row = lines[0]
    assert row["scenario"] == "two-coordinators" and row["runs"] == 1 and row["tasks"] == 6
    assert row["secure"] is True  # the default
    assert {"lost", "duplicated", "other", "recovery_p50", "recovery_max"} <= row.keys()
    assert result.returncode == (0 if row["ok"] else 1), result.stderr
    assert row["lost"] == 0 and row["duplicated"] == 0, row["violations"]


def test_cli_runs_the_old_insecure_mode_on_request(tmp_path):
    result = subprocess.run(
        [*CCC, "chaos", "--quick", "--insecure", "--scenario", "two-coordinators", "--tasks", "6", "--json",
         "--work-dir", str(tmp_path)],
        check=False, env=clean_env(), capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    [row] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert row["secure"] is False and row["ok"], row["violations"]
    assert "security: OFF" in " ".join(row["notes"])
    assert "warning: --insecure" in result.stderr


def test_cli_rejects_an_unknown_scenario():
    result = subprocess.run([*CCC, "chaos", "--scenario", "nope"], check=False, env=clean_env(), capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "unknown nope" in result.stderr


def test_a_taken_task_may_be_finished_by_its_old_agent_in_a_later_round_but_not_in_the_attempt_it_lost():
    """The agent killed in a fault comes back with the same id: a CI fix round of the
    attempt another agent took over may go to it (new work), but the pull request the task
    ends with must not come from the attempt that was taken from it."""
    c = {"at": T0, "actor": "coordinator"}
    log = Log()
    log.task(CI_TASK, ts.CreateTask(**c, task_id=CI_TASK,
                                    issue=IssueRef(source="local", repo=CI_REPO, number=1, title="Add feature 1")))
    log.task(CI_TASK, ts.StartAnalysis(**c))
    log.task(CI_TASK, ts.RecordAnalysis(**c, analysis=Analysis(specialty="backend")))
    log.task(CI_TASK, ts.AssignTask(**c, agent_id="a1"))
    t_kill = log.records[-1].at + 0.5
    log.task(CI_TASK, ts.RequeueTask(**c, reason="agent_lost", agent_id="a1"))  # attempt 2
    for agent, head, check in (("a2", "a" * 40, RED), ("a1", "b" * 40, GREEN)):  # a1's is the fix round
        log.task(CI_TASK, ts.AssignTask(**c, agent_id=agent))
        log.task(CI_TASK, ts.StartTask(**c, agent_id=agent))
        log.task(CI_TASK, ts.StartTests(**c, agent_id=agent, files_changed=("features/f1.py",)))
        log.task(CI_TASK, ts.OpenPullRequest(**c, agent_id=agent, branch=CI_BRANCH, head_sha=head))
        log.task(CI_TASK, ts.RecordChecks(**c, head_sha=head, checks=(check,), base={"ccc/test": "success"}))
    assert log.tasks[CI_TASK].status == "review" and log.tasks[CI_TASK].ci_fixes == 1
    assert finished_by_other({CI_TASK: 1}, "a1", t_kill)(log.records) == []
    # the same log, had a1's fix round been assigned in the attempt it lost: flagged
    stale = [LogRecord(r.seq, r.subject, r.at, msgspec.structs.replace(r.item, attempt=1))
             if isinstance(r.item, TaskAssigned) and r.item.agent_id == "a1" and r.at > t_kill else r
             for r in log.records]
    assert finished_by_other({CI_TASK: 1}, "a1", t_kill)(stale) == [
        f"scenario: {CI_TASK} was finished by a1, the agent it was taken from, in attempt 1"]
