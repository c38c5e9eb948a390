"""The forge contract: what an agent may rely on from any forge client (the
``ForgeClient`` port the actors declare in :mod:`actors.ports`): where to clone from,
how git authenticates, and opening a pull request for a pushed branch.

One suite, run against every implementation:

- ``local``:  the local forge (bare repositories on disk) and its agent-side client;
- ``github``: ``GitHubForge`` with the real PyGithub client against
              ``tests/fakes/github_api.py``, which also serves the repositories over
              git's smart HTTP behind Basic auth (so the git env really must authenticate).

Every clause is exercised with real git: clone with the forge's env, push a branch with
it, open pull requests (ready and draft), retry one, and refuse what does not exist.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from actors.ports import ForgeClient
from events.errors import CccError
from infra.adapters.forge.errors import ForgeError
from infra.adapters.forge.github import GitHubForge
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.git import gitops
from tests.fakes.github_api import FakeGitHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/app"
FILES = {"README.md": "# app\n", "app.py": "def greet():\n    return 'hi'\n"}


class ForgeHarness(ABC):
    """One forge, its agent-side client, and the means to set it up and look inside."""

    name: str
    keeps_pull_requests: bool  # False: the event log is the record (the local forge)
    secret: str | None = None  # the credential git must never store or show

    @property
    @abstractmethod
    def client(self) -> ForgeClient: ...

    @abstractmethod
    def create_repo(self, repo: str, files: dict[str, str]) -> None:
        """A repository with one commit on ``main``."""

    @abstractmethod
    def branch_sha(self, repo: str, branch: str) -> str | None: ...

    def pull_request(self, repo: str, number: int) -> dict:
        """``{"head", "base", "draft"}`` of an open pull request."""
        raise NotImplementedError


class LocalHarness(ForgeHarness):
    name = "local"
    keeps_pull_requests = False

    def __init__(self, tmp_path: Path) -> None:
        root = tmp_path / "forge"
        self.forge = LocalForge(root)
        self._client = LocalForgeClient(root)

    @property
    def client(self) -> LocalForgeClient:
        return self._client

    def create_repo(self, repo: str, files: dict[str, str]) -> None:
        self.forge.create_repo(repo, files)

    def branch_sha(self, repo: str, branch: str) -> str | None:
        return self.forge.branch_sha(repo, branch) if branch in self.forge.branches(repo) else None


class GitHubHarness(ForgeHarness):
    name = "github"
    keeps_pull_requests = True
    secret = "ghp_contract_token_0123456789"

    def __init__(self, fake: FakeGitHub) -> None:
        self.fake = fake
        fake.tokens.add(self.secret)
        self._client = GitHubForge(
            self.secret, api_url=fake.base_url, env={}, retries=0, seconds_between_requests=None,
            seconds_between_writes=None, git_url_template=f"{fake.root}/git/{{repo}}.git")

    @property
    def client(self) -> GitHubForge:
        return self._client

    def create_repo(self, repo: str, files: dict[str, str]) -> None:
        self.fake.init_git_repo(repo, files)

    def branch_sha(self, repo: str, branch: str) -> str | None:
        status, out, _ = gitops.run_git(self.fake.git_root / f"{repo}.git", "rev-parse", "-q", "--verify",
                                        f"refs/heads/{branch}", check=False)
        return out.decode().strip() if status == 0 else None

    def pull_request(self, repo: str, number: int) -> dict:
        return self.fake.pull(repo, number)


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(params=["local", "github"])
def forge(request: pytest.FixtureRequest, tmp_path: Path) -> ForgeHarness:
    if request.param == "local":
        harness: ForgeHarness = LocalHarness(tmp_path)
        yield harness
        return
    fake = FakeGitHub(git_root=tmp_path / "git-server").start()
    harness = GitHubHarness(fake)
    try:
        yield harness
    finally:
        harness.client.close()
        fake.stop()


@pytest.fixture
def repo(forge: ForgeHarness) -> str:
    forge.create_repo(REPO, FILES)
    return REPO


def clone(forge: ForgeHarness, repo: str, dest: Path) -> Path:
    """What the pipeline's workspace phase does."""
    gitops.clone(forge.client.clone_url(repo), dest, env=forge.client.git_env(repo))
    return dest


def push_change(forge: ForgeHarness, repo: str, work: Path, branch: str) -> str:
    """What the pipeline's push phase does; returns the pushed commit."""
    gitops.create_branch(work, branch)
    (work / "app.py").write_text("def greet():\n    return 'hello'\n")
    gitops.commit_all(work, "Say hello", "ccc agent-1", "agent-1@ccc.local")
    return gitops.push(work, branch, env=forge.client.git_env(repo))


async def open_pr(forge: ForgeHarness, repo: str, branch: str, *, draft: bool) -> tuple[str, int | None]:
    return await forge.client.open_pull_request(
        repo=repo, branch=branch, base="main", title="Say hello", body="Resolves #1\n\nSays hello.",
        draft=draft, issue_number=1)


# -- the contract -----------------------------------------------------------------------------
def test_is_a_forge_client(forge: ForgeHarness) -> None:
    c = forge.client
    assert c.name == forge.name
    for member in ("clone_url", "git_env", "open_pull_request"):  # as the port declares them
        declared = inspect.signature(getattr(ForgeClient, member)).parameters
        actual = inspect.signature(getattr(type(c), member)).parameters
        assert [(p.name, p.kind) for p in actual.values()] == [(p.name, p.kind) for p in declared.values()]
    assert inspect.iscoroutinefunction(c.open_pull_request)


def test_clone_url_and_git_env_carry_no_credentials_in_the_url(forge: ForgeHarness, repo: str) -> None:
    url = forge.client.clone_url(repo)
    parts = urlsplit(url)
    assert parts.scheme and parts.username is None and parts.password is None
    env = forge.client.git_env(repo)
    assert isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    if forge.secret:
        assert forge.secret not in url


def test_a_real_clone_and_push_work_with_the_forges_git_env(
    forge: ForgeHarness, repo: str, tmp_path: Path
) -> None:
    work = clone(forge, repo, tmp_path / "work")
    assert (work / "README.md").read_text() == FILES["README.md"]
    assert gitops.default_branch(work) == "main"
    sha = push_change(forge, repo, work, "ccc/task-acme_app-1-say-hello")
    assert forge.branch_sha(repo, "ccc/task-acme_app-1-say-hello") == sha
    assert forge.branch_sha(repo, "main") != sha  # a branch of its own, main untouched
    if forge.secret:  # git keeps no credential in the clone
        assert forge.secret not in (work / ".git" / "config").read_text()


@pytest.mark.parametrize("draft", [False, True])
async def test_a_pull_request_opens_for_a_pushed_branch(
    forge: ForgeHarness, repo: str, tmp_path: Path, draft: bool
) -> None:
    branch = "ccc/task-acme_app-1-say-hello"
    push_change(forge, repo, clone(forge, repo, tmp_path / "work"), branch)
    url, number = await open_pr(forge, repo, branch, draft=draft)
    assert isinstance(url, str) and urlsplit(url).scheme
    assert number is None or (isinstance(number, int) and number > 0)
    if forge.keeps_pull_requests:
        assert number is not None
        pr = forge.pull_request(repo, number)
        assert (pr["head"], pr["base"], pr["draft"]) == (branch, "main", draft)


async def test_opening_it_again_returns_the_same_pull_request(
    forge: ForgeHarness, repo: str, tmp_path: Path
) -> None:
    """A retried phase (after a crash, or a later attempt on the same branch) must not
    open a second pull request."""
    branch = "ccc/task-acme_app-1-say-hello"
    push_change(forge, repo, clone(forge, repo, tmp_path / "work"), branch)
    first = await open_pr(forge, repo, branch, draft=True)
    assert await open_pr(forge, repo, branch, draft=True) == first


@pytest.mark.parametrize("bad", ["no-owner-or-name/", "acme/../etc", "acme/a b", ""])
def test_an_invalid_repository_name_is_a_forge_error(forge: ForgeHarness, bad: str) -> None:
    with pytest.raises(ForgeError) as e:
        forge.client.clone_url(bad)
    assert e.value.retryable is False


def test_an_unknown_repository_cannot_be_cloned(forge: ForgeHarness, tmp_path: Path) -> None:
    with pytest.raises(CccError):  # the pipeline reports it with the error's retry policy
        clone(forge, "acme/missing", tmp_path / "work")
    assert not (tmp_path / "work" / ".git").exists()


async def test_a_pull_request_in_an_unknown_repository_is_a_forge_error(
    forge: ForgeHarness
) -> None:
    with pytest.raises(ForgeError) as e:
        await open_pr(forge, "acme/missing", "ccc/task-acme_missing-1-x", draft=False)
    assert e.value.retryable is False


async def test_a_pull_request_for_a_branch_never_pushed_is_a_forge_error(
    forge: ForgeHarness, repo: str
) -> None:
    with pytest.raises(ForgeError) as e:
        await open_pr(forge, repo, "ccc/never-pushed", draft=False)
    assert e.value.retryable is False
