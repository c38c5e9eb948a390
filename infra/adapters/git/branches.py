"""The coordinator's git on the repositories' branches (``actors.ports.PullRequestBranches``):
whether a pull request's branch still merges into its moved base, and the merge queue's
steps (build the candidate, fast-forward the base to it, remove its ref).

Why over plain git against the forge's clone URL: the same code serves the local forge
(a ``file://`` bare repository) and GitHub (``https://`` with the forge's credentials in
``git_env``), and ``git merge-tree --write-tree`` answers "does it conflict, and where"
without a worktree, so nothing of the repository is ever checked out or run here.

Each repository has a bare *cache* under ``cache_dir`` (``<owner>_<name>.git``). Only the
branches a call needs are fetched into it, with explicit refspecs (no tags, no
submodules, nothing else) into private refs named by a hash of the branch name (so
branches ``a`` and ``a/b`` never collide). Every git process runs with hooks disabled
and secret-looking variables blanked (:func:`gitops.run_git`).

Pushes are explicit too: the merge queue's candidate is pushed (forced: the ref is the
queue's own) to ``refs/heads/<ref>``; the base is moved to a tested candidate *without*
force, so a base that moved meanwhile refuses the push (:meth:`GitBranches.fast_forward`
returns False and the candidate is built and tested again).

Git blocks, so every call runs in a thread (``asyncio.to_thread``), and calls on one
repository are serialised (they share its cache).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from events.subjects import repo_token

from infra.adapters.git import gitops
from infra.adapters.git.gitops import GitOperationError, redact

log = structlog.get_logger("ccc.branches")

MERGE_QUEUE_NAME = "ccc merge queue"
MERGE_QUEUE_EMAIL = "merge-queue@ccc.local"
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
_MISSING_REMOTE_REF = ("couldn't find remote ref", "could not find remote ref")


def _bad(message: str) -> GitOperationError:
    """An error no retry can fix (an unknown branch, a refused name, unrelated histories)."""
    return GitOperationError(message, retryable=False)


def _branch(name: str, what: str) -> str:
    """A branch name as given (``refs/heads/`` in front is accepted and dropped), checked
    the way git checks ref names; never something git would read as an option."""
    name = (name or "").strip()
    name = name.removeprefix("refs/heads/")
    if not name or name.startswith("-") or any(c in name for c in "\0\n\r\t "):
        raise _bad(f"invalid {what} {name!r}")
    return name


def _sha(value: str) -> str:
    value = (value or "").strip().lower()
    if not _SHA.fullmatch(value):
        raise _bad(f"not a commit id: {value!r}")
    return value


def _private_ref(branch: str) -> str:
    return "refs/ccc/fetched/" + hashlib.sha256(branch.encode()).hexdigest()[:32]


def parse_merge_tree(output: bytes) -> tuple[str, list[str]]:
    """``git merge-tree --write-tree -z --name-only --no-messages`` output -> (tree, the
    conflicting paths, sorted, each once)."""
    parts = output.split(b"\0")
    tree = parts[0].decode().strip()
    files = sorted({p.decode("utf-8", "replace") for p in parts[1:] if p})
    return tree, files


def push_rejected(porcelain: str) -> bool:
    """Whether ``git push --porcelain`` says the remote refused the update as not a
    fast-forward (or as stale): the base moved. ``[remote rejected]`` (a hook, branch
    protection) is not that."""
    for line in porcelain.splitlines():
        flag, _, rest = line.partition("\t")
        if flag == "!" and "[rejected]" in rest:
            return True
    return False


class GitBranches:
    """``clone_url(repo)`` and ``git_env(repo)`` say where the repository is and how git
    authenticates to it (a ``ForgeClient``'s methods); ``cache_dir`` holds the caches."""

    def __init__(
        self,
        clone_url: Callable[[str], str],
        git_env: Callable[[str], Mapping[str, str]],
        cache_dir: Path | str,
        *,
        identity: tuple[str, str] = (MERGE_QUEUE_NAME, MERGE_QUEUE_EMAIL),
    ) -> None:
        self.clone_url = clone_url
        self.git_env = git_env
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self._locks: dict[str, asyncio.Lock] = {}

    # -- the Protocol ------------------------------------------------------------------
    async def base_sha(self, repo: str, base: str) -> str:
        base = _branch(base, "base branch")
        return await self._serialised(repo, self._remote_sha, repo, base)

    async def conflicts(self, repo: str, base: str, branch: str) -> tuple[str, list[str]]:
        base, branch = _branch(base, "base branch"), _branch(branch, "branch")
        return await self._serialised(repo, self._conflicts, repo, base, branch)

    async def prepare_merge(self, repo: str, base: str, branch: str, ref: str) -> tuple[str, str, list[str]]:
        base, branch, ref = _branch(base, "base branch"), _branch(branch, "branch"), _branch(ref, "queue ref")
        if ref in (base, branch):
            raise _bad(f"the merge queue's ref {ref!r} must be neither the base nor the branch")
        return await self._serialised(repo, self._prepare_merge, repo, base, branch, ref)

    async def fast_forward(self, repo: str, base: str, sha: str) -> bool:
        base, sha = _branch(base, "base branch"), _sha(sha)
        return await self._serialised(repo, self._fast_forward, repo, base, sha)

    async def delete_ref(self, repo: str, ref: str) -> None:
        ref = _branch(ref, "ref")
        await self._serialised(repo, self._delete_ref, repo, ref)

    # -- plumbing ----------------------------------------------------------------------
    async def _serialised(self, repo: str, fn, *args):
        lock = self._locks.setdefault(repo, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(fn, *args)

    def _env(self, repo: str) -> dict[str, str]:
        return dict(self.git_env(repo) or {})

    def _cache(self, repo: str) -> Path:
        path = self.cache_dir / f"{repo_token(repo)}.git"
        if not (path / "HEAD").is_file():
            path.mkdir(parents=True, exist_ok=True)
            gitops.run_git(path, "init", "-q", "--bare")
            gitops.run_git(path, "config", "gc.auto", "0")  # a cache: never a surprise gc in a call
        return path

    def _git(self, cache: Path, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        status, out, err = gitops.run_git(cache, *args, env=env, check=False)
        return status, out.decode("utf-8", "replace"), redact(err.strip())

    def _remote_sha(self, repo: str, base: str) -> str:
        url = self.clone_url(repo)
        status, out, err = self._git(self._cache(repo), "ls-remote", "--", url, f"refs/heads/{base}",
                                     env=self._env(repo))
        if status != 0:
            raise GitOperationError(f"{repo}: cannot read {base}: {err}")
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name == f"refs/heads/{base}":
                return sha
        raise _bad(f"{repo}: no branch {base!r}")

    def _fetch(self, repo: str, *branches: str) -> tuple[Path, list[str]]:
        """Fetch ``branches`` into the cache; their shas, in order."""
        cache, url = self._cache(repo), self.clone_url(repo)
        specs = [f"+refs/heads/{b}:{_private_ref(b)}" for b in dict.fromkeys(branches)]
        status, _, err = self._git(cache, "fetch", "-q", "--no-tags", "--no-write-fetch-head",
                                   "--no-recurse-submodules", "--", url, *specs, env=self._env(repo))
        if status != 0:
            if any(m in err.lower() for m in _MISSING_REMOTE_REF):
                raise _bad(f"{repo}: no such branch ({', '.join(branches)}): {err}")
            raise GitOperationError(f"{repo}: fetch of {', '.join(branches)} failed: {err}")
        shas = []
        for b in branches:
            status, out, err = self._git(cache, "rev-parse", "-q", "--verify", f"{_private_ref(b)}^{{commit}}")
            if status != 0:
                raise _bad(f"{repo}: {b} is not a commit")
            shas.append(out.strip())
        return cache, shas

    def _merge_tree(self, repo: str, cache: Path, base_sha: str, branch_sha: str) -> tuple[str, list[str]]:
        status, out, err = gitops.run_git(cache, "merge-tree", "--write-tree", "-z", "--name-only",
                                          "--no-messages", base_sha, branch_sha, check=False)
        if status not in (0, 1):  # 1: conflicts; anything else: it could not merge at all
            raise _bad(f"{repo}: cannot merge {branch_sha[:12]} into {base_sha[:12]}: {redact(err.strip())}")
        tree, files = parse_merge_tree(out)
        if status == 1 and not files:
            raise _bad(f"{repo}: merge-tree reported conflicts without naming a file")
        return tree, files if status == 1 else []

    def _conflicts(self, repo: str, base: str, branch: str) -> tuple[str, list[str]]:
        cache, (base_sha, branch_sha) = self._fetch(repo, base, branch)
        _, files = self._merge_tree(repo, cache, base_sha, branch_sha)
        return base_sha, files

    def _prepare_merge(self, repo: str, base: str, branch: str, ref: str) -> tuple[str, str, list[str]]:
        cache, (base_sha, branch_sha) = self._fetch(repo, base, branch)
        tree, files = self._merge_tree(repo, cache, base_sha, branch_sha)
        if files:
            return "", base_sha, files
        name, email = self.identity
        status, out, err = self._git(
            cache, "commit-tree", tree, "-p", base_sha, "-p", branch_sha,
            "-m", f"Merge {branch} into {base}\n\nTested and merged by the ccc merge queue.",
            env=gitops.identity_env(name, email))
        if status != 0:
            raise GitOperationError(f"{repo}: cannot build the merge of {branch} into {base}: {err}")
        sha = out.strip()
        # the ref is the queue's own: a candidate left by an earlier attempt is replaced
        self._push(repo, cache, f"+{sha}:refs/heads/{ref}", what=f"the merge queue's candidate {ref}")
        log.info("branches.candidate", repo=repo, base=base, branch=branch, ref=ref, sha=sha, base_sha=base_sha)
        return sha, base_sha, []

    def _fast_forward(self, repo: str, base: str, sha: str) -> bool:
        cache = self._cache(repo)
        if self._git(cache, "cat-file", "-e", f"{sha}^{{commit}}")[0] != 0:
            # built by another process: fetch it (it is on the queue's ref)
            status, _, err = self._git(cache, "fetch", "-q", "--no-tags", "--no-write-fetch-head",
                                       "--no-recurse-submodules", "--", self.clone_url(repo), sha,
                                       env=self._env(repo))
            if status != 0:
                raise _bad(f"{repo}: cannot fetch the candidate {sha[:12]}: {err}")
        pushed = self._push(repo, cache, f"{sha}:refs/heads/{base}", what=base, refused_ok=True)
        log.info("branches.fast_forward", repo=repo, base=base, sha=sha, moved=pushed)
        return pushed

    def _delete_ref(self, repo: str, ref: str) -> None:
        cache, url = self._cache(repo), self.clone_url(repo)
        status, out, err = self._git(cache, "ls-remote", "--symref", "--", url, "HEAD", env=self._env(repo))
        if status != 0:
            raise GitOperationError(f"{repo}: cannot read its default branch: {err}")
        if f"ref: refs/heads/{ref}\tHEAD" in out:
            raise _bad(f"{repo}: refusing to delete the default branch {ref!r}")
        try:
            self._push(repo, cache, f":refs/heads/{ref}", what=ref)
        except GitOperationError as e:
            if "remote ref does not exist" not in str(e):
                raise

    def _push(self, repo: str, cache: Path, spec: str, *, what: str, refused_ok: bool = False) -> bool:
        """Push one refspec; True when it landed. ``refused_ok``: a non-fast-forward
        refusal returns False instead of raising."""
        status, out, err = self._git(cache, "push", "--porcelain", "--no-verify", "--", self.clone_url(repo), spec,
                                     env=self._env(repo))
        if status == 0:
            return True
        text = redact(out.strip() + "\n" + err).strip()
        if push_rejected(out):
            if refused_ok:
                return False
            raise _bad(f"{repo}: push to {what} refused: {text}")
        if any(line.startswith("!\t") for line in out.splitlines()):
            raise _bad(f"{repo}: push to {what} refused by the remote: {text}")
        raise GitOperationError(f"{repo}: push to {what} failed: {text}")
