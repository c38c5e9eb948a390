"""The agent's own clone of a workspace's repository: where a change is recorded,
checked and pushed from, out of the model's reach.

Why: the workspace's ``.git`` is the model's. Its commands (and the repository's tests)
can rewrite ``.git/config``, and git honours that file in every command run there: an
``http.proxy`` or ``credential.helper`` that sees the token at push time, a
``core.sshCommand``, a ``core.worktree`` pointing at ``~/.ssh``, a ``filter.<x>.clean``
command that ``git add`` runs *outside the sandbox*, as the agent, next to its
credentials. Overriding the keys we know of is a losing game, so after the clone the
agent runs git on the workspace's ``.git`` never again:

* right after the workspace is cloned (before the coder or any command ran) the agent
  takes a bare clone of it into a directory of its own (``git_dir``, outside every task
  directory, so no sandbox ever sees it), with the forge's URL as its ``origin``;
* the change is what the workspace's *files* are, as this clone's git sees them
  (``GIT_DIR`` = ours, ``GIT_WORK_TREE`` = the workspace's files, our index): nothing
  of the workspace's ``.git`` is read (git skips every entry named ``.git`` when it walks
  a tree); commits the model may have made there do not matter, the files do;
* the commit is made here, on the commit the task started from, with our identity;
* before it is pushed the change is checked (:func:`check_change`): only ordinary files
  of the repository, no secret;
* it is pushed from here, with the forge's host-scoped credentials and this clone's
  config, which only the agent ever wrote.

git's own advice for an untrusted ``.git`` is the same: do not run git in it, clone it
(git(1), "SECURITY").
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from events.errors import CccError
from events.secrets import Masker, process_masker

from infra.adapters.git import gitops
from infra.adapters.git.cleanup import remove_tree

DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024  # a source change has no business being bigger
_ORDINARY_MODES = frozenset({"100644", "100755", "120000"})  # file, executable, symlink
_GITLINK = "160000"
_DELETED = "000000"
_WORK_TREE_ID = "ccc.worktreeid"  # our config: the work tree's device and inode at the clone
_BRANCH = "ccc.branch"
_WORK_TREE_FILE = "ccc-work-tree"  # the work tree's path, for the clean-up (no git needed)


class UnsafeChange(CccError):
    """The change is not one to push: it touches git's own files or a submodule, adds a
    symlink out of the tree or a file above the size limit, or holds a secret. Not
    retryable: a change like that is for a human to look at, not a new attempt."""

    retryable = False


class Entry(NamedTuple):
    """One path of a change, as ``git diff-tree --raw`` reports it."""

    old_mode: str
    new_mode: str
    new_sha: str
    status: str
    path: str


class AgentClone:
    """The agent's clone (``git_dir``, bare) of the workspace whose files are at
    ``work_tree``. Its calls block (git is a subprocess)."""

    def __init__(self, git_dir: Path | str, work_tree: Path | str) -> None:
        self.git_dir = Path(git_dir)
        self.work_tree = Path(work_tree)

    # -- making it -----------------------------------------------------------------
    @classmethod
    def take(cls, git_dir: Path | str, work_tree: Path | str) -> AgentClone:
        """Clone the workspace's repository at ``work_tree`` (just cloned: nothing but our
        own git has touched it yet) into ``git_dir``, replacing what was there. Its
        ``origin`` is where the workspace was cloned from."""
        clone = cls(git_dir, work_tree)
        remove_tree(clone.git_dir)
        clone.git_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        url = gitops.git_output(clone.work_tree, "remote", "get-url", "origin")
        # --no-hardlinks: the workspace's object files must not be ours too (the model
        # could rewrite them in place); --no-local would also do, only slower
        gitops.run_git(clone.git_dir.parent, "clone", "-q", "--bare", "--no-hardlinks", "--",
                       str(clone.work_tree), str(clone.git_dir))
        os.chmod(clone.git_dir, 0o700)
        clone._git("remote", "set-url", "origin", url)
        # git trusts the stat data of an index to skip re-hashing unchanged files: the
        # workspace's index, fresh from the checkout, gives ours that head start
        # (copy2 keeps its mtime, which git's racy-file check compares against)
        index = Path(gitops.git_output(clone.work_tree, "rev-parse", "--absolute-git-dir"), "index")
        if index.is_file():
            shutil.copy2(index, clone.git_dir / "index")
        st = os.lstat(clone.work_tree)
        clone._git("config", _WORK_TREE_ID, f"{st.st_dev}:{st.st_ino}")
        (clone.git_dir / _WORK_TREE_FILE).write_text(os.path.abspath(clone.work_tree))
        return clone

    def exists(self) -> bool:
        return (self.git_dir / "HEAD").is_file()

    # -- git here --------------------------------------------------------------------
    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        # GIT_DIR set: git does no discovery, so the workspace's .git is never opened
        env = {"GIT_DIR": str(self.git_dir), "GIT_WORK_TREE": str(self.work_tree)}
        env.update(extra or {})
        return env

    def _git(self, *args: str, env: Mapping[str, str] | None = None,
             check: bool = True) -> tuple[int, bytes, str]:
        return gitops.run_git(self.git_dir, *args, env=self._env(env), check=check)

    def _out(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        return self._git(*args, env=env)[1].decode("utf-8", "replace").strip()

    def base(self) -> str | None:
        """The commit the task started from (the default branch as cloned), or None for
        a repository without commits."""
        status, out, _ = self._git("rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
        return out.decode().strip() if status == 0 else None

    def default_branch(self) -> str:
        return self._out("symbolic-ref", "--short", "HEAD")

    def start_branch(self, name: str) -> None:
        """The branch the change will be pushed as (validated as a branch name)."""
        status, _, _ = self._git("check-ref-format", "--branch", name, check=False)
        if status != 0:
            raise gitops.GitOperationError(f"invalid branch name {name!r}", retryable=False)
        self._git("config", _BRANCH, name)

    def branch(self) -> str:
        return self._out("config", "--get", _BRANCH)

    # -- the change ------------------------------------------------------------------
    def snapshot(self) -> str:
        """The tree of the workspace's files as they are now (ignored files left out, as
        the repository's ``.gitignore`` says), written to our object store."""
        expected = self._out("config", "--get", _WORK_TREE_ID)
        try:
            st = os.lstat(self.work_tree)
        except FileNotFoundError:
            raise UnsafeChange(f"the workspace's repository {self.work_tree} is gone") from None
        if f"{st.st_dev}:{st.st_ino}" != expected:  # e.g. a symlink to ~ put in its place
            raise UnsafeChange(f"the workspace's repository {self.work_tree} was replaced: not read")
        self._git("add", "-A")
        return self._out("write-tree")

    def _base_tree(self) -> str:
        return self.base() or gitops.EMPTY_TREE

    def changed_files(self) -> list[str]:
        out = self._git("diff-tree", "-r", "-z", "--name-only", "--no-renames", self._base_tree(),
                        self.snapshot())[1]
        return sorted(p for p in out.decode("utf-8", "surrogateescape").split("\0") if p)

    def diff(self, *, binary: bool = False) -> str:
        args = ["diff", "--no-renames", "--no-ext-diff", "--no-textconv", "--no-color",
                "--src-prefix=a/", "--dst-prefix=b/"]
        if binary:
            args.append("--binary")
        return self._git(*args, self._base_tree(), self.snapshot())[1].decode("utf-8", "replace")

    def diff_stat(self) -> str:
        out = self._out("diff", "--no-renames", "--shortstat", self._base_tree(), self.snapshot())
        return out or "0 files changed, 0 insertions(+), 0 deletions(-)"

    def commit(self, message: str, author_name: str, author_email: str) -> str:
        """Commit the workspace's files on the base as the task's branch; returns the sha."""
        if not message.strip():
            raise gitops.GitOperationError("empty commit message", retryable=False)
        tree = self.snapshot()
        base = self.base()
        if tree == (self._out("rev-parse", f"{base}^{{tree}}") if base else gitops.EMPTY_TREE):
            raise gitops.NothingToCommit(f"no change to commit in {self.work_tree}")
        parents = ["-p", base] if base else []
        sha = self._out("commit-tree", tree, *parents, "-m", message,
                        env=gitops.identity_env(author_name, author_email))
        self._git("update-ref", f"refs/heads/{self.branch()}", sha)
        return sha

    # -- checked, then pushed ----------------------------------------------------------
    def push(self, *, env: Mapping[str, str] | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
             masker: Masker | None = None) -> str:
        """Check the committed change (:func:`check_change`), then push it as the task's
        branch to ``origin`` (the forge) with ``env``'s credentials; returns the sha."""
        branch = self.branch()
        sha = self._out("rev-parse", f"refs/heads/{branch}")
        check_change(self.git_dir, self.base(), sha, max_file_bytes=max_file_bytes, masker=masker)
        return gitops.push(self.git_dir, branch, env={**(env or {}), "GIT_DIR": str(self.git_dir)})


def remove_orphans(clones_dir: Path | str, max_age: float) -> list[Path]:
    """Remove the agent's clones whose workspace is gone (an agent that crashed mid-attempt
    never finished them), and those older than ``max_age`` seconds that never got as far
    as naming their workspace; returns what was removed. A clone being taken right now
    is younger than that, so another agent's clean-up cannot pull it away."""
    root = Path(clones_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for git_dir in root.iterdir():
        marker = git_dir / _WORK_TREE_FILE
        try:
            if marker.is_file():
                gone = not os.path.lexists(marker.read_text().strip())
            else:
                gone = now - git_dir.lstat().st_mtime > max_age
        except OSError:
            continue
        if gone:
            remove_tree(git_dir)
            removed.append(git_dir)
    return removed


# -- what may be pushed ------------------------------------------------------------------
def _entries(git_dir: Path, base: str | None, commit: str) -> list[Entry]:
    out = gitops.run_git(git_dir, "diff-tree", "-r", "-z", "--raw", "--no-renames", "--no-commit-id",
                         base or gitops.EMPTY_TREE, commit, env={"GIT_DIR": str(git_dir)})[1]
    fields = out.decode("utf-8", "surrogateescape").split("\0")
    entries = []
    for meta, path in zip(fields[0::2], fields[1::2]):
        if not meta:
            continue
        old_mode, new_mode, _old_sha, new_sha, status = meta.lstrip(":").split()
        entries.append(Entry(old_mode, new_mode, new_sha, status, path))
    return entries


def _git_internal(path: str) -> bool:
    """A path git itself, or a checkout on another system, would treat as git's own:
    ``.git`` anywhere (also as Windows and macOS spell it: ``.GIT``, ``.git.``, ``git~1``),
    ``.gitmodules`` (submodule configuration)."""
    for part in path.split("/"):
        low = part.lower().rstrip(". ")
        if low in (".git", "git~1", ".gitmodules") or low.startswith(".gitmodules"):
            return True
    return False


def _escapes(path: str, target: str) -> bool:
    """A symlink at ``path`` to ``target`` leaves the tree (or points into ``.git``)."""
    if not target or target.startswith("/") or "\0" in target:
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved == ".." or resolved.startswith("../") or _git_internal(resolved)


def _sizes(git_dir: Path, shas: list[str]) -> dict[str, int]:
    if not shas:
        return {}
    run = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objectsize)"],
                         input="".join(f"{s}\n" for s in shas).encode(), capture_output=True, check=True,
                         env={**os.environ, **gitops.git_env({"GIT_DIR": str(git_dir)})}, cwd=git_dir)
    return {sha: int(size) for sha, size in (line.split() for line in run.stdout.decode().splitlines())}


def _added_text(git_dir: Path, base: str | None, commit: str) -> dict[str, str]:
    """Per path, what the change adds: the added lines of text files, the whole content
    of binary ones (a secret in a binary file is still a secret), the path itself."""
    env = {"GIT_DIR": str(git_dir)}
    base = base or gitops.EMPTY_TREE
    out = gitops.run_git(git_dir, "diff", "-U0", "--no-color", "--no-ext-diff", "--no-textconv",
                         "--no-renames", "--src-prefix=a/", "--dst-prefix=b/", base, commit, env=env)[1]
    added: dict[str, list[str]] = {}
    path = None
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("+++ "):
            path = line[6:] if line.startswith("+++ b/") else None
            if path is not None:
                added.setdefault(path, [path])
        elif path is not None and line.startswith("+"):
            added[path].append(line[1:])
    numstat = gitops.run_git(git_dir, "diff", "--numstat", "-z", "--no-renames", base, commit, env=env)[1]
    for record in numstat.decode("utf-8", "surrogateescape").split("\0"):
        ins, _, rest = record.partition("\t")
        _dels, _, binary_path = rest.partition("\t")
        if ins == "-" and binary_path:
            blob = gitops.run_git(git_dir, "cat-file", "blob", f"{commit}:{binary_path}", env=env)[1]
            added.setdefault(binary_path, [binary_path]).append(blob.decode("utf-8", "replace"))
    return {p: "\n".join(lines) for p, lines in added.items()}


def check_change(
    git_dir: Path | str, base: str | None, commit: str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    masker: Masker | None = None,
) -> None:
    """Refuse (:class:`UnsafeChange`, saying why) a change ``base..commit`` that is not
    made only of ordinary files of the repository:

    * nothing of git's own (``.git`` in any spelling, ``.gitmodules``), no gitlink
      (a submodule, or an embedded repository the coder cloned) added, changed or removed;
    * only regular files, executables and symlinks (no other mode);
    * symlinks only *within* the tree (relative, not out through ``..``, not into
      ``.git``): repositories do use in-tree links, and an out-of-tree one is never a code
      change, only a way to make whoever checks it out read something else
      (``CLAUDE.md -> /proc/self/environ``);
    * no file above ``max_file_bytes``;
    * no secret (:meth:`events.secrets.Masker.findings`: a value this process knows, or a
      credential format) in what it adds.
    """
    git_dir = Path(git_dir)
    masker = masker or process_masker()
    entries = _entries(git_dir, base, commit)
    for e in entries:
        if _git_internal(e.path):
            raise UnsafeChange(f"the change touches git's own files ({e.path}): not pushed")
        if _GITLINK in (e.old_mode, e.new_mode):
            raise UnsafeChange(f"the change adds, changes or removes a submodule ({e.path}): not pushed")
        if e.new_mode != _DELETED and e.new_mode not in _ORDINARY_MODES:
            raise UnsafeChange(f"the change gives {e.path} the mode {e.new_mode}: not pushed")
        if e.new_mode == "120000":
            target = gitops.run_git(git_dir, "cat-file", "blob", e.new_sha, env={"GIT_DIR": str(git_dir)})[1]
            shown = target.decode("utf-8", "replace")
            if _escapes(e.path, shown):
                raise UnsafeChange(f"the change adds a symlink out of the repository ({e.path} -> "
                                   f"{masker.text(shown)[:200]}): not pushed")
    sizes = _sizes(git_dir, [e.new_sha for e in entries if e.new_mode in ("100644", "100755")])
    for e in entries:
        size = sizes.get(e.new_sha, 0)
        if size > max_file_bytes:
            raise UnsafeChange(f"the change has a file of {size} bytes ({e.path}), above the limit of "
                               f"{max_file_bytes}: not pushed")
    for path, text in _added_text(git_dir, base, commit).items():
        found = masker.findings(text)
        if found:
            first = found[0]
            more = f", and {len(found) - 1} more" if len(found) > 1 else ""
            raise UnsafeChange(f"the change contains a secret ({first.kind} in {masker.text(path)}: "
                               f"{first.line!r}{more}): not pushed")


__all__ = ["DEFAULT_MAX_FILE_BYTES", "AgentClone", "Entry", "UnsafeChange", "check_change", "remove_orphans"]
