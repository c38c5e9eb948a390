"""The local forge's CI: LocalCIRunner on real bare repositories, running
``.ccc/test-command`` in the agents' sandbox (bubblewrap when it is installed), and the
ForgeCI actor against a real nats-server, publishing ``issue.checks_completed`` facts for
a local task's pushes, re-runs and merge-queue candidates."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from actors.forge_ci import ForgeCI, Trigger, awaits, trigger_of
from events import task_state as ts
from events.checks import LOG_TAIL_CHARS, CheckRun
from events.codec import decode_issue
from events.issue import IssueChecksCompleted
from events.refs import split_ref
from events.subjects import task_id_for
from events.task import IssueRef
from infra.adapters.forge.local import LocalForge
from infra.adapters.forge.local_ci import (
    CHECK_NAME,
    LocalCIRunner,
    RepoFile,
    checks_completed,
    conclusion_of,
    log_text,
    plan_test_command,
)
from infra.adapters.git.branches import GitBranches
from infra.adapters.git.sandbox import BwrapSandbox, NoSandbox, Sandbox
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.obs.masking import mask_secrets
from projections.live import LiveReadModel
from tests.conftest import eventually
from tests.integration.test_git_branches import push_commit

pytestmark = pytest.mark.timeout(90)
REPO = "acme/app"
SHA = "0123456789abcdef0123456789abcdef01234567"
FAKE_SECRET = "ghp_" + "Zq8Xw7Vu6Ts5Rq4Po3Nm2Lk1Ji0Hg9Fe8Dc"  # a GitHub token's format, no real one
HAS_BWRAP = shutil.which("bwrap") is not None and shutil.which("prlimit") is not None
BASE_FILES = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    ".ccc/test-command": "# the repository's tests\necho 'base: 1 passed'\n",
}


def agent_sandbox(**kw) -> Sandbox:
    """The agents' sandbox: bubblewrap where it is installed (CI installs it), else none."""
    return BwrapSandbox(**kw) if HAS_BWRAP else NoSandbox()


def now() -> datetime:
    return datetime.now(UTC)


def local_task(number: int, *, head_sha: str, branch: str, base_branch: str = "main",
               files_changed: tuple[str, ...] = ("calc.py",)) -> list:
    """The commands that bring a local task to ``checking`` with its PR's head at ``head_sha``."""
    tid = task_id_for(REPO, number, "local")
    issue = IssueRef(source="local", repo=REPO, number=number, title="Fix add")
    return [
        ts.CreateTask(at=now(), actor="c", task_id=tid, issue=issue),
        ts.StartAnalysis(at=now(), actor="c"),
        ts.RecordAnalysis(at=now(), actor="c"),
        ts.AssignTask(at=now(), actor="c", agent_id="agent-1"),
        ts.StartTask(at=now(), actor="c", agent_id="agent-1"),
        ts.StartTests(at=now(), actor="c", agent_id="agent-1", files_changed=files_changed),
        ts.OpenPullRequest(at=now(), actor="c", agent_id="agent-1", branch=branch, pr_number=number,
                           head_sha=head_sha, base_branch=base_branch),
    ]


def state_of(commands) -> ts.TaskState:
    state = None
    for c in commands:
        state = ts.fold(ts.decide(state, c), state)
    return state


@pytest.fixture
def forge(tmp_path: Path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo(REPO, BASE_FILES)
    return f


@pytest.fixture
def make_runner(nc, ns, store, forge, tmp_path):
    def make(timeout: float = 30.0, sandbox: Sandbox | None = None) -> LocalCIRunner:
        return LocalCIRunner(forge, sandbox or agent_sandbox(hide=[forge.root]),
                             ObjectStoreArtifacts(nc, ns.artifacts_bucket), mask_secrets,
                             work_dir=tmp_path / "ci", timeout=timeout)
    return make


async def stored_log(nc, ref: str) -> str:
    bucket, name = split_ref(ref)
    obs = await nc.jetstream().object_store(bucket)
    return (await obs.get(name)).data.decode()


async def published_facts(nc, ns) -> list[tuple[str, IssueChecksCompleted]]:
    """(Nats-Msg-Id, fact) of every checks fact on the issues stream, in order."""
    js = nc.jetstream()
    info = await js.stream_info(ns.issues_stream)
    out = []
    for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
        msg = await js.get_msg(ns.issues_stream, seq)
        fact = decode_issue(ns.rel(msg.subject), msg.data)
        if isinstance(fact, IssueChecksCompleted):
            out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), fact))
    return out


# -- pure parts -----------------------------------------------------------------------------------
def test_the_test_command_is_read_as_a_regular_file_with_one_command() -> None:
    assert plan_test_command(RepoFile("100644", b"# tests\n\n  python3 -m pytest -q  \nignored\n"), SHA) \
        .command == "python3 -m pytest -q"
    assert plan_test_command(RepoFile("100755", b"make test"), SHA).command == "make test"
    missing = plan_test_command(RepoFile(""), SHA)
    assert (missing.command, missing.conclusion) == (None, "skipped")
    assert ".ccc/test-command" in missing.message and SHA[:12] in missing.message
    for entry, why in ((RepoFile("120000"), "a symlink"), (RepoFile("160000"), "a submodule"),
                       (RepoFile("040000"), "a directory"), (RepoFile("100644", b"x" * 20), "larger than"),
                       (RepoFile("100644", b"\xff\xfe"), "not UTF-8"),
                       (RepoFile("100644", b"# none\n\n"), "holds no command")):
        plan = plan_test_command(entry, SHA, max_bytes=16)
        assert plan.command is None and plan.conclusion == "failure" and why in plan.message, (entry, plan)


def test_conclusions_logs_and_the_fact() -> None:
    assert [conclusion_of(0, False), conclusion_of(2, False), conclusion_of(0, True)] == \
        ["success", "failure", "timed_out"]
    text = log_text("make test", "ok\n", exit_code=2, timed_out=False, duration=1.25, timeout=60, sandbox="bwrap")
    assert text.startswith("$ make test\n") and "exit code 2 after 1.2 s" in text and "sandbox bwrap" in text
    assert "timed out after 60 s" in log_text("x", "", exit_code=-9, timed_out=True, duration=60, timeout=60,
                                             sandbox="none")
    task = state_of(local_task(7, head_sha=SHA, branch="ccc/acme_app-7-fix"))
    check = CheckRun(name=CHECK_NAME, conclusion="failure", log_tail="boom")
    fact = checks_completed(task, sha=SHA, ref="ccc/acme_app-7-fix", checks=(check,), base_sha="b" * 40,
                            base={CHECK_NAME: "success"}, at=now(), event_id="ci:x")
    assert (fact.source, fact.repo, fact.number, fact.pr_number, fact.head_sha, fact.branch) == \
        ("local", REPO, 7, 7, SHA, "ccc/acme_app-7-fix")
    assert fact.rel_subject == "issue.local.acme_app.7.checks_completed"
    assert fact.checks == (check,) and fact.base == {CHECK_NAME: "success"} and fact.event_id == "ci:x"


def test_triggers_and_what_is_awaited() -> None:
    cmds = local_task(3, head_sha=SHA, branch="ccc/b")
    state = state_of(cmds)
    events = ts.decide(state_of(cmds[:-1]), cmds[-1])
    trigger = trigger_of(events[0])
    assert trigger == Trigger(state.task_id, state.version, SHA, "ccc/b", 0, None)
    assert trigger.event_id == f"ci:{state.task_id}:{SHA}:{state.version}"
    assert awaits(state, trigger)
    assert not awaits(state, trigger._replace(sha="f" * 40))  # pushed over
    assert not awaits(state, trigger._replace(rerun=1))  # not the re-run it waits for
    # a flaky failure: the state machine asks for a re-run, which is then awaited
    rerun_events = ts.decide(state, ts.RecordChecks(
        at=now(), actor="c", head_sha=SHA, checks=(CheckRun(name=CHECK_NAME, conclusion="failure"),),
        base={CHECK_NAME: "success"}))
    after = ts.fold(rerun_events, state)
    rerun = trigger_of(rerun_events[-1])
    assert rerun.checks == (CHECK_NAME,) and rerun.rerun == 1
    assert awaits(after, rerun) and not awaits(after, trigger)
    assert trigger_of(ts.decide(None, cmds[0])[0]) is None  # task.created asks nothing of the CI


# -- the runner ---------------------------------------------------------------------------------------
async def test_a_passing_push(nc, forge, make_runner) -> None:
    head = push_commit(forge, REPO, "ccc/acme_app-1-fix", {
        "calc.py": "def add(a, b):\n    return b + a\n",
        ".ccc/test-command": "test -f calc.py && echo 'head: 3 passed'\n"})
    runner = make_runner()
    task = state_of(local_task(1, head_sha=head, branch="ccc/acme_app-1-fix"))
    fact = await runner.commit_pushed(task, head, "ccc/acme_app-1-fix")
    [check] = fact.checks
    assert (check.name, check.conclusion, check.started) == (CHECK_NAME, "success", True)
    assert "head: 3 passed" in check.log_tail and check.duration > 0
    assert (fact.head_sha, fact.branch, fact.base, fact.base_sha) == \
        (head, "ccc/acme_app-1-fix", {}, forge.branch_sha(REPO, "main"))  # a green head: no base run
    assert "head: 3 passed" in await stored_log(nc, check.log_ref)
    assert runner.runs == 1
    assert not list((runner.work_dir / "forge-ci" / "tasks").iterdir())  # the run's workspace is gone


async def test_a_failing_push_is_masked_and_compared_with_its_base(nc, forge, make_runner) -> None:
    failing = ("seq 1 3000; printf 'using %s\\n' \"" + FAKE_SECRET + "\"; "
               "echo 'FAILED test_calc.py::test_add - assert 3 == 4'; exit 1\n")
    head = push_commit(forge, REPO, "ccc/acme_app-2-fix", {".ccc/test-command": failing})
    runner = make_runner()
    task = state_of(local_task(2, head_sha=head, branch="ccc/acme_app-2-fix"))
    fact = await runner.commit_pushed(task, head, "ccc/acme_app-2-fix")
    [check] = fact.checks
    assert check.conclusion == "failure" and check.started
    assert "FAILED test_calc.py::test_add" in check.log_tail and "exit code 1" in check.log_tail
    assert FAKE_SECRET not in check.log_tail and "using ***" in check.log_tail
    assert len(check.log_tail) == LOG_TAIL_CHARS and "\n1\n2\n3\n" not in check.log_tail  # the tail only
    stored = await stored_log(nc, check.log_ref)
    assert FAKE_SECRET not in stored and "using ***" in stored and "\n1\n2\n3\n" in stored  # the whole log
    base = forge.branch_sha(REPO, "main")
    assert (fact.base_sha, fact.base) == (base, {CHECK_NAME: "success"})
    assert runner.runs == 2  # the head, then the base

    # another red push on the same base: the base's result comes from the cache
    again = push_commit(forge, REPO, "ccc/acme_app-2-fix", {"calc.py": "broken = True\n"})
    fact = await runner.commit_pushed(task, again, "ccc/acme_app-2-fix")
    assert fact.base == {CHECK_NAME: "success"} and runner.runs == 3


async def test_a_red_base_is_reported(forge, make_runner) -> None:
    push_commit(forge, REPO, "main", {".ccc/test-command": "echo 'main is broken'; exit 3\n"})
    head = push_commit(forge, REPO, "ccc/acme_app-3-fix", {"calc.py": "X = 1\n"})
    task = state_of(local_task(3, head_sha=head, branch="ccc/acme_app-3-fix"))
    fact = await make_runner().commit_pushed(task, head, "ccc/acme_app-3-fix")
    assert fact.checks[0].conclusion == "failure" and fact.base == {CHECK_NAME: "failure"}


async def test_a_run_that_does_not_finish_times_out(forge, make_runner) -> None:
    runner = make_runner(timeout=1.5)
    silent = push_commit(forge, REPO, "ccc/acme_app-4-fix", {".ccc/test-command": "sleep 30\n"})
    task = state_of(local_task(4, head_sha=silent, branch="ccc/acme_app-4-fix"))
    [check] = (await runner.commit_pushed(task, silent, "ccc/acme_app-4-fix")).checks
    assert check.conclusion == "timed_out" and check.started is False  # never printed: never started
    assert "timed out after 2 s" in check.log_tail
    talking = push_commit(forge, REPO, "ccc/acme_app-4-fix", {".ccc/test-command": "echo collecting; sleep 30\n"})
    [check] = (await runner.commit_pushed(task, talking, "ccc/acme_app-4-fix")).checks
    assert check.conclusion == "timed_out" and check.started is True and "collecting" in check.log_tail


async def test_no_test_command_is_a_skipped_check(forge, make_runner) -> None:
    head = push_commit(forge, REPO, "ccc/acme_app-5-fix", {".ccc/test-command": None})
    runner = make_runner()
    task = state_of(local_task(5, head_sha=head, branch="ccc/acme_app-5-fix"))
    fact = await runner.commit_pushed(task, head, "ccc/acme_app-5-fix")
    [check] = fact.checks
    assert check.conclusion == "skipped" and check.passed
    assert "no .ccc/test-command" in check.log_tail and check.log_ref
    assert runner.runs == 0 and fact.base == {}


async def test_a_symlinked_test_command_is_refused(forge, make_runner) -> None:
    head = push_commit(forge, REPO, "ccc/acme_app-6-fix", {".ccc/test-command": None},
                       symlinks={".ccc/test-command": "/proc/self/environ"})
    runner = make_runner()
    task = state_of(local_task(6, head_sha=head, branch="ccc/acme_app-6-fix"))
    fact = await runner.commit_pushed(task, head, "ccc/acme_app-6-fix")
    [check] = fact.checks
    assert check.conclusion == "failure" and "is a symlink: refused" in check.log_tail
    assert "PATH=" not in check.log_tail
    assert runner.runs == 1 and fact.base == {CHECK_NAME: "success"}  # only the base ran


async def test_no_sandbox_means_the_check_never_started(forge, make_runner) -> None:
    head = push_commit(forge, REPO, "ccc/acme_app-8-fix", {"calc.py": "X = 2\n"})
    runner = make_runner(sandbox=BwrapSandbox("/nonexistent/bwrap"))
    task = state_of(local_task(8, head_sha=head, branch="ccc/acme_app-8-fix"))
    [check] = (await runner.commit_pushed(task, head, "ccc/acme_app-8-fix")).checks
    assert (check.conclusion, check.started) == ("startup_failure", False)
    assert "could not start" in check.log_tail and "bubblewrap" in check.log_tail


async def test_the_command_runs_in_the_sandbox(forge, make_runner) -> None:
    if not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed here (bash .ci/system-deps.sh installs it)")
    # (the markers are quoted apart, so the command line shown in the log does not hold them)
    probe = (f'test "$(hostname)" = ccc-sandbox && echo "in-"sandbox; '
             f'ls {forge.root} 2>/dev/null && echo "FORGE-"VISIBLE; '
             f'touch /usr/ccc-probe 2>/dev/null && echo "SYSTEM-"WRITABLE; '
             'echo data > written.txt && echo "wrote-"repo; exit 0\n')
    head = push_commit(forge, REPO, "ccc/acme_app-9-fix", {".ccc/test-command": probe})
    task = state_of(local_task(9, head_sha=head, branch="ccc/acme_app-9-fix"))
    runner = make_runner()
    [check] = (await runner.commit_pushed(task, head, "ccc/acme_app-9-fix")).checks
    assert check.conclusion == "success", check.log_tail
    assert "sandbox bwrap" in check.log_tail and "in-sandbox" in check.log_tail and "wrote-repo" in check.log_tail
    assert "FORGE-VISIBLE" not in check.log_tail and "SYSTEM-WRITABLE" not in check.log_tail
    assert forge.branch_sha(REPO, "ccc/acme_app-9-fix") == head  # the forge is untouched


# -- the actor ----------------------------------------------------------------------------------------
class LocalTask:
    """A local task driven through the store the way the coordinator drives it."""

    def __init__(self, store, number: int) -> None:
        self.store, self.number = store, number
        self.id = task_id_for(REPO, number, "local")

    async def do(self, command) -> list:
        state, last = await self.store.load_task(self.id)
        events = ts.decide(state, command)
        await self.store.append(events, expected_last_seq=last)
        return events

    async def open(self, head: str, branch: str) -> None:
        for command in local_task(self.number, head_sha=head, branch=branch):
            await self.do(command)

    async def state(self) -> ts.TaskState:
        return (await self.store.load_task(self.id))[0]


@pytest.mark.parametrize("with_live_model", [False, True])
async def test_the_actor_runs_pushes_reruns_and_merge_candidates(nc, ns, store, forge, make_runner, tmp_path,
                                                                 with_live_model) -> None:
    live = LiveReadModel(store) if with_live_model else None
    if live is not None:
        await live.start()
    runner = make_runner()
    ci = ForgeCI(nc, ns, [runner], live=live)
    await ci.start()
    try:
        branch = "ccc/acme_app-11-fix"
        head = push_commit(forge, REPO, branch, {".ccc/test-command": "echo 'head: 2 passed'\n"})
        task = LocalTask(store, 11)
        await task.open(head, branch)
        state = await task.state()

        async def facts() -> list[tuple[str, IssueChecksCompleted]]:
            return await published_facts(nc, ns)

        await eventually(lambda: _count(facts, 1), timeout=30)
        [(msg_id, fact)] = await facts()
        assert msg_id == fact.event_id == f"ci:{task.id}:{head}:{state.version}"
        assert (fact.source, fact.repo, fact.number, fact.head_sha, fact.branch) == ("local", REPO, 11, head, branch)
        assert fact.checks[0].conclusion == "success"

        # the coordinator records a (made-up) flaky failure: a re-run is asked for and run
        rerun = await task.do(ts.RecordChecks(
            at=now(), actor="c", head_sha=head, checks=(CheckRun(name=CHECK_NAME, conclusion="failure",
                                                                 log_tail="boom"),), base={CHECK_NAME: "success"}))
        assert rerun[-1].rerun == 1
        await eventually(lambda: _count(facts, 2), timeout=30)
        msg_id, fact = (await facts())[-1]
        assert msg_id == f"ci:{task.id}:{head}:{rerun[-1].version}" and fact.branch == branch

        # green, approved, queued: the candidate's checks run on the queue's ref
        await task.do(ts.RecordChecks(at=now(), actor="c", head_sha=head, checks=fact.checks))
        await task.do(ts.ApprovePullRequest(at=now(), actor="c", by="maintainer", merge_queue=True))
        branches = GitBranches(forge.clone_url, lambda repo: {}, tmp_path / "cache")
        sha, base_sha, _ = await branches.prepare_merge(REPO, "main", branch, "ccc-queue/acme_app-11")
        testing = await task.do(ts.StartMergeTest(at=now(), actor="c", queue_ref="ccc-queue/acme_app-11",
                                                  queue_sha=sha, base_sha=base_sha))
        await eventually(lambda: _count(facts, 3), timeout=30)
        msg_id, fact = (await facts())[-1]
        assert msg_id == f"ci:{task.id}:{sha}:{testing[-1].version}"
        assert (fact.head_sha, fact.branch, fact.checks[0].conclusion) == (sha, "ccc-queue/acme_app-11", "success")

        # a flaky failure of the candidate: re-run in the queue, on the queue's ref
        again = await task.do(ts.RecordChecks(
            at=now(), actor="c", head_sha=sha, checks=(CheckRun(name=CHECK_NAME, conclusion="failure",
                                                                log_tail="boom"),), base={CHECK_NAME: "success"}))
        assert type(again[-1]).__name__ == "TaskChecksRerun" and (await task.state()).status == "merging"
        await eventually(lambda: _count(facts, 4), timeout=30)
        msg_id, fact = (await facts())[-1]
        assert msg_id == f"ci:{task.id}:{sha}:{again[-1].version}"
        assert (fact.head_sha, fact.branch) == (sha, "ccc-queue/acme_app-11")
        assert ci.published == 4 and runner.runs == 4
    finally:
        await ci.stop()
        if live is not None:
            await live.stop()


async def _count(facts, n: int) -> bool:
    return len(await facts()) >= n


async def test_the_actor_skips_what_is_not_awaited_and_publishes_once(nc, ns, store, forge, make_runner) -> None:
    branch = "ccc/acme_app-12-fix"
    first = push_commit(forge, REPO, branch, {"calc.py": "X = 1\n"})
    task = LocalTask(store, 12)
    await task.open(first, branch)
    state = await task.state()
    runner = make_runner()
    ci = ForgeCI(nc, ns, [runner])  # not started: the test hands it the triggers
    trigger = Trigger(task.id, state.version, first, branch, 0, None)

    fact = await ci.handle(trigger)
    assert fact is not None and fact.event_id == trigger.event_id
    again = await ci.handle(trigger)  # redelivered (a crash before the ack): the same id
    assert again.event_id == fact.event_id
    assert [m for m, _ in await published_facts(nc, ns)] == [trigger.event_id]  # one fact on the stream

    assert await ci.handle(trigger._replace(sha="f" * 40)) is None  # a head pushed over
    assert await ci.handle(trigger._replace(rerun=2)) is None  # a re-run not asked for
    await task.do(ts.RecordChecks(at=now(), actor="c", head_sha=first, checks=fact.checks))  # answered
    assert await ci.handle(trigger) is None
    assert ci.skipped == 3 and runner.runs == 2

    # tasks of a forge this actor has no runner for are not its business
    gh = ForgeCI(nc, ns, [])
    assert await gh.handle(trigger) is None and gh.skipped == 1


async def test_runner_errors_are_retried_or_dropped(nc, ns, store, forge, make_runner) -> None:
    """A permanent error (the commit is gone from the forge) is logged and acked; the loop
    goes on with the next task."""
    runner = make_runner()
    ci = ForgeCI(nc, ns, [runner])
    await ci.start()
    try:
        gone = LocalTask(store, 13)
        await gone.open("e" * 40, "ccc/acme_app-13-fix")  # a head the forge never had
        branch = "ccc/acme_app-14-fix"
        head = push_commit(forge, REPO, branch, {"calc.py": "X = 3\n"})
        ok = LocalTask(store, 14)
        await ok.open(head, branch)
        await eventually(lambda: ci.skipped_errors == 1 and ci.published == 1, timeout=30)
        [(_, fact)] = await published_facts(nc, ns)
        assert fact.number == 14
    finally:
        await ci.stop()
