"""GitBranches (the coordinator's git for conflicts and the merge queue) against real bare
repositories of the local forge, through their ``file://`` clone URLs, as it runs in the
cluster: merge-tree without a worktree, the candidate merge commit pushed to the queue's
ref, the base fast-forwarded to it only while it has not moved."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from events.errors import CccError
from infra.adapters.forge.local import LocalForge
from infra.adapters.git import gitops
from infra.adapters.git.branches import GitBranches, parse_merge_tree, push_rejected

pytestmark = pytest.mark.timeout(60)
REPO = "acme/app"
BASE_FILES = {"calc.py": "def add(a, b):\n    return a + b\n", "notes.txt": "one\ntwo\nthree\n"}


def push_commit(forge: LocalForge, repo: str, branch: str, files: dict[str, str | None] | None = None, *,
                start: str | None = None, symlinks: dict[str, str] | None = None, message: str = "change") -> str:
    """Commit ``files`` (None: delete) and ``symlinks`` on ``branch`` (from its head, or
    from ``start`` / the default branch when new) and push it to the forge; the sha."""
    with tempfile.TemporaryDirectory(prefix="ccc-test-") as tmp:
        work = Path(tmp, "w")
        gitops.run_git(tmp, "clone", "-q", "--no-tags", forge.clone_url(repo), str(work))
        origin = branch if branch in forge.branches(repo) else (start or forge.default_branch(repo))
        gitops.run_git(work, "checkout", "-q", "-B", branch, f"origin/{origin}")
        for path, content in (files or {}).items():
            target = work / path
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        for path, link in (symlinks or {}).items():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, work / path)
        gitops.run_git(work, "add", "-A")
        gitops.run_git(work, "commit", "-q", "--no-verify", "--allow-empty", "-m", message,
                       env=gitops.identity_env("Tester", "tester@example.com"))
        gitops.run_git(work, "push", "-q", "--no-verify", "--force", "origin", f"HEAD:refs/heads/{branch}")
        return gitops.git_output(work, "rev-parse", "HEAD")


@pytest.fixture
def forge(tmp_path: Path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo(REPO, BASE_FILES)
    return f


@pytest.fixture
def branches(forge: LocalForge, tmp_path: Path) -> GitBranches:
    return GitBranches(forge.clone_url, lambda repo: {}, tmp_path / "cache")


def show(forge: LocalForge, rev: str, fmt: str) -> str:
    return gitops.git_output(forge.repo_path(REPO), "show", "-s", f"--format={fmt}", rev)


# -- pure ------------------------------------------------------------------------------------
def test_merge_tree_and_push_output_are_parsed() -> None:
    assert parse_merge_tree(b"abc123\0") == ("abc123", [])
    assert parse_merge_tree(b"abc123\0b.py\0a.py\0b.py\0") == ("abc123", ["a.py", "b.py"])
    assert push_rejected("To x\n!\tabc:refs/heads/main\t[rejected] (non-fast-forward)\nDone")
    assert push_rejected("To x\n!\tabc:refs/heads/main\t[rejected] (fetch first)\nDone")
    assert not push_rejected("To x\n!\tabc:refs/heads/main\t[remote rejected] (protected branch)\nDone")
    assert not push_rejected("To x\n*\tabc:refs/heads/q\t[new branch]\nDone")


# -- conflicts ---------------------------------------------------------------------------------
async def test_base_sha_and_a_clean_merge(forge, branches) -> None:
    assert await branches.base_sha(REPO, "main") == forge.branch_sha(REPO, "main")
    push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    moved = push_commit(forge, REPO, "main", {"other.py": "Y = 2\n"})  # base moved, elsewhere
    assert await branches.conflicts(REPO, "main", "ccc/feature") == (moved, [])


async def test_conflicting_files_are_named(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/feature", {"notes.txt": "one\nTWO from the branch\nthree\n", "new.py": "1\n",
                                             "calc.py": "def add(a, b):\n    return b + a\n"})
    moved = push_commit(forge, REPO, "main", {"notes.txt": "one\n2 from main\nthree\n",
                                              "calc.py": "def add(a, b):\n    return int(a) + int(b)\n"})
    base_sha, files = await branches.conflicts(REPO, "main", "ccc/feature")
    assert base_sha == moved
    assert files == ["calc.py", "notes.txt"]
    # nothing was pushed or changed on the forge
    assert forge.branches(REPO) == ["ccc/feature", "main"]


async def test_calls_on_one_repository_are_serialised_and_bad_input_is_refused(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/a", {"a.py": "1\n"})
    push_commit(forge, REPO, "ccc/b", {"b.py": "1\n"})
    results = await asyncio.gather(*(branches.conflicts(REPO, "main", b) for b in ("ccc/a", "ccc/b") * 3))
    assert {files == [] for _, files in results} == {True}
    # a branch that replaced another one's name as a directory: no clash in the cache
    forge.delete_branch(REPO, "ccc/a")
    push_commit(forge, REPO, "ccc/a/b", {"ab.py": "1\n"})
    assert (await branches.conflicts(REPO, "main", "ccc/a/b"))[1] == []
    for call in (branches.conflicts(REPO, "main", "ccc/nope"), branches.conflicts(REPO, "main", "--upload-pack=x"),
                 branches.fast_forward(REPO, "main", "not-a-sha"), branches.base_sha(REPO, "nope")):
        with pytest.raises(CccError) as e:
            await call
        assert not e.value.retryable


async def test_unrelated_histories_are_an_error_not_a_conflict(forge, branches, tmp_path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gitops.run_git(tmp, "init", "-q", "-b", "orphan")
        Path(tmp, "z.txt").write_text("z\n")
        gitops.run_git(tmp, "add", "-A")
        gitops.run_git(tmp, "commit", "-q", "-m", "z", env=gitops.identity_env("T", "t@x"))
        gitops.run_git(tmp, "push", "-q", forge.clone_url(REPO), "HEAD:refs/heads/orphan")
    with pytest.raises(CccError, match="unrelated histories"):
        await branches.conflicts(REPO, "main", "orphan")


# -- the merge queue ------------------------------------------------------------------------------
async def test_prepare_merge_then_fast_forward(forge, branches) -> None:
    head = push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    base = push_commit(forge, REPO, "main", {"other.py": "Y = 2\n"})
    sha, base_sha, files = await branches.prepare_merge(REPO, "main", "ccc/feature", "ccc-queue/acme_app-1")
    assert (base_sha, files) == (base, [])
    assert forge.branch_sha(REPO, "ccc-queue/acme_app-1") == sha
    assert show(forge, sha, "%P") == f"{base} {head}"  # both parents, the base first
    assert show(forge, sha, "%an <%ae>|%cn") == "ccc merge queue <merge-queue@ccc.local>|ccc merge queue"
    assert forge.read_file(REPO, "ccc-queue/acme_app-1", "feature.py") == "X = 1\n"
    assert forge.read_file(REPO, "ccc-queue/acme_app-1", "other.py") == "Y = 2\n"
    assert forge.branch_sha(REPO, "main") == base  # the base is untouched until the candidate passes

    assert await branches.fast_forward(REPO, "main", sha) is True
    assert forge.branch_sha(REPO, "main") == sha
    assert await branches.fast_forward(REPO, "main", sha) is True  # already there: idempotent

    await branches.delete_ref(REPO, "ccc-queue/acme_app-1")
    await branches.delete_ref(REPO, "ccc-queue/acme_app-1")  # idempotent
    assert "ccc-queue/acme_app-1" not in forge.branches(REPO)


async def test_an_old_candidate_is_replaced(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    first, _, _ = await branches.prepare_merge(REPO, "main", "ccc/feature", "q/1")
    push_commit(forge, REPO, "main", {"other.py": "Y = 2\n"})
    second, _, _ = await branches.prepare_merge(REPO, "main", "ccc/feature", "q/1")
    assert second != first and forge.branch_sha(REPO, "q/1") == second


async def test_fast_forward_is_refused_after_the_base_moved(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    sha, _, _ = await branches.prepare_merge(REPO, "main", "ccc/feature", "q/1")
    moved = push_commit(forge, REPO, "main", {"other.py": "Y = 2\n"})  # merged meanwhile by someone else
    assert await branches.fast_forward(REPO, "main", sha) is False
    assert forge.branch_sha(REPO, "main") == moved  # never forced


async def test_a_conflicting_candidate_is_not_pushed(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/feature", {"notes.txt": "branch\n"})
    base = push_commit(forge, REPO, "main", {"notes.txt": "main\n"})
    assert await branches.prepare_merge(REPO, "main", "ccc/feature", "q/1") == ("", base, ["notes.txt"])
    assert "q/1" not in forge.branches(REPO)


async def test_refusals_protect_the_base(forge, branches) -> None:
    push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    with pytest.raises(CccError, match="neither the base nor the branch"):
        await branches.prepare_merge(REPO, "main", "ccc/feature", "main")
    with pytest.raises(CccError, match="default branch"):
        await branches.delete_ref(REPO, "main")
    assert forge.branch_sha(REPO, "main")


async def test_hooks_in_the_cache_never_run(forge, branches, tmp_path) -> None:
    push_commit(forge, REPO, "ccc/feature", {"feature.py": "X = 1\n"})
    await branches.conflicts(REPO, "main", "ccc/feature")  # creates the cache
    cache = tmp_path / "cache" / "acme_app.git"
    marker = tmp_path / "hook-ran"
    for hook in ("pre-push", "reference-transaction", "post-checkout"):
        path = cache / "hooks" / hook
        path.write_text(f"#!/bin/sh\ntouch {marker}\n")
        path.chmod(0o755)
    sha, _, _ = await branches.prepare_merge(REPO, "main", "ccc/feature", "q/1")
    assert await branches.fast_forward(REPO, "main", sha)
    assert not marker.exists()
