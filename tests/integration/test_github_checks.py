"""GitHub's CI through the real webhook receiver: the real ``@octokit/webhooks-examples``
payloads (moved to a task branch), signed as GitHub signs them, answered by reading the
checks through the real PyGithub client from the fake GitHub API (check runs, workflow runs,
jobs, job logs behind a redirect, re-runs), and the facts they become in a real JetStream:
``issue.checks_completed`` once every check of the commit has finished (a failing job's
log tail masked), ``issue.base_moved``, ``issue.pr_approved``; and the GitHub CI runner's
re-runs."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats.js.errors
import pytest
from github import Auth, Github

from events.checks import LOG_TAIL_CHARS, CheckRun, classify
from events.codec import decode_issue
from events.issue import IssueBaseMoved, IssueChecksCompleted, IssueChecksStarted, IssuePullRequestApproved
from events.task import IssueRef
from events.task_state import TaskState
from infra.adapters.forge.errors import ForgeAuthError, ForgeError, ForgeUnavailable
from infra.adapters.forge.github import GitHubForge
from infra.adapters.forge.github_checks import GitHubChecks
from infra.adapters.http.webhook import NO_CHECKS_READER, WebhookServer, create_webhook_app, nats_publisher
from infra.adapters.http.webhook_translate import sign
from infra.adapters.nats.provisioning import provision
from tests.fakes.github_api import FakeGitHub, Rerun, fake_github_fixture  # noqa: F401 - fixture
from tests.support.webhooks import (
    DELIVERED_AT,
    REPO,
    SECRET,
    approved_review,
    base_edited,
    ci_on_task_branch,
    on_task_branch,
    pushed,
    real,
    task_branch,
)

pytestmark = pytest.mark.timeout(60)
TOKEN = "ghp_fake_token_123456"
BRANCH = task_branch()  # issue 1 of Codertocat/Hello-World, the repository of most payloads
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"  # the real payloads' head commit
LATER = "5a2c1f0e9d8b7a6c5b4a39281706f5e4d3c2b1a0"
ACTIONS_REPO = "octo-org/octo-repo"  # the repository of the real workflow_run payloads
SUBJECT = "issue.github.Codertocat_Hello-World.1.{}"


# -- the set-up: a fake GitHub with a pull request, a forge on it, the receiver ------------
class Clock:
    """The receiver's clock: a few minutes after the payload being delivered was made."""

    def __init__(self) -> None:
        self.at = DELIVERED_AT

    def __call__(self) -> datetime:
        return self.at


def make_forge(fake: FakeGitHub, token: str = TOKEN) -> GitHubForge:
    return GitHubForge(token, api_url=fake.base_url, env={}, retries=0, seconds_between_requests=None,
                       seconds_between_writes=None)


def open_pull(fake: FakeGitHub, repo: str, branch: str, head_sha: str) -> tuple[int, str]:
    """A repository served by the fake with ``main`` and ``branch``, and an open pull
    request from ``branch`` whose head is ``head_sha``. Returns (its number, main's sha)."""
    bare = fake.init_git_repo(repo, {"README.md": "Hello World\n"})
    subprocess.run(["git", "-C", str(bare), "branch", branch, "main"], check=True, capture_output=True)
    main = subprocess.run(["git", "-C", str(bare), "rev-parse", "main"], check=True, capture_output=True,
                          text=True).stdout.strip()
    gh = Github(auth=Auth.Token(TOKEN), base_url=fake.base_url, retry=None, seconds_between_requests=None,
                seconds_between_writes=None)
    number = gh.get_repo(repo).create_pull(base="main", head=branch, title="Fix the README", body="Closes #1").number
    fake.set_pull_head_sha(repo, number, head_sha)
    return number, main


@pytest.fixture
def forge(fake_github):
    f = make_forge(fake_github)
    yield f
    f.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def hook(nc, ns, forge, clock):
    """The real receiver (in-process ASGI) with the GitHub checks collector."""
    await provision(nc, ns)
    app = create_webhook_app(nats_publisher(nc, ns), secret=SECRET, clock=clock, checks=GitHubChecks(forge),
                             permissions=forge.author_permission)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hook") as client:
        yield client


async def deliver(client: httpx.AsyncClient, event: str, payload: Any, delivery: str) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await client.post("/webhook", content=body, headers={
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(SECRET, body), "User-Agent": "GitHub-Hookshot/test"})


async def published(nc, ns, subject: str):
    msg = await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(subject))
    return decode_issue(subject, msg.data)


async def stream_count(nc, ns) -> int:
    return (await nc.jetstream().stream_info(ns.issues_stream)).state.messages


def by_name(fact: IssueChecksCompleted) -> dict[str, CheckRun]:
    return {c.name: c for c in fact.checks}


def job_id(fake: FakeGitHub, repo: str, run: int, name: str) -> int:
    return next(j["id"] for j in fake.jobs_of(repo, run) if j["name"] == name)


# -- checks_completed -----------------------------------------------------------------------
async def test_check_suite_completed_with_all_green_publishes_one_success_fact(hook, nc, ns, fake_github):
    number, main = open_pull(fake_github, REPO, BRANCH, SHA)
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "success"}, branch=BRANCH)
    fake_github.add_check_run(REPO, SHA, "Octocoders-linter", "success", app="octocoders", branch=BRANCH)
    fake_github.add_workflow_run(REPO, main, {"lint": "success", "unit": "failure"}, branch="main", event="push")

    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-suite")
    assert r.status_code == 200, r.text
    [out] = r.json()["published"]
    assert out["type"] == "issue.checks_completed" and not out["duplicate"]
    fact = await published(nc, ns, SUBJECT.format("checks_completed"))
    assert isinstance(fact, IssueChecksCompleted)
    assert (fact.head_sha, fact.branch, fact.pr_number, fact.base_sha) == (SHA, BRANCH, number, main)
    assert fact.event_id.startswith(f"github:{REPO}#1:checks:{SHA}:")
    assert {c.name: c.conclusion for c in fact.checks} == {
        "lint": "success", "unit": "success", "Octocoders-linter": "success"}
    checks = by_name(fact)
    assert checks["unit"].run_id == job_id(fake_github, REPO, ci, "unit")  # the job, to re-run it
    assert checks["unit"].url.endswith(f"/runs/{checks['unit'].run_id}") and checks["unit"].started
    assert all(c.passed and c.log_tail == "" for c in fact.checks)  # no log is read for a green check
    assert fact.base == {"lint": "success", "unit": "failure"}  # the same checks on the base commit
    assert not any(r.path.endswith("/logs") for r in fake_github.requests)

    # every other delivery of the same outcome, and a redelivery, collapses into that fact
    again = [await deliver(hook, "check_run", ci_on_task_branch("check_run.completed", sha=SHA), "d-run"),
             await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-suite")]
    assert [a.status_code for a in again] == [200, 200]
    assert [a.json()["published"][0]["duplicate"] for a in again] == [True, True]
    assert await stream_count(nc, ns) == 1


async def test_a_failing_job_brings_its_log_tail_masked(hook, nc, ns, fake_github):
    _, main = open_pull(fake_github, REPO, BRANCH, SHA)
    leaked = "ghp_" + "Zq7" * 12  # a GitHub token's format
    ts = "2019-05-15T15:21:0{}.1234567Z "
    noise = "".join(f"{ts.format(i % 10)}collecting tests/test_{i}.py\n" for i in range(400))
    log = (f"\ufeff{ts.format(0)}##[group]Run pytest\n{noise}"
           f"{ts.format(1)}FAILED tests/test_readme.py::test_spelling - assert 'commmit' == 'commit'\n"
           f"{ts.format(2)}  GITHUB_TOKEN={TOKEN} api_token={leaked}\n"
           f"{ts.format(3)}##[error]Process completed with exit code 1.\n")
    assert len(log) > 3 * LOG_TAIL_CHARS
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "failure"}, branch=BRANCH,
                                      logs={"unit": log})
    fake_github.add_workflow_run(REPO, main, {"lint": "success", "unit": "success"}, branch="main", event="push")
    sonar = fake_github.add_check_run(REPO, SHA, "sonar", "failure", app="sonar", branch=BRANCH)
    fake_github.set_check_run(REPO, sonar, "failure", summary="2 new bugs in README.md")

    r = await deliver(hook, "check_run", ci_on_task_branch("check_run.completed.failure", sha=SHA), "d-red")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, SUBJECT.format("checks_completed"))
    unit, sonar_check = by_name(fact)["unit"], by_name(fact)["sonar"]
    assert (unit.conclusion, unit.started, unit.run_id) == ("failure", True, job_id(fake_github, REPO, ci, "unit"))
    tail = unit.log_tail
    assert tail.endswith("##[error]Process completed with exit code 1.")
    assert "FAILED tests/test_readme.py::test_spelling" in tail
    assert leaked not in tail and TOKEN not in tail and "api_token=***" in tail
    assert len(tail) <= LOG_TAIL_CHARS and "collecting tests/test_0.py\n" not in tail  # only the end
    assert "2019-05-15T" not in tail and not tail.startswith("\ufeff")  # Actions' timestamps dropped
    assert tail.startswith("collecting tests/test_")  # from a line's start
    assert sonar_check.log_tail == "sonar: failure\n2 new bugs in README.md"  # the app's own report
    assert fact.base == {"lint": "success", "unit": "success"}
    # the log came through the API's redirect; its download carried no token
    download = next(q for q in fake_github.requests if q.path.startswith("/_blobs/"))
    assert "authorization" not in download.headers
    # what the facts are for: the failure names a file the change touched
    verdict = classify(fact.checks, base=fact.base, files_changed=("tests/test_readme.py",))
    assert verdict.classification == "change"
    assert classify([unit], base=fact.base).classification == "flaky"  # green on the base: re-run once


async def test_a_log_that_cannot_be_read_leaves_a_note_and_the_fact_goes_out(hook, nc, ns, fake_github):
    open_pull(fake_github, REPO, BRANCH, SHA)
    ci = fake_github.add_workflow_run(REPO, SHA, {"unit": "failure", "e2e": "failure"}, branch=BRANCH)
    fake_github.set_job_log(REPO, job_id(fake_github, REPO, ci, "unit"), None)  # GitHub has it no more: 404
    fake_github.log_link_seconds = -1  # and every download link has expired by the time it is used: 403
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-nolog")
    assert r.status_code == 200, r.text
    checks = by_name(await published(nc, ns, SUBJECT.format("checks_completed")))
    assert checks["unit"].log_tail == "(no log: GitHub answered 404 for the job's log)"
    assert checks["e2e"].log_tail == "(no log: its download answered HTTP 403)"
    assert checks["unit"].conclusion == checks["e2e"].conclusion == "failure"


async def test_pending_checks_publish_nothing_until_the_last_one_finishes(hook, nc, ns, fake_github):
    open_pull(fake_github, REPO, BRANCH, SHA)
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "in_progress"}, branch=BRANCH)
    other = fake_github.add_check_run(REPO, SHA, "codecov/patch", "queued", app="codecov", branch=BRANCH)

    r = await deliver(hook, "check_run", ci_on_task_branch("check_run.completed", sha=SHA), "d-1")
    assert r.status_code == 202
    assert r.json()["status"] == "ignored"
    assert r.json()["reason"] == f"still running on {SHA[:12]}: codecov/patch, unit, workflow CI " \
                                 "(the last to finish reports)"
    fake_github.complete_run(REPO, ci, {"unit": "success"})
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-2")
    assert r.status_code == 202 and r.json()["reason"].startswith(f"still running on {SHA[:12]}: codecov/patch (")
    assert await stream_count(nc, ns) == 0

    fake_github.set_check_run(REPO, other, "success")  # the last one: its delivery reports
    r = await deliver(hook, "check_run", ci_on_task_branch("check_run.completed", sha=SHA), "d-3")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, SUBJECT.format("checks_completed"))
    assert {c.name for c in fact.checks} == {"lint", "unit", "codecov/patch"}
    assert all(c.passed for c in fact.checks)


async def test_a_workflow_run_waiting_for_approval_is_an_action_required_check(hook, nc, ns, fake_github, clock):
    branch = task_branch(ACTIONS_REPO, 7)
    payload = ci_on_task_branch("workflow_run.requested.action_required", sha=SHA, number=7)
    clock.at = datetime(2020, 10, 5, 16, 35, tzinfo=UTC)  # minutes after the real payload
    number, _ = open_pull(fake_github, ACTIONS_REPO, branch, SHA)
    waiting = fake_github.add_workflow_run(ACTIONS_REPO, SHA, {}, workflow="test", branch=branch,
                                           conclusion="action_required")
    fake_github.add_workflow_run(ACTIONS_REPO, SHA, {"lint": "success"}, workflow="Lint", branch=branch)

    r = await deliver(hook, "workflow_run", payload, "d-approval")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, "issue.github.octo-org_octo-repo.7.checks_completed")
    assert fact.pr_number == number
    assert by_name(fact)["test"] == CheckRun(
        name="test", conclusion="action_required", url=f"{fake_github.root}/{ACTIONS_REPO}/actions/runs/{waiting}",
        started=False, run_id=waiting)
    assert by_name(fact)["lint"].passed
    assert classify(fact.checks).classification == "action_required"
    assert not any(q.path.endswith("/logs") for q in fake_github.requests)  # nothing to read


async def test_a_merge_queue_candidates_checks_have_no_pull_request(hook, nc, ns, fake_github):
    candidate = "ccc-queue/gh-Codertocat_Hello-World-1"
    fake_github.add_repo(REPO)
    fake_github.add_workflow_run(REPO, LATER, {"unit": "failure"}, branch=candidate, event="push")
    p = ci_on_task_branch("check_suite.completed", sha=LATER)
    p["check_suite"]["head_branch"] = candidate
    r = await deliver(hook, "check_suite", p, "d-queue")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, SUBJECT.format("checks_completed"))
    assert (fact.head_sha, fact.branch, fact.pr_number, fact.base_sha, fact.base) == (LATER, candidate, None, "", {})
    assert [(c.name, c.conclusion) for c in fact.checks] == [("unit", "failure")]
    assert "Error: unit failed" in fact.checks[0].log_tail


async def test_checks_not_of_a_task_pull_request_are_ignored(hook, nc, ns, fake_github, clock):
    # the real payload as it is: branch "changes", not one of ours; GitHub is not even asked
    r = await deliver(hook, "check_suite", real("check_suite.completed"), "d-1")
    assert r.status_code == 202
    assert r.json()["reason"] == f"branch 'changes' is not a task branch of {REPO}"
    assert fake_github.requests == []
    # a task branch without an open pull request (a fork's look-alike, or none yet)
    fake_github.add_repo(REPO)
    fake_github.add_workflow_run(REPO, SHA, {"unit": "success"}, branch=BRANCH)
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-2")
    assert r.status_code == 202 and r.json()["reason"] == f"no open pull request from {BRANCH!r} in {REPO}"
    # the pull request moved on: these are the checks of an earlier push
    number, _ = open_pull(fake_github, REPO, BRANCH, LATER)
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-3")
    assert r.status_code == 202
    assert r.json()["reason"].startswith(f"pull request #{number} is at {LATER[:12]} now")
    # a fork's workflow run, even on a branch named like ours
    p = ci_on_task_branch("workflow_run.completed", sha=SHA)
    p["workflow_run"]["head_repository"]["full_name"] = "mallory/octo-repo"
    clock.at = datetime(2020, 10, 5, 16, 35, tzinfo=UTC)
    r = await deliver(hook, "workflow_run", p, "d-4")
    assert r.status_code == 202 and "a fork" in r.json()["reason"]
    assert await stream_count(nc, ns) == 0


async def test_github_failing_answers_503_and_a_receiver_without_credentials_202(nc, ns, hook, fake_github):
    open_pull(fake_github, REPO, BRANCH, SHA)
    fake_github.add_workflow_run(REPO, SHA, {"unit": "success"}, branch=BRANCH)
    fake_github.fail("GET", r"/commits/[0-9a-f]+/check-runs", 502)
    payload = ci_on_task_branch("check_suite.completed", sha=SHA)
    r = await deliver(hook, "check_suite", payload, "d-1")
    assert r.status_code == 503 and "cannot read the checks" in r.json()["detail"]
    r = await deliver(hook, "check_suite", payload, "d-1")  # the redelivery reads again
    assert r.status_code == 200, r.text

    app = create_webhook_app(nats_publisher(nc, ns), secret=SECRET, clock=lambda: DELIVERED_AT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hook") as bare:
        r = await deliver(bare, "check_suite", payload, "d-2")
    assert r.status_code == 202 and r.json()["reason"] == NO_CHECKS_READER


async def test_a_stale_check_delivery_is_refused_by_its_own_time(hook, nc, ns, fake_github, clock):
    clock.at = DELIVERED_AT + timedelta(hours=2)
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-old")
    assert r.status_code == 202 and r.json()["reason"].startswith("stale: check_suite.completed")
    assert fake_github.requests == []


# -- the runner: re-runs ---------------------------------------------------------------------
def github_task(repo: str = REPO, source: str = "github") -> TaskState:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return TaskState(task_id="gh-Codertocat_Hello-World-1", status="checks_failed", version=9,
                     issue=IssueRef(source=source, repo=repo, number=1, title="Spelling error in the README file"),
                     created_at=at, updated_at=at, branch=BRANCH, head_sha=SHA)


async def test_rerun_re_runs_the_failed_jobs_and_the_results_come_by_webhook(hook, nc, ns, fake_github, forge):
    runner = GitHubChecks(forge)
    open_pull(fake_github, REPO, BRANCH, SHA)
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "failure", "e2e": "failure"},
                                      branch=BRANCH)
    codecov = fake_github.add_check_run(REPO, SHA, "codecov/patch", "failure", app="codecov", branch=BRANCH)
    r = await deliver(hook, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-red")
    red = await published(nc, ns, SUBJECT.format("checks_completed"))
    assert r.status_code == 200 and not all(c.passed for c in red.checks)
    first = {j["name"]: j["id"] for j in fake_github.jobs_of(REPO, ci)}

    assert runner.source == "github"
    assert await runner.commit_pushed(github_task(), SHA, BRANCH) is None  # GitHub runs CI by itself
    assert await runner.rerun(github_task(), SHA, ("unit", "codecov/patch")) is None
    suite = fake_github.check_run(REPO, SHA, "codecov/patch")
    assert fake_github.reruns == [
        Rerun(REPO, "failed_jobs", ci, (first["unit"], first["e2e"]), 2),
        Rerun(REPO, "suite", fake_github.repos[REPO]["checks"][codecov]["suite"], (codecov,), 2)]
    assert suite["status"] == "queued" and suite["id"] != codecov
    # asked again (a retry after a crash): what is running again is left alone
    await runner.rerun(github_task(), SHA, ("unit", "codecov/patch"))
    assert len(fake_github.reruns) == 2

    fake_github.complete_run(REPO, ci, "success")
    fake_github.set_check_run(REPO, suite["id"], "success")
    r = await deliver(hook, "workflow_run", _workflow_run_of(fake_github, ci), "d-green")
    assert r.status_code == 200, r.text
    green = await published(nc, ns, SUBJECT.format("checks_completed"))
    assert green.event_id != red.event_id  # a new outcome: new runs, a new fact
    assert all(c.passed for c in green.checks) and by_name(green)["unit"].run_id != first["unit"]


def _workflow_run_of(fake: FakeGitHub, run: int) -> dict:
    """The real workflow_run.completed payload, for a run of the fixtures' repository."""
    p = ci_on_task_branch("workflow_run.completed", sha=SHA)
    p["repository"] = real("check_suite.completed")["repository"]
    p["workflow_run"]["head_repository"] = p["repository"]
    p["workflow_run"]["id"] = run
    p["workflow_run"]["updated_at"] = "2019-05-15T15:22:00Z"
    p["workflow_run"]["head_branch"] = BRANCH
    return p


async def test_rerun_errors_say_whether_a_retry_can_help(fake_github, forge):
    runner = GitHubChecks(forge)
    open_pull(fake_github, REPO, BRANCH, SHA)
    fake_github.add_workflow_run(REPO, SHA, {"unit": "failure"}, branch=BRANCH)
    fake_github.fail("POST", r"/rerun-failed-jobs$", 502)
    with pytest.raises(ForgeUnavailable) as err:
        await runner.rerun(github_task(), SHA, ("unit",))
    assert err.value.retryable
    with pytest.raises(ForgeError, match="no check named nope") as err:
        await runner.rerun(github_task(), SHA, ("nope",))
    assert not err.value.retryable
    with pytest.raises(ForgeError, match="not a GitHub one's"):
        await runner.rerun(github_task(source="local"), SHA, ("unit",))

    fake_github.tokens.add("ghp_read_only_token_abcdef")
    fake_github.read_only_tokens.add("ghp_read_only_token_abcdef")
    reader = make_forge(fake_github, "ghp_read_only_token_abcdef")
    try:
        with pytest.raises(ForgeAuthError) as err:
            await GitHubChecks(reader).rerun(github_task(), SHA, ("unit",))
        assert not err.value.retryable and "ghp_read_only_token_abcdef" not in str(err.value)
    finally:
        reader.close()
    assert fake_github.reruns == []
    await runner.rerun(github_task(), SHA, ("unit",))  # GitHub back: done
    assert [x.kind for x in fake_github.reruns] == ["failed_jobs"]


# -- the other pull-request facts ---------------------------------------------------------------
async def test_a_push_to_the_default_branch_moves_the_base(hook, nc, ns):
    r = await deliver(hook, "push", pushed("master", LATER), "d-push")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, "issue.github.Codertocat_Hello-World.0.base_moved")
    assert isinstance(fact, IssueBaseMoved)
    assert (fact.number, fact.branch, fact.sha, fact.before) == (
        0, "master", LATER, "f95f852bd8fca8fcc58a9a2d6c842781e32a215e")
    assert fact.event_id == f"github:{REPO}#0:base:master:{LATER}"
    for payload, reason in [(pushed("feature", LATER), "not to the default branch"),
                            ({**pushed("master", LATER), "ref": "refs/tags/v1"}, "not to a branch"),
                            ({**pushed("master", "0" * 40), "deleted": True}, "deleted")]:
        r = await deliver(hook, "push", payload, "d-other")
        assert r.status_code == 202 and reason in r.json()["reason"]
    assert await stream_count(nc, ns) == 1


async def test_pull_request_synchronize_and_a_base_edit(hook, nc, ns):
    r = await deliver(hook, "pull_request", on_task_branch("pull_request.synchronize"), "d-sync")
    assert r.status_code == 200, r.text
    started = await published(nc, ns, SUBJECT.format("checks_started"))
    assert isinstance(started, IssueChecksStarted) and (started.head_sha, started.branch) == (SHA, BRANCH)

    r = await deliver(hook, "pull_request", base_edited("release", LATER), "d-edit")
    assert r.status_code == 200, r.text
    moved = await published(nc, ns, "issue.github.Codertocat_Hello-World.0.base_moved")
    assert (moved.branch, moved.sha, moved.before) == ("release", LATER, "f95f852bd8fca8fcc58a9a2d6c842781e32a215e")
    assert moved.event_id == f"github:{REPO}#0:pr2:base:release:{LATER}"


async def test_an_approving_review_is_an_authored_fact_with_the_reviewers_permission(hook, nc, ns, fake_github):
    fake_github.set_permission(REPO, "Codertocat", "write")
    r = await deliver(hook, "pull_request_review", approved_review(), "d-approve")
    assert r.status_code == 200, r.text
    fact = await published(nc, ns, SUBJECT.format("pr_approved"))
    assert isinstance(fact, IssuePullRequestApproved)
    assert (fact.pr_number, fact.branch, fact.author, fact.author_association, fact.author_permission) == (
        2, BRANCH, "Codertocat", "OWNER", "write")
    # someone who may only read does not approve anything
    p = approved_review()
    p["review"]["id"] += 1
    p["review"]["user"]["login"] = "maria"
    p["review"]["author_association"] = "COLLABORATOR"
    fake_github.set_permission(REPO, "maria", "read")
    r = await deliver(hook, "pull_request_review", p, "d-maria")
    assert r.status_code == 202 and "read permission" in r.json()["reason"]
    assert await stream_count(nc, ns) == 1


async def test_the_real_server_wires_the_collector(nc, ns, fake_github, forge):
    await provision(nc, ns)
    open_pull(fake_github, REPO, BRANCH, SHA)
    fake_github.add_workflow_run(REPO, SHA, {"unit": "success"}, branch=BRANCH)
    server = WebhookServer(nc, ns, "127.0.0.1", 0, secret=SECRET, clock=lambda: DELIVERED_AT,
                           checks=GitHubChecks(forge))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await deliver(client, "check_suite", ci_on_task_branch("check_suite.completed", sha=SHA), "d-1")
        assert r.status_code == 200, r.text
        assert (await published(nc, ns, SUBJECT.format("checks_completed"))).head_sha == SHA
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(SUBJECT.format("checks_started")))
    finally:
        await server.stop()
