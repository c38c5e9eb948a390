"""GitHubForge with the real PyGithub client against a local server that speaks
GitHub's REST API (and git's smart HTTP, for a real authenticated clone and push)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from infra.adapters.git import gitops
from infra.adapters.forge.errors import ForgeAuthError, ForgeNotFound, ForgeUnavailable
from infra.adapters.forge.github import GitHubForge
from infra.adapters.forge.github_issues import STATE_LABELS
from tests.fakes.github_api import FakeGitHub, fake_github_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)
TOKEN = "ghp_fake_token_123456"


def make_forge(fake: FakeGitHub, token: str = TOKEN, **kw) -> GitHubForge:
    kw.setdefault("retries", 0)
    return GitHubForge(token, api_url=fake.base_url, env={}, seconds_between_requests=None,
                       seconds_between_writes=None, **kw)


def token_never_in_urls(fake: FakeGitHub, token: str = TOKEN) -> None:
    assert fake.requests
    for r in fake.requests:
        assert token not in r.path and token not in r.query
        assert token.encode() not in r.body


async def test_read_issue_sends_the_token_only_in_the_authorization_header(fake_github):
    n = fake_github.add_issue("acme/app", "Fix login", "It breaks", labels=["bug"], user="alice")
    issue = await make_forge(fake_github).read_issue("acme/app", n)
    assert (issue.source, issue.repo, issue.number, issue.title, issue.body) == (
        "github", "acme/app", n, "Fix login", "It breaks")
    assert issue.labels == ("bug",) and issue.author == "alice"
    assert issue.url == f"{fake_github.root}/acme/app/issues/{n}"
    assert all(r.headers["authorization"] == f"token {TOKEN}" for r in fake_github.requests)
    token_never_in_urls(fake_github)


async def test_open_pull_request_draft_and_ready_and_closing_keyword(fake_github):
    fake_github.add_repo("acme/app")
    issue = fake_github.add_issue("acme/app", "Add search")
    forge = make_forge(fake_github)
    url, number = await forge.open_pull_request(
        repo="acme/app", branch="ccc/task-1-search", base="main", title="Add search",
        body=f"Resolves #{issue}\n\nDone.", draft=True, issue_number=issue)
    pr = fake_github.pull("acme/app", number)
    assert url == f"{fake_github.root}/acme/app/pull/{number}" and number != issue
    assert pr["draft"] is True and pr["head"] == "ccc/task-1-search" and pr["base"] == "main"
    assert fake_github.repos["acme/app"]["issues"][number]["body"].startswith(f"Resolves #{issue}")

    _, n2 = await forge.open_pull_request(
        repo="acme/app", branch="ccc/task-2-other", base="main", title="Other", body="No link here",
        draft=False, issue_number=issue)
    assert n2 != number and fake_github.pull("acme/app", n2)["draft"] is False
    assert f"Closes #{issue}" in fake_github.repos["acme/app"]["issues"][n2]["body"]

    # a retry of the same branch finds the open pull request and updates it
    url3, n3 = await forge.open_pull_request(
        repo="acme/app", branch="ccc/task-1-search", base="main", title="Add search v2",
        body=f"Resolves #{issue}\n\nSecond attempt.", draft=True, issue_number=issue)
    assert (url3, n3) == (url, number)
    assert "Second attempt" in fake_github.repos["acme/app"]["issues"][number]["body"]
    assert len(fake_github.repos["acme/app"]["pulls"]) == 2


async def test_draft_falls_back_when_the_repository_has_no_drafts(fake_github):
    fake_github.add_repo("acme/nodrafts", drafts=False)
    _, number = await make_forge(fake_github).open_pull_request(
        repo="acme/nodrafts", branch="ccc/x", base="main", title="t", body="Resolves #1", draft=True,
        issue_number=1)
    assert fake_github.pull("acme/nodrafts", number)["draft"] is False
    assert "drafts are not available" in fake_github.repos["acme/nodrafts"]["issues"][number]["body"]


async def test_state_label_is_replaced_and_created_with_its_colour(fake_github):
    n = fake_github.add_issue("acme/app", "x", labels=["bug"])
    forge = make_forge(fake_github)
    assert await forge.set_state_label("acme/app", n, "ccc:queued") is True
    assert fake_github.issue_labels("acme/app", n) == ["bug", "ccc:queued"]
    label = fake_github.repos["acme/app"]["labels"]["ccc:queued"]
    assert label["color"] == STATE_LABELS["ccc:queued"][0] and label["description"]

    for state in ("ccc:in-progress", "ccc:review", "ccc:failed"):
        await forge.set_state_label("acme/app", n, state)
        labels = fake_github.issue_labels("acme/app", n)
        assert [x for x in labels if x.startswith("ccc:")] == [state] and "bug" in labels

    writes = len(fake_github.writes())
    assert await forge.set_state_label("acme/app", n, "ccc:failed") is False
    assert len(fake_github.writes()) == writes  # unchanged: no write
    # a label that already exists is used as it is, not re-created
    fake_github.repos["acme/app"]["labels"]["ccc:done"] = {"id": 1, "color": "000000", "description": None}
    await make_forge(fake_github).set_state_label("acme/app", n, "ccc:done")
    assert fake_github.repos["acme/app"]["labels"]["ccc:done"]["color"] == "000000"
    assert [x for x in fake_github.issue_labels("acme/app", n) if x.startswith("ccc:")] == ["ccc:done"]


async def test_tracking_comment_is_created_once_then_edited_in_place(fake_github):
    n = fake_github.add_issue("acme/app", "x")
    fake_github.repos["acme/app"]["comments"][1] = {"id": 1, "issue": n, "body": "a human", "user": "bob"}
    marker = "<!-- ccc:task:acme_app-1 -->"
    forge = make_forge(fake_github)
    first = await forge.upsert_tracking_comment("acme/app", n, marker, "state: queued")
    assert first.action == "created"
    # known by id: edited directly, one request, no listing
    before = len(fake_github.requests)
    assert (await forge.upsert_tracking_comment("acme/app", n, marker, "state: queued")).action == "updated"
    assert [r.method for r in fake_github.requests[before:]] == ["PATCH"]
    second = await forge.upsert_tracking_comment("acme/app", n, marker, "state: testing")
    assert second.action == "updated" and second.id == first.id
    ours = [c for c in fake_github.comments_on("acme/app", n) if marker in c["body"]]
    assert len(ours) == 1 and ours[0]["body"] == f"{marker}\nstate: testing"

    # a fresh process (no cache) finds the comment by its marker
    other = make_forge(fake_github)
    writes = len(fake_github.writes())
    assert (await other.upsert_tracking_comment("acme/app", n, marker, "state: testing")).action == "unchanged"
    assert len(fake_github.writes()) == writes  # what GitHub holds is compared: no write
    third = await other.upsert_tracking_comment("acme/app", n, marker, "state: review")
    assert third.id == first.id
    # a duplicate (two writers racing) is removed, the oldest kept; the human's stays
    fake_github.repos["acme/app"]["comments"][99999] = {"id": 99999, "issue": n, "body": f"{marker}\nold",
                                                        "user": "ccc-bot"}
    await make_forge(fake_github).upsert_tracking_comment("acme/app", n, marker, "state: done")
    comments = fake_github.comments_on("acme/app", n)
    assert [c["body"] for c in comments] == ["a human", f"{marker}\nstate: done"]
    # the comment deleted behind the cache's back is created again
    del fake_github.repos["acme/app"]["comments"][first.id]
    again = await make_forge(fake_github).upsert_tracking_comment("acme/app", n, marker, "state: x")
    assert again.action == "created"


async def test_comment_pagination_finds_the_marker_on_a_later_page(fake_github):
    n = fake_github.add_issue("acme/app", "x")
    for i in range(40):
        fake_github.repos["acme/app"]["comments"][10 + i] = {"id": 10 + i, "issue": n, "body": f"c{i}",
                                                             "user": "bob"}
    marker = "<!-- ccc:task:t-1 -->"
    fake_github.repos["acme/app"]["comments"][500] = {"id": 500, "issue": n, "body": marker, "user": "ccc-bot"}
    ref = await make_forge(fake_github).upsert_tracking_comment("acme/app", n, marker, "new")
    assert ref.id == 500 and ref.action == "updated"
    assert any("page=2" in r.query for r in fake_github.requests)


async def test_pull_request_state(fake_github):
    fake_github.add_repo("acme/app")
    forge = make_forge(fake_github)
    _, number = await forge.open_pull_request(repo="acme/app", branch="ccc/b", base="main", title="t",
                                              body="", draft=True, issue_number=1)
    info = await forge.pull_request_state("acme/app", number)
    assert (info.number, info.state, info.merged, info.draft, info.head, info.base) == (
        number, "open", False, True, "ccc/b", "main")
    fake_github.repos["acme/app"]["pulls"][number]["merged"] = True
    fake_github.repos["acme/app"]["issues"][number]["state"] = "closed"
    info = await forge.pull_request_state("acme/app", number)
    assert info.merged and info.state == "closed"


async def test_errors_are_clear_and_carry_retry_policy(fake_github):
    n = fake_github.add_issue("acme/app", "x")
    forge = make_forge(fake_github)
    with pytest.raises(ForgeNotFound, match="not found") as e:
        await forge.read_issue("acme/missing", 1)
    assert e.value.retryable is False
    with pytest.raises(ForgeNotFound):
        await forge.read_issue("acme/app", 999)
    with pytest.raises(ForgeAuthError, match="rejected the credentials") as e:
        await make_forge(fake_github, token="ghp_wrong_token_999999").read_issue("acme/app", n)
    assert e.value.retryable is False and "ghp_wrong_token_999999" not in str(e.value)
    fake_github.read_only_tokens.add(TOKEN)
    with pytest.raises(ForgeAuthError, match="permission denied"):
        await forge.set_state_label("acme/app", n, "ccc:queued")
    fake_github.read_only_tokens.clear()

    fake_github.fail("GET", r"/issues/\d+$", 500, times=1)
    with pytest.raises(ForgeUnavailable) as e:
        await forge.read_issue("acme/app", n)
    assert e.value.retryable is True
    fake_github.fail("GET", r"/issues/\d+$", 502, times=1)  # retried transparently
    assert (await make_forge(fake_github, retries=2, backoff=0.01).read_issue("acme/app", n)).number == n
    fake_github.fail("GET", r"/issues/\d+$", 403, "API rate limit exceeded for installation", times=1)
    with pytest.raises(ForgeUnavailable, match="rate limit"):
        await forge.read_issue("acme/app", n)
    # a secondary rate limit is not waited out on the thread; the wait is data
    fake_github.fail("GET", r"/issues/\d+$", 403, "You have exceeded a secondary rate limit", times=1)
    with pytest.raises(ForgeUnavailable) as e:
        await make_forge(fake_github, retries=2, backoff=0.01).read_issue("acme/app", n)
    assert e.value.retry_after == 60

    dead = GitHubForge(TOKEN, api_url="http://127.0.0.1:9", env={}, retries=0)
    with pytest.raises(ForgeUnavailable, match="unreachable"):
        await dead.read_issue("acme/app", 1)


def test_git_env_keeps_the_token_out_of_urls_and_argv(tmp_path):
    forge = GitHubForge(TOKEN, env={})
    url = forge.clone_url("acme/app")
    env = forge.git_env("acme/app")
    assert TOKEN not in url
    assert [k for k, v in env.items() if TOKEN in v] == ["CCC_GIT_PASSWORD"]
    # the hardening of gitops is kept, and no credential helper may see the token
    base = gitops.git_env()
    n = int(base["GIT_CONFIG_COUNT"])
    assert int(env["GIT_CONFIG_COUNT"]) == n + 1
    assert all(env[f"GIT_CONFIG_KEY_{i}"] == base[f"GIT_CONFIG_KEY_{i}"] for i in range(n))
    assert (env[f"GIT_CONFIG_KEY_{n}"], env[f"GIT_CONFIG_VALUE_{n}"]) == ("credential.helper", "")
    script = Path(env["GIT_ASKPASS"])
    assert script.stat().st_mode & 0o077 == 0 and TOKEN not in script.read_text()

    def ask(prompt: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), prompt], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, check=False)

    assert ask("Username for 'https://github.com': ").stdout == "x-access-token\n"
    assert ask("Password for 'https://x-access-token@github.com': ").stdout == TOKEN + "\n"
    evil = ask("Password for 'https://x-access-token@evil.example': ")
    assert evil.returncode != 0 and TOKEN not in evil.stdout
    # a tampered helper is rewritten before it is handed out again
    script.write_text("#!/bin/sh\necho stolen\n")
    assert forge.git_env("acme/app")["GIT_ASKPASS"] == str(script)
    assert TOKEN not in script.read_text() and "stolen" not in script.read_text()
    forge.close()
    assert not script.exists()


async def test_real_clone_and_push_authenticate_through_git_env(fake_github, tmp_path):
    fake_github.init_git_repo("acme/app", {"README.md": "hello\n"})
    issue = fake_github.add_issue("acme/app", "Greet")
    forge = make_forge(fake_github, git_url_template=f"{fake_github.root}/git/{{repo}}.git")
    url = forge.clone_url("acme/app")
    with pytest.raises(gitops.GitOperationError):  # the server insists on credentials
        gitops.clone(url, tmp_path / "anon")
    work = tmp_path / "work"
    gitops.clone(url, work, env=forge.git_env("acme/app"))
    branch = gitops.branch_name("acme_app-1", "Greet")
    gitops.create_branch(work, branch)
    (work / "README.md").write_text("hello world\n")
    gitops.commit_all(work, "Greet", "ccc", "ccc@localhost")
    sha = gitops.push(work, branch, env=forge.git_env("acme/app"))
    bare = fake_github.git_root / "acme/app.git"
    assert gitops.run_git(bare, "rev-parse", f"refs/heads/{branch}")[1].decode().strip() == sha
    # the remote URL stored in the clone has no credentials either
    assert TOKEN not in (work / ".git" / "config").read_text()
    _, number = await forge.open_pull_request(repo="acme/app", branch=branch, base="main", title="Greet",
                                              body=f"Resolves #{issue}", draft=False, issue_number=issue)
    assert fake_github.pull("acme/app", number)["head"] == branch

    git_requests = [r for r in fake_github.requests if r.path.startswith("/git/")]
    basic = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert any(r.headers.get("authorization") == basic for r in git_requests)
    assert any("git-receive-pack" in r.path for r in git_requests)
    token_never_in_urls(fake_github)

    wrong = make_forge(fake_github, token="ghp_not_valid_000000",
                       git_url_template=f"{fake_github.root}/git/{{repo}}.git")
    with pytest.raises(gitops.GitOperationError) as e:
        gitops.clone(url, tmp_path / "wrong", env=wrong.git_env("acme/app"))
    assert "ghp_not_valid_000000" not in str(e.value)


async def test_github_app_installation_token(fake_github):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    fake_github.add_app(4242, public)
    n = fake_github.add_issue("acme/app", "x")
    forge = GitHubForge(api_url=fake_github.base_url, env={"GITHUB_APP_ID": "4242", "GITHUB_APP_PRIVATE_KEY": pem,
                                                          "GITHUB_APP_INSTALLATION_ID": "77"},
                        seconds_between_requests=None, seconds_between_writes=None, retries=0)
    password = forge.git_env("acme/app")["CCC_GIT_PASSWORD"]  # minted on first use
    assert (await forge.read_issue("acme/app", n)).number == n
    mint = [r for r in fake_github.requests if r.path == "/app/installations/77/access_tokens"]
    assert len(mint) == 1 and mint[0].headers["authorization"].startswith("Bearer ")
    issued = next(t for t in fake_github.tokens if t.startswith("ghs_installation_77_"))
    assert password == issued  # one token, reused until it nears expiry
    assert fake_github.requests[-1].headers["authorization"] == f"token {issued}"
    unknown = GitHubForge(api_url=fake_github.base_url, app_id=999, app_private_key=pem, installation_id=77,
                          env={}, retries=0)
    with pytest.raises(ForgeAuthError, match="401"):  # the key is not that app's
        unknown.git_env("acme/app")


async def test_github_enterprise_api_prefix(tmp_path):
    fake = FakeGitHub(api_prefix="/api/v3").start()
    try:
        n = fake.add_issue("acme/app", "x")
        forge = make_forge(fake)
        assert forge.web_url == fake.root
        assert (await forge.read_issue("acme/app", n)).url == f"{fake.root}/acme/app/issues/{n}"
        await forge.upsert_tracking_comment("acme/app", n, "<!-- m -->", "b")
        assert all(r.path.startswith("/api/v3/") for r in fake.requests)
    finally:
        fake.stop()
