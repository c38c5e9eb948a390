"""The fake GitHub's CI side (check runs, check suites, workflow runs, jobs, job logs, re-runs)
through the real PyGithub client, and the real ``@octokit/webhooks-examples`` payloads of the
CI webhooks (tests/fixtures/webhooks/README.md) with the fields a translator needs."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import requests
from github import Auth, Github, GithubException

from tests.fakes.github_api import CONCLUSIONS, FakeGitHub, Rerun, fake_github_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)
TOKEN = "ghp_fake_token_123456"
REPO = "acme/app"
BRANCH = "ccc/task-1-search"
SHA = "3f786850e387550fdab836ed7e6dc881de23001b"
OTHER_SHA = "89e6c98d92887913cadf06b2adb97f26cde4849b"
WEBHOOKS = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"


def client(fake: FakeGitHub, token: str = TOKEN, **kw) -> Github:
    return Github(auth=Auth.Token(token), base_url=fake.base_url, retry=None, seconds_between_requests=None,
                  seconds_between_writes=None, **kw)


def open_pull(fake: FakeGitHub, gh: Github, sha: str = SHA) -> int:
    fake.add_repo(REPO)
    pr = gh.get_repo(REPO).create_pull(title="Add search", body="Closes #1", base="main", head=BRANCH)
    fake.set_pull_head_sha(REPO, pr.number, sha)
    return pr.number


def test_a_commits_check_runs_and_suites_with_their_conclusions(fake_github):
    gh = client(fake_github, per_page=2)  # pages through the wrapped lists too
    number = open_pull(fake_github, gh)
    ci = fake_github.add_workflow_run(REPO, SHA, {
        "lint": "success", "unit": "failure", "integration": "timed_out", "docs": "skipped",
        "flaky": "cancelled", "format": "neutral"}, branch=BRANCH)
    approval = fake_github.add_workflow_run(REPO, SHA, {}, workflow="Preview", branch=BRANCH,
                                            conclusion="action_required")
    codecov = fake_github.add_check_run(REPO, SHA, "codecov/patch", "success", app="codecov", branch=BRANCH)
    fake_github.add_workflow_run(REPO, OTHER_SHA, {"lint": "failure"}, branch="main")  # another commit

    repo = gh.get_repo(REPO)
    assert repo.get_pull(number).head.sha == SHA
    commit = repo.get_commit(SHA)
    runs = list(commit.get_check_runs())
    assert {c.name: (c.status, c.conclusion) for c in runs} == {
        "lint": ("completed", "success"), "unit": ("completed", "failure"),
        "integration": ("completed", "timed_out"), "docs": ("completed", "skipped"),
        "flaky": ("completed", "cancelled"), "format": ("completed", "neutral"),
        "codecov/patch": ("completed", "success")}
    assert commit.get_check_runs().totalCount == 7
    assert all(c.head_sha == SHA and [p.number for p in c.pull_requests] == [number] for c in runs)
    apps = {c.name: c.app.slug for c in runs}
    assert apps["unit"] == "github-actions" and apps["codecov/patch"] == "codecov"
    assert [c.name for c in commit.get_check_runs(status="completed", check_name="unit")] == ["unit"]

    # an Actions job is a check run with the same id; a single check run by id
    unit_job = next(j for j in fake_github.jobs_of(REPO, ci) if j["name"] == "unit")
    single = repo.get_check_run(unit_job["id"])
    assert (single.name, single.conclusion, single.output.title) == ("unit", "failure", "unit: failure")
    assert repo.get_check_run(codecov).details_url.startswith("https://codecov.example/")

    suites = {s.app.slug + ":" + str(s.id): (s.status, s.conclusion, s.head_branch)
              for s in commit.get_check_suites()}
    ci_suite = fake_github.workflow_run(REPO, ci)["suite"]
    approval_suite = fake_github.workflow_run(REPO, approval)["suite"]
    assert suites[f"github-actions:{ci_suite}"] == ("completed", "failure", BRANCH)
    assert suites[f"github-actions:{approval_suite}"] == ("completed", "action_required", BRANCH)
    assert [v for k, v in suites.items() if k.startswith("codecov:")] == [("completed", "success", BRANCH)]
    assert len(suites) == 3
    assert {c.name for c in repo.get_check_suite(ci_suite).get_check_runs()} == {
        "lint", "unit", "integration", "docs", "flaky", "format"}
    # by branch name too, as GitHub resolves a ref; an unknown ref is GitHub's 422
    assert repo.get_commit(BRANCH).get_check_runs().totalCount == 7
    with pytest.raises(GithubException) as err:
        list(repo.get_commit("no-such-branch").get_check_runs())
    assert err.value.status == 422


def test_pending_states_and_another_apps_check_moving_on(fake_github):
    gh = client(fake_github)
    fake_github.add_repo(REPO)
    run = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "in_progress", "e2e": "queued"})
    check = fake_github.add_check_run(REPO, SHA, "sonar", "queued", app="sonar")
    repo = gh.get_repo(REPO)
    wr = repo.get_workflow_run(run)
    assert (wr.status, wr.conclusion) == ("in_progress", None)
    assert {c.name: c.status for c in repo.get_commit(SHA).get_check_runs()} == {
        "lint": "completed", "unit": "in_progress", "e2e": "queued", "sonar": "queued"}
    fake_github.set_check_run(REPO, check, "failure", summary="3 new issues")
    fake_github.complete_run(REPO, run, {"unit": "success", "e2e": "success"})
    finished = repo.get_workflow_run(run)
    assert (finished.status, finished.conclusion) == ("completed", "success")
    sonar = repo.get_check_run(check)
    assert (sonar.conclusion, sonar.output.summary) == ("failure", "3 new issues")
    with pytest.raises(ValueError):
        fake_github.add_check_run(REPO, SHA, "x", "broken")


def test_workflow_runs_by_head_sha_their_jobs_and_a_jobs_log_through_the_redirect(fake_github):
    gh = client(fake_github)
    open_pull(fake_github, gh)
    failing_log = "2026-01-01T00:00:00.0000000Z FAILED tests/test_search.py::test_empty - assert 1 == 0\n"
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "failure"}, branch=BRANCH,
                                      logs={"unit": failing_log})
    fake_github.add_workflow_run(REPO, OTHER_SHA, {"lint": "success"}, branch="main", event="push")
    repo = gh.get_repo(REPO)

    runs = list(repo.get_workflow_runs(head_sha=SHA))
    assert [(r.id, r.name, r.status, r.conclusion, r.head_branch, r.event) for r in runs] == [
        (ci, "CI", "completed", "failure", BRANCH, "pull_request")]
    assert [p.number for p in runs[0].pull_requests] and runs[0].run_attempt == 1
    assert [r.head_sha for r in repo.get_workflow_runs(branch="main")] == [OTHER_SHA]
    assert repo.get_workflow_runs(head_sha=SHA, branch="main").totalCount == 0
    assert [r.id for r in repo.get_workflow_runs(status="failure")] == [ci]

    jobs = {j.name: j for j in repo.get_workflow_run(ci).jobs()}
    assert {n: (j.status, j.conclusion) for n, j in jobs.items()} == {
        "lint": ("completed", "success"), "unit": ("completed", "failure")}
    unit = jobs["unit"]
    assert unit.run_id == ci and unit.head_sha == SHA
    assert unit.check_run_url.endswith(f"/check-runs/{unit.id}")
    assert [s.conclusion for s in unit.steps] == ["success", "failure"]

    # PyGithub asks for the job's logs with the token and gets a short-lived signed URL back
    before = len(fake_github.requests)
    location = unit.logs_url()
    asked = fake_github.requests[before]
    assert asked.path.endswith(f"/actions/jobs/{unit.id}/logs")
    assert asked.headers["authorization"] == f"token {TOKEN}"
    assert TOKEN not in location and "sig=" in location
    with urllib.request.urlopen(location, timeout=10) as got:
        assert got.headers["Content-Type"].startswith("text/plain")
        assert got.read().decode() == failing_log
    assert "authorization" not in fake_github.requests[-1].headers  # the signature is the credential
    # a default log ends the way GitHub's do for the conclusion
    assert "Process completed with exit code 1" not in _log(jobs["lint"].logs_url())

    # a plain HTTP client following the redirect with the token gets the text as well
    got = requests.get(f"{fake_github.base_url}/repos/{REPO}/actions/jobs/{unit.id}/logs",
                       headers={"Authorization": f"token {TOKEN}"}, timeout=10)
    assert got.status_code == 200 and got.text == failing_log and got.history[0].status_code == 302
    # no token: 401; a forged or expired link: 403
    assert requests.get(f"{fake_github.base_url}/repos/{REPO}/actions/jobs/{unit.id}/logs",
                        timeout=10, allow_redirects=False).status_code == 401
    assert requests.get(location.split("?")[0] + "?sig=forged", timeout=10).status_code == 403
    fake_github.log_link_seconds = -1
    expired = unit.logs_url()
    assert requests.get(expired, timeout=10).status_code == 403


def test_rerun_failed_jobs_is_recorded_requeues_the_run_and_completes_with_a_new_conclusion(fake_github):
    gh = client(fake_github)
    open_pull(fake_github, gh)
    ci = fake_github.add_workflow_run(REPO, SHA, {"lint": "success", "unit": "failure", "e2e": "timed_out"},
                                      branch=BRANCH)
    first = {j["name"]: j["id"] for j in fake_github.jobs_of(REPO, ci)}
    repo = gh.get_repo(REPO)
    run = repo.get_workflow_run(ci)

    assert run.rerun_failed_jobs() is True
    assert fake_github.reruns == [Rerun(REPO, "failed_jobs", ci, (first["unit"], first["e2e"]), 2)]
    assert fake_github.writes()[-1].path.endswith(f"/actions/runs/{ci}/rerun-failed-jobs")
    again = repo.get_workflow_run(ci)
    assert (again.status, again.conclusion, again.run_attempt) == ("queued", None, 2)
    assert again.previous_attempt_url.endswith(f"/actions/runs/{ci}/attempts/1")
    latest = {j.name: j for j in again.jobs()}
    assert latest["lint"].id == first["lint"] and latest["lint"].conclusion == "success"
    assert latest["unit"].id != first["unit"]
    assert (latest["unit"].status, latest["unit"].run_attempt) == ("queued", 2)
    assert again.jobs("all").totalCount == 5
    assert {c.name: c.status for c in repo.get_commit(SHA).get_check_runs()} == {
        "lint": "completed", "unit": "queued", "e2e": "queued"}
    assert repo.get_commit(SHA).get_check_runs(filter="all").totalCount == 5
    assert [s.status for s in repo.get_commit(SHA).get_check_suites()] == ["queued"]
    # not completed: cannot be re-run (PyGithub answers False to anything but 201)
    assert again.rerun_failed_jobs() is False and len(fake_github.reruns) == 1
    assert fake_github.requests[-1].method == "POST"
    with pytest.raises(GithubException):  # nor has a queued job a log yet
        latest["unit"].logs_url()

    fake_github.complete_run(REPO, ci, {"unit": "success", "e2e": "failure"},
                             logs={"e2e": "browser crashed\n"})
    done = repo.get_workflow_run(ci)
    assert (done.status, done.conclusion) == ("completed", "failure")
    assert {c.name: c.conclusion for c in repo.get_commit(SHA).get_check_runs()} == {
        "lint": "success", "unit": "success", "e2e": "failure"}
    e2e = next(j for j in done.jobs() if j.name == "e2e")
    assert _log(e2e.logs_url()) == "browser crashed\n"

    # one job again (POST /actions/jobs/{id}/rerun, which PyGithub has no method for)
    status, _, _ = gh.requester.requestJson("POST", f"{e2e.url}/rerun")
    assert status == 201
    assert fake_github.reruns[-1] == Rerun(REPO, "job", ci, (e2e.id,), 3)
    assert repo.get_workflow_run(ci).status == "queued"
    fake_github.complete_run(REPO, ci, "success")
    final = repo.get_workflow_run(ci)
    assert (final.status, final.conclusion, final.run_attempt) == ("completed", "success", 3)
    assert [s.conclusion for s in repo.get_commit(SHA).get_check_suites()] == ["success"]

    # the whole run, and nothing to re-run
    assert final.rerun() is True and fake_github.reruns[-1].kind == "run"
    assert len(fake_github.reruns[-1].job_ids) == 3
    fake_github.complete_run(REPO, ci, "success")
    status, _, _ = gh.requester.requestJson("POST", f"{final.url}/rerun-failed-jobs")
    assert status == 403 and len(fake_github.reruns) == 3


def test_a_rerun_needs_a_token_that_may_write(fake_github):
    fake_github.add_repo(REPO)
    ci = fake_github.add_workflow_run(REPO, SHA, {"unit": "failure"})
    fake_github.tokens.add("ghp_read_only")
    fake_github.read_only_tokens.add("ghp_read_only")
    gh = client(fake_github, "ghp_read_only")
    run = gh.get_repo(REPO).get_workflow_run(ci)
    status, _, body = gh.requester.requestJson("POST", f"{run.url}/rerun-failed-jobs")
    assert status == 403 and "not accessible" in body and fake_github.reruns == []
    assert run.rerun_failed_jobs() is False
    assert fake_github.workflow_run(REPO, ci)["status"] == "completed"


def _log(url: str) -> str:
    got = requests.get(url, timeout=10)
    assert got.status_code == 200, (url, got.status_code)
    return got.text


# -- the real webhook payloads -------------------------------------------------------------

def _payload(name: str) -> dict:
    return json.loads((WEBHOOKS / name).read_text())


@pytest.mark.parametrize(("name", "conclusion"), [
    ("check_run.completed.json", "success"), ("check_run.completed.failure.json", "failure")])
def test_check_run_completed_payloads(name, conclusion):
    p = _payload(name)
    run = p["check_run"]
    assert p["action"] == "completed" and run["status"] == "completed" and run["conclusion"] == conclusion
    assert len(run["head_sha"]) == 40 and run["name"] and run["id"]
    assert run["check_suite"]["head_branch"] and run["check_suite"]["head_sha"] == run["head_sha"]
    assert run["app"]["id"] and p["repository"]["full_name"]
    pr = run["pull_requests"][0]
    assert pr["number"] and pr["head"]["sha"] == run["head_sha"] and pr["base"]["ref"]
    assert run["conclusion"] in CONCLUSIONS


def test_check_suite_completed_payload():
    p = _payload("check_suite.completed.json")
    suite = p["check_suite"]
    assert p["action"] == "completed" and suite["status"] == "completed" and suite["conclusion"] == "success"
    assert len(suite["head_sha"]) == 40 and suite["head_branch"] and suite["app"]["id"]
    assert [pr["number"] for pr in suite["pull_requests"]] and suite["pull_requests"][0]["base"]["ref"]
    assert p["repository"]["full_name"]


def test_workflow_run_payloads():
    p = _payload("workflow_run.completed.json")
    run = p["workflow_run"]
    assert p["action"] == "completed" and run["status"] == "completed" and run["conclusion"] == "success"
    assert len(run["head_sha"]) == 40 and run["head_branch"] and run["id"] and run["name"] is not None
    assert run["jobs_url"].endswith(f"/actions/runs/{run['id']}/jobs") and run["run_attempt"] == 1
    assert run["pull_requests"][0]["number"] and run["pull_requests"][0]["base"]["ref"]
    assert p["workflow"]["path"] and p["repository"]["full_name"]

    p = _payload("workflow_run.requested.action_required.json")
    run = p["workflow_run"]
    assert p["action"] == "requested"
    assert (run["status"], run["conclusion"]) == ("completed", "action_required")
    assert len(run["head_sha"]) == 40 and run["pull_requests"] == []


def test_pull_request_synchronize_payload():
    p = _payload("pull_request.synchronize.json")
    pr = p["pull_request"]
    assert p["action"] == "synchronize" and p["number"] == pr["number"]
    assert len(pr["head"]["sha"]) == 40 and pr["head"]["sha"] == p["after"] and p["before"] != p["after"]
    assert pr["head"]["ref"] and pr["base"]["ref"] and pr["base"]["repo"]["full_name"]
    assert pr["state"] == "open" and p["repository"]["full_name"]
