"""ForgeSync against a real nats-server and the real PyGithub client talking to the
local fake GitHub: task events in, labels and one tracking comment out."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from actors.forge_sync import ForgeSync, render_comment, tracking_marker
from events import task_state as ts
from events.subjects import task_id_for
from events.task import Analysis, IssueRef, Usage
from infra.adapters.obs.masking import mask_secrets
from projections.live import LiveReadModel
from tests.conftest import eventually
from tests.fakes.github_api import FakeGitHub, fake_github_fixture  # noqa: F401 - fixture
from tests.integration.test_forge_github import make_forge

pytestmark = pytest.mark.timeout(60)
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = "acme/app"


class Task:
    """Drives one task through the state machine the way the coordinator does."""

    def __init__(self, store, repo: str, number: int, source: str = "github") -> None:
        self.store, self.id = store, task_id_for(repo, number, source)
        self.issue = IssueRef(source=source, repo=repo, number=number, title="Fix the login",
                              url=f"https://github.com/{repo}/issues/{number}")

    async def do(self, command) -> None:
        state, last = await self.store.load_task(self.id)
        await self.store.append(ts.decide(state, command), expected_last_seq=last)

    async def create(self) -> None:
        await self.do(ts.CreateTask(at=AT, actor="c", task_id=self.id, issue=self.issue))


def ccc_labels(fake: FakeGitHub, number: int) -> list[str]:
    return [x for x in fake.issue_labels(REPO, number) if x.startswith("ccc:")]


def tracking(fake: FakeGitHub, number: int, task_id: str) -> list[str]:
    return [c["body"] for c in fake.comments_on(REPO, number) if tracking_marker(task_id) in c["body"]]


def reflects(fake: FakeGitHub, number: int, task_id: str, label: str, *needles: str):
    def check() -> bool:
        bodies = tracking(fake, number, task_id)
        return (ccc_labels(fake, number) == [label] and len(bodies) == 1
                and all(n in bodies[0] for n in needles))
    return check


@pytest.fixture
def forge(fake_github):
    f = make_forge(fake_github)
    yield f
    f.close()


@pytest.mark.parametrize("with_live_model", [False, True])
async def test_task_lifecycle_is_reflected_on_the_issue(nc, ns, store, fake_github, forge, with_live_model):
    n = fake_github.add_issue(REPO, "Fix the login", labels=["bug"])
    fake_github.repos[REPO]["comments"][1] = {"id": 1, "issue": n, "body": "please", "user": "alice"}
    live = LiveReadModel(store) if with_live_model else None
    if live is not None:
        await live.start()
    sync = ForgeSync(nc, ns, forge, mask=mask_secrets, live=live)
    await sync.start()
    task = Task(store, REPO, n)
    try:
        await task.create()
        await task.do(ts.StartAnalysis(at=AT, actor="c"))
        await task.do(ts.RecordAnalysis(at=AT, actor="c", analysis=Analysis(
            specialty="backend", usage=Usage(input_tokens=1200, output_tokens=300, dollars=0.0125))))
        await eventually(reflects(fake_github, n, task.id, "ccc:queued", "queued, waiting for an agent",
                                  "1 of 3", "$0.0125 (1,200 input / 300 output tokens)"))

        await task.do(ts.AssignTask(at=AT, actor="c", agent_id="agent-1"))
        await eventually(reflects(fake_github, n, task.id, "ccc:in-progress", "assigned to an agent",
                                  "| Agent | `agent-1` |"))
        await task.do(ts.StartTask(at=AT, actor="c", agent_id="agent-1"))
        await eventually(reflects(fake_github, n, task.id, "ccc:in-progress", "implementing"))
        await task.do(ts.StartTests(at=AT, actor="c", agent_id="agent-1", files_changed=("a.py",),
                                    usage=Usage(input_tokens=800, output_tokens=700, dollars=0.5)))
        await eventually(reflects(fake_github, n, task.id, "ccc:in-progress", "running the tests",
                                  "$0.5125 (2,000 input / 1,000 output tokens)"))

        pr_url = "https://github.com/acme/app/pull/9"
        await task.do(ts.OpenPullRequest(at=AT, actor="c", agent_id="agent-1", branch="ccc/task-x",
                                         pr_url=pr_url, pr_number=9, draft=True, tests_passed=7, tests_failed=1))
        await eventually(reflects(fake_github, n, task.id, "ccc:checking", "checks running",
                                  f"[#9]({pr_url}) (draft)", "7 passed, 1 failed"))

        await task.do(ts.FailTask(at=AT, actor="c", reason="pull request closed | not merged <b>",
                                  phase="review", retryable=False))
        await eventually(reflects(fake_github, n, task.id, "ccc:failed", "**Failed** in `review`",
                                  "pull request closed \\| not merged &lt;b&gt;"))

        # other labels and the human's comment are untouched; exactly one tracking comment
        assert "bug" in fake_github.issue_labels(REPO, n)
        assert fake_github.comments_on(REPO, n)[0]["body"] == "please"
        assert len(tracking(fake_github, n, task.id)) == 1
        state, _ = await store.load_task(task.id)
        assert tracking(fake_github, n, task.id)[0] == render_comment(state, mask_secrets)
    finally:
        await sync.stop()
        if live is not None:
            await live.stop()


async def test_replay_by_a_fresh_sync_writes_nothing_new(nc, ns, store, fake_github, forge):
    n = fake_github.add_issue(REPO, "x")
    task = Task(store, REPO, n)
    await task.create()
    await task.do(ts.StartAnalysis(at=AT, actor="c"))
    await task.do(ts.RecordAnalysis(at=AT, actor="c"))
    await task.do(ts.CancelTask(at=AT, actor="user", reason="not needed"))
    first = ForgeSync(nc, ns, forge, mask=mask_secrets, name="sync-a")
    await first.start()
    await eventually(reflects(fake_github, n, task.id, "ccc:cancelled", "Reason: not needed"))
    await eventually(lambda: first.handled == 4)
    await first.stop()
    body = tracking(fake_github, n, task.id)[0]
    writes = len(fake_github.writes())

    # a new process with an empty cache replays every event (its own durable): the
    # issue already shows the current state, so it only reads
    second = ForgeSync(nc, ns, make_forge(fake_github), mask=mask_secrets, name="sync-b")
    await second.start()
    await eventually(lambda: second.handled == 4)
    await second.stop()
    assert len(fake_github.writes()) == writes
    assert tracking(fake_github, n, task.id) == [body]


async def test_other_sources_and_permanent_errors(nc, ns, store, fake_github, forge):
    local = Task(store, "acme/local", 5, source="local")
    gone = Task(store, REPO, 404)  # the issue does not exist on GitHub
    fake_github.add_repo(REPO)
    sync = ForgeSync(nc, ns, forge, mask=mask_secrets)
    await sync.start()
    try:
        await local.create()
        await local.do(ts.StartAnalysis(at=AT, actor="c"))
        await gone.create()
        await eventually(lambda: sync.handled == 3)
        assert not any("acme/local" in r.path for r in fake_github.requests)
        assert sync.skipped_errors >= 1 and sync.api_writes == 0  # acked, not retried forever
    finally:
        await sync.stop()


async def test_retryable_errors_are_redelivered(nc, ns, store, fake_github, forge):
    n = fake_github.add_issue(REPO, "x")
    fake_github.fail("GET", rf"/issues/{n}$", 502, times=2)
    sync = ForgeSync(nc, ns, forge, mask=mask_secrets)
    await sync.start()
    try:
        await Task(store, REPO, n).create()
        await eventually(lambda: ccc_labels(fake_github, n) == ["ccc:queued"])
        assert sync.skipped_errors == 0
    finally:
        await sync.stop()
