"""The local forge: bare git repositories on disk play the part of GitHub.

It is the embedded default (``ccc demo`` needs no network and no token) and what the
tests use: agents clone from ``clone_url``, push their ``ccc/`` branches to it, and a
"merged pull request" is :meth:`LocalForge.merge` into the default branch.
:class:`LocalForge` is the forge itself (creating, reading, merging); an agent sees
it through :class:`LocalForgeClient`.

Layout: ``<root>/<owner>/<name>.git``. Merges happen in a temporary clone and are
pushed back, so the bare repository only ever changes through ordinary pushes (a
concurrent merge makes our push non-fast-forward; we then redo the merge on top).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from events.issue import IssuePullRequestMerged
from events.subjects import check_repo, repo_parts
from events.task_state import TaskState

from infra.adapters.forge.errors import ForgeError, ForgeNotFound, MergeConflict
from infra.adapters.git import gitops

FORGE_NAME = "ccc forge"
FORGE_EMAIL = "forge@ccc.local"


def merged_fact(task: TaskState, at: datetime, actor: str = "") -> IssuePullRequestMerged:
    """The fact that ``task``'s pull request was merged on the local forge (by ``ccc pr
    merge``, the dashboard, a bench's reviewer), one per attempt: its id is the message's
    dedup id, so a merge reported twice is one fact."""
    issue = task.issue
    return IssuePullRequestMerged(
        event_id=f"local:{issue.repo}#{issue.number}:merged:{task.attempt}", source=issue.source, repo=issue.repo,
        number=issue.number, occurred_at=at, actor=actor, pr_number=task.pr_number, branch=task.branch)


class LocalForge:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    # -- repositories -----------------------------------------------------------------
    def repo_path(self, repo: str) -> Path:
        """``owner/name`` -> ``<root>/<owner>/<name>.git`` (a bare ``name`` is owned by
        ``local``, as in :func:`events.subjects.repo_token`); the name is checked by
        the one repository-name validator, :func:`events.subjects.check_repo`."""
        owner, name = repo_parts(check_repo(repo, "repository", error=ForgeError))
        name = name.removesuffix(".git")
        if not name.strip("."):  # "owner/.git" would be the owner's directory itself
            raise ForgeError(f"invalid repository {repo!r}: use 'owner/name' or 'name'")
        return self.root / owner / f"{name}.git"

    def _existing(self, repo: str) -> Path:
        path = self.repo_path(repo)
        if not (path / "HEAD").is_file():
            raise ForgeNotFound(f"unknown repository {repo!r} (no bare repository at {path})")
        return path

    def exists(self, repo: str) -> bool:
        return (self.repo_path(repo) / "HEAD").is_file()

    def create_repo(
        self,
        repo: str,
        files: Mapping[str, str],
        *,
        default_branch: str = "main",
        message: str = "initial commit",
    ) -> Path:
        """A bare repository whose default branch holds one commit with ``files``."""
        path = self._init_bare(repo, default_branch)
        with tempfile.TemporaryDirectory(prefix="ccc-forge-") as tmp:
            work = Path(tmp)
            gitops.run_git(work, "init", "-q", "-b", default_branch)
            for rel, content in files.items():
                target = (work / rel).resolve()
                escapes = Path(rel).is_absolute() or ".." in Path(rel).parts
                if escapes or not target.is_relative_to(work.resolve()):
                    raise ForgeError(f"file path {rel!r} must be relative to the repository")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content.encode("utf-8"))
            gitops.run_git(work, "add", "-A")
            gitops.run_git(work, "commit", "-q", "--no-verify", "--allow-empty", "-m", message,
                           env=gitops.identity_env(FORGE_NAME, FORGE_EMAIL))
            gitops.run_git(work, "push", "-q", "--no-verify", str(path),
                           f"HEAD:refs/heads/{default_branch}")
        return path

    def import_repo(self, repo: str, source_dir: Path | str) -> Path:
        """Make a bare origin from an existing local repository's default branch (its
        committed history; uncommitted changes are not part of it). The bare side
        fetches, so nothing runs in, or is changed in, the source repository."""
        source = Path(source_dir).resolve()
        if gitops.head_sha(source) is None:
            raise ForgeError(f"{source} is not a git repository with at least one commit")
        branch = gitops.default_branch(source)
        path = self._init_bare(repo, branch)
        gitops.run_git(path, "fetch", "-q", "--no-tags", str(source),
                       f"refs/heads/{branch}:refs/heads/{branch}")
        return path

    def _init_bare(self, repo: str, default_branch: str) -> Path:
        path = self.repo_path(repo)
        if path.exists():
            raise ForgeError(f"repository {repo!r} already exists at {path}")
        path.mkdir(parents=True)
        gitops.run_git(path, "init", "-q", "--bare", "-b", default_branch)
        return path

    def clone_url(self, repo: str) -> str:
        return self._existing(repo).as_uri()

    # -- reading ----------------------------------------------------------------------
    def default_branch(self, repo: str) -> str:
        return gitops.default_branch(self._existing(repo))

    def branches(self, repo: str) -> list[str]:
        out = gitops.run_git(self._existing(repo), "for-each-ref", "--format=%(refname:short)",
                             "refs/heads")[1]
        return sorted(line for line in out.decode().splitlines() if line)

    def branch_sha(self, repo: str, branch: str) -> str:
        status, out, _ = gitops.run_git(self._existing(repo), "rev-parse", "-q", "--verify",
                                        f"refs/heads/{branch}", check=False)
        if status != 0:
            raise ForgeError(f"{repo}: unknown branch {branch!r}")
        return out.decode().strip()

    def read_file(self, repo: str, branch: str, path: str) -> str:
        self.branch_sha(repo, branch)
        status, out, _ = gitops.run_git(self._existing(repo), "show", f"refs/heads/{branch}:{path}",
                                        check=False)
        if status != 0:
            raise ForgeError(f"{repo}: no file {path!r} on branch {branch!r}")
        return out.decode("utf-8", "replace")

    # -- changing ---------------------------------------------------------------------
    def merge(self, repo: str, branch: str, *, message: str, attempts: int = 3) -> str:
        """Merge ``branch`` into the default branch; returns the new head sha.
        Fast-forward when possible, else a merge commit; already merged is a no-op."""
        bare = self._existing(repo)
        target = self.default_branch(repo)
        if branch == target:
            raise ForgeError(f"{repo}: cannot merge {branch!r} into itself")
        self.branch_sha(repo, branch)
        identity = gitops.identity_env(FORGE_NAME, FORGE_EMAIL)
        for _ in range(attempts):
            with tempfile.TemporaryDirectory(prefix="ccc-merge-") as tmp:
                work = Path(tmp, "work")
                gitops.run_git(tmp, "clone", "-q", "--no-tags", "--branch", target, str(bare), str(work))
                status, out, err = gitops.run_git(
                    work, "merge", "--ff", "--no-edit", "-m", message, f"origin/{branch}",
                    env=identity, check=False)
                if status != 0:
                    conflicted = gitops.run_git(work, "diff", "--name-only", "--diff-filter=U")[1]
                    files = sorted(f for f in conflicted.decode().splitlines() if f)
                    if files:
                        raise MergeConflict(f"{repo}: {branch} conflicts with {target} in "
                                            f"{', '.join(files)}", files)
                    raise ForgeError(f"{repo}: cannot merge {branch}: {(out.decode() + err).strip()}")
                status, _, err = gitops.run_git(work, "push", "-q", "--no-verify", "origin",
                                                f"HEAD:refs/heads/{target}", check=False)
                if status == 0:
                    return gitops.head_sha(work) or ""
        raise ForgeError(f"{repo}: {target} kept moving while merging {branch}: {err.strip()}",
                         retryable=True)

    def delete_branch(self, repo: str, branch: str) -> bool:
        """Delete a branch (after its merge, or when a PR is closed). Idempotent:
        returns False when it was already gone. The default branch is refused."""
        bare = self._existing(repo)
        if branch == self.default_branch(repo):
            raise ForgeError(f"{repo}: refusing to delete the default branch {branch!r}")
        if branch not in self.branches(repo):
            return False
        gitops.run_git(bare, "update-ref", "-d", f"refs/heads/{branch}")
        return True


class LocalForgeClient:
    """The agent's side of the local forge (the ``ForgeClient`` an agent is given):
    where to clone from, how git authenticates (it need not), and how to open a pull
    request. A pull request here is the pushed branch plus its record in the event log
    (the ``agent.pr_opened`` report and the task's ``task.pr_opened``)."""

    name = "local"

    def __init__(self, root: Path | str) -> None:
        self.forge = LocalForge(root)

    def clone_url(self, repo: str) -> str:
        return self.forge.clone_url(repo)

    def git_env(self, repo: str) -> dict[str, str]:
        return {}  # a path on disk needs no credentials

    async def open_pull_request(
        self, *, repo: str, branch: str, base: str, title: str, body: str, draft: bool, issue_number: int
    ) -> tuple[str, int | None]:
        # The branch is already pushed; the record is the event the agent appends next.
        # As on GitHub, a pull request needs the repository and both branches to exist.
        def check() -> str:
            for name in (branch, base):
                self.forge.branch_sha(repo, name)  # ForgeNotFound / ForgeError
            return self.forge.repo_path(repo).as_uri()

        uri = await asyncio.to_thread(check)
        return f"{uri}?branch={branch}&base={base}", issue_number
