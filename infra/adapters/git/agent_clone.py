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
  from then on the change *is* that commit (:meth:`AgentClone.change`): what the change
  touches, its diff and stat are read from it, so the repository's tests, which run
  after, cannot alter what is reported, and the work tree (30,000 files in a large
  repository) is walked once per round, not once per question;
* before it is pushed the change is checked (:func:`check_change`): only ordinary files
  of the repository, no secret;
* it is pushed from here, with the forge's host-scoped credentials and this clone's
  config, which only the agent ever wrote.

A round on a pull request's existing branch (a CI fix, a rebase) starts the same way,
then fetches the branch and its base from the forge into this clone
(:meth:`AgentClone.open_branch`), rebases it here (:meth:`AgentClone.rebase`: ``git
rebase`` in a scratch clone of this one, never in the workspace) and records where the
round's commit goes (``parent``: the branch's head), what the change is measured
against (``base``: where the branch leaves its base, so the push checks see all the pull
request changes, not only the round's part) and the push's lease (the branch's head on
the forge when the round started: a push someone made since is never overwritten).

git's own advice for an untrusted ``.git`` is the same: do not run git in it, clone it
(git(1), "SECURITY").
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from events.errors import CccError
from events.secrets import Masker, process_masker
from events.work import BranchRound, ConflictedFile, Rebase

from infra.adapters.git import gitops
from infra.adapters.git.cleanup import remove_tree

DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024  # a source change has no business being bigger
_ORDINARY_MODES = frozenset({"100644", "100755", "120000"})  # file, executable, symlink
_GITLINK = "160000"
_DELETED = "000000"
_WORK_TREE_ID = "ccc.worktreeid"  # our config: the work tree's device and inode at the clone
_BRANCH = "ccc.branch"
# a round on a pull request's branch: what the change is measured against, where its
# commit goes, the push's lease, and the base branch with its commit as fetched
_BASE = "ccc.base"
_PARENT = "ccc.parent"
_LEASE = "ccc.lease"
_UPSTREAM = "ccc.upstream"
_ONTO = "ccc.onto"
_CHANGE = "ccc.change"  # the commit that is the round's change, once there is one
CONFLICTS_REF = "refs/ccc/conflicts"  # the branch's net change on the base, conflict markers in it
_MARKER = re.compile(rb"^(<{7}|>{7})( |$)", re.MULTILINE)
_MAX_REGIONS = 6000  # characters of one file's conflicting regions shown to the coder
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
        clone.adopt_index()
        st = os.lstat(clone.work_tree)
        clone._git("config", _WORK_TREE_ID, f"{st.st_dev}:{st.st_ino}")
        (clone.git_dir / _WORK_TREE_FILE).write_text(os.path.abspath(clone.work_tree))
        return clone

    def adopt_index(self) -> None:
        """Take the workspace's index, right after our own git checked the workspace out
        (before the coder or any command ran): its stat data spares re-hashing unchanged
        files, and what it tracks stays tracked even where ``.gitignore`` matches. Called
        only then: later the workspace's ``.git`` is the model's."""
        index = Path(gitops.git_output(self.work_tree, "rev-parse", "--absolute-git-dir"), "index")
        if index.is_file():
            shutil.copy2(index, self.git_dir / "index")

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

    def _config(self, key: str) -> str | None:
        status, out, _ = self._git("config", "--get", key, check=False)
        return out.decode().strip() if status == 0 else None

    def base(self) -> str | None:
        """The commit the change is measured against: the default branch as cloned (None
        for a repository without commits); in a round on a pull request's branch, where the
        branch leaves its base (the base's latest commit once rebased on it)."""
        fixed = self._config(_BASE)
        if fixed:
            return fixed
        status, out, _ = self._git("rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
        return out.decode().strip() if status == 0 else None

    def parent(self) -> str | None:
        """The commit the change's commit goes on: the base, or in a round the branch's
        head (rebased, or the new base itself when the coder resolves conflicts)."""
        return self._config(_PARENT) or self.base()

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

    # -- a round on a pull request's existing branch -------------------------------------
    def open_branch(self, branch: str, base_branch: str, *, env: Mapping[str, str] | None = None) -> BranchRound:
        """Fetch ``branch`` and ``base_branch`` from ``origin`` (the forge) as they are now,
        with ``env``'s credentials: the branch's head becomes the commit the round's commit
        goes on and the push's lease; the change is measured from where it leaves the base."""
        self.start_branch(branch)
        status, _, _ = self._git("check-ref-format", "--branch", base_branch, check=False)
        if status != 0:
            raise gitops.GitOperationError(f"invalid base branch name {base_branch!r}", retryable=False)
        status, _, err = self._git(
            "fetch", "-q", "--no-tags", "--no-write-fetch-head", "origin",
            f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
            f"+refs/heads/{base_branch}:refs/remotes/origin/{base_branch}", env=env, check=False)
        if status != 0:
            text = gitops.redact(err.strip())
            if "couldn't find remote ref" in text:
                raise gitops.GitOperationError(f"{branch} or {base_branch} is not on the forge: {text}",
                                               retryable=False)
            raise gitops.GitOperationError(f"fetching {branch} and {base_branch} failed: {text}")
        head = self._out("rev-parse", f"refs/remotes/origin/{branch}^{{commit}}")
        onto = self._out("rev-parse", f"refs/remotes/origin/{base_branch}^{{commit}}")
        status, out, _ = self._git("merge-base", onto, head, check=False)
        if status != 0:
            raise gitops.GitOperationError(f"{branch} shares no history with {base_branch}", retryable=False)
        fork_point = out.decode().strip()
        self._git("update-ref", f"refs/heads/{branch}", head)
        for key, value in ((_UPSTREAM, base_branch), (_ONTO, onto), (_BASE, fork_point),
                           (_PARENT, head), (_LEASE, head), (_CHANGE, head)):
            self._git("config", key, value)
        return BranchRound(branch=branch, base_branch=base_branch, head=head, base=onto, fork_point=fork_point)

    def _round(self) -> tuple[str, str, str]:
        """(branch, base branch, the base's commit as fetched) of the open round."""
        upstream, onto = self._config(_UPSTREAM), self._config(_ONTO)
        if not upstream or not onto:
            raise gitops.GitOperationError("no pull request branch was opened in this clone", retryable=False)
        return self.branch(), upstream, onto

    def rebase(self, message: str, author_name: str, author_email: str) -> Rebase:
        """Rebase the branch on the base's commit as fetched, mechanically: ``git rebase``
        (in a scratch clone of this one); where only that commit-by-commit replay conflicts
        and the branch's net change still merges cleanly (e.g. the branch had merged the
        base itself), that net change as one commit (``message``) on the base. Where the
        change and the base really collide, nothing is changed and the conflicting files
        are returned, both sides shown; :data:`CONFLICTS_REF` then holds the change on the
        base with the conflict markers in it, for :meth:`start_on_conflicts`."""
        branch, upstream, onto = self._round()
        head = self._out("rev-parse", f"refs/heads/{branch}")
        if self._git("merge-base", "--is-ancestor", onto, head, check=False)[0] == 0:
            self._move(head, onto)
            return Rebase(status="up_to_date", head=head, base=onto)
        identity = gitops.identity_env(author_name, author_email)
        new = self._replay(head, onto, identity)
        squashed = False
        if new is None:
            tree, conflicts = self._merge(f"origin/{upstream}", branch)
            if conflicts:
                marked = self._out("commit-tree", tree, "-p", onto, "-m",
                                   f"{branch} on {upstream}, with conflicts", env=identity)
                self._git("update-ref", CONFLICTS_REF, marked)
                return Rebase(status="conflicts", head=head, base=onto, conflicts=conflicts)
            squashed = True  # (a net change of nothing leaves the branch at the base)
            empty = tree == self._out("rev-parse", f"{onto}^{{tree}}")
            new = onto if empty else self._out("commit-tree", tree, "-p", onto, "-m", message, env=identity)
        self._move(new, onto)
        return Rebase(status="rebased", head=new, base=onto, squashed=squashed)

    def start_on_conflicts(self) -> tuple[str, str]:
        """After a :meth:`rebase` with conflicts: the round's commit goes on the base, and
        is measured against it. Returns (the commit with the markers, the base)."""
        _, _, onto = self._round()
        marked = self._out("rev-parse", "-q", "--verify", f"{CONFLICTS_REF}^{{commit}}")
        self._move(onto, onto)
        self._git("config", "--unset-all", _CHANGE, check=False)  # the change is the resolution, once committed
        return marked, onto

    def _move(self, head: str, base: str) -> None:
        self._git("update-ref", f"refs/heads/{self.branch()}", head)
        self._git("config", _PARENT, head)
        self._git("config", _BASE, base)
        self._git("config", _CHANGE, head)

    def _replay(self, head: str, onto: str, identity: Mapping[str, str]) -> str | None:
        """``git rebase`` of ``head`` on ``onto`` in a scratch clone of this one (ours too:
        under the agent's clones, never seen by a sandbox); the new head, fetched back into
        this clone, or None when a commit does not apply."""
        with tempfile.TemporaryDirectory(dir=self.git_dir.parent, prefix=f"{self.git_dir.name}.rebase-") as tmp:
            work = Path(tmp, "work")
            gitops.run_git(tmp, "clone", "-q", "--shared", "--no-checkout", "--no-tags", "--",
                           str(self.git_dir), str(work))
            gitops.run_git(work, "checkout", "-q", "--detach", head)
            status, _, err = gitops.run_git(work, "rebase", "-q", "--no-autosquash", "--no-autostash", onto,
                                            env=identity, check=False)
            if status != 0:
                git_dir = work / ".git"
                if (git_dir / "rebase-merge").is_dir() or (git_dir / "rebase-apply").is_dir():
                    return None  # a commit did not apply: the scratch clone goes, nothing else changed
                raise gitops.GitOperationError(f"git rebase failed ({status}): {gitops.redact(err.strip())}")
            self._git("fetch", "-q", "--no-tags", "--no-write-fetch-head", str(work), "+HEAD:refs/ccc/rebased")
        return self._out("rev-parse", "refs/ccc/rebased")

    def _merge(self, ours: str, theirs: str) -> tuple[str, tuple[ConflictedFile, ...]]:
        """``git merge-tree`` of ``theirs`` (the branch) into ``ours`` (the base): the
        merged tree (conflict markers in it, diff3 style: the fork point's version too)
        and the conflicting files."""
        status, out, err = self._git("-c", "merge.conflictStyle=diff3", "merge-tree", "--write-tree", "-z",
                                     "--name-only", ours, theirs, check=False)
        if status not in (0, 1):
            raise gitops.GitOperationError(f"git merge-tree failed ({status}): {gitops.redact(err.strip())}")
        fields = out.decode("utf-8", "surrogateescape").split("\0")
        tree, rest = fields[0], fields[1:]
        if status == 0:
            return tree, ()
        end = rest.index("") if "" in rest else len(rest)
        paths = list(dict.fromkeys(rest[:end]))
        messages: dict[str, list[str]] = {p: [] for p in paths}
        info, i = rest[end + 1:], 0
        while i < len(info) and info[i].isdigit():  # <n> <path>... <type> <message>
            n = int(info[i])
            named, kind, text = info[i + 1:i + 1 + n], info[i + 1 + n], info[i + 2 + n]
            i += 3 + n
            if kind.startswith("CONFLICT"):
                for p in named:
                    if p in messages:
                        messages[p].append(text.strip())
        return tree, tuple(ConflictedFile(path=p, messages=tuple(messages[p]), regions=self._regions(tree, p))
                           for p in paths)

    def _regions(self, tree: str, path: str) -> str:
        """The conflicting regions of ``path`` in ``tree``, three lines around each (what
        a resolver needs to see), cut at :data:`_MAX_REGIONS` characters."""
        status, data, _ = self._git("cat-file", "blob", f"{tree}:{path}", check=False)
        if status != 0 or b"\0" in data[:8000]:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        keep: set[int] = set()
        start = None
        for n, line in enumerate(lines):
            if line.startswith("<<<<<<<"):
                start = n
            elif line.startswith(">>>>>>>") and start is not None:
                keep.update(range(max(0, start - 3), min(len(lines), n + 4)))
                start = None
        out, last = [], -2
        for n in sorted(keep):
            if n != last + 1:
                out.append(f"@@ line {n + 1} @@")
            out.append(lines[n])
            last = n
        text = "\n".join(out)
        return text if len(text) <= _MAX_REGIONS else text[:_MAX_REGIONS] + "\n[... cut]"

    def markers_left(self, paths: list[str] | tuple[str, ...]) -> list[str]:
        """Which of ``paths`` still hold a conflict marker line (``<<<<<<<``/``>>>>>>>``)
        in the change (:meth:`change`; a deleted path holds none)."""
        tree = self.change()
        left = []
        for path in paths:
            status, data, _ = self._git("cat-file", "blob", f"{tree}:{path}", check=False)
            if status == 0 and _MARKER.search(data):
                left.append(path)
        return left

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

    def change(self) -> str:
        """The round's change: the commit recorded as it (by :meth:`commit`, or a branch
        :meth:`open_branch` fetched or :meth:`rebase` moved, when no coder follows), else a
        :meth:`snapshot` of the workspace's files as they are now."""
        return self._config(_CHANGE) or self.snapshot()

    def _base_tree(self) -> str:
        return self.base() or gitops.EMPTY_TREE

    def changed_files(self) -> list[str]:
        """What the change touches against :meth:`base`."""
        out = self._git("diff-tree", "-r", "-z", "--name-only", "--no-renames", self._base_tree(), self.change())[1]
        return sorted(p for p in out.decode("utf-8", "surrogateescape").split("\0") if p)

    def diff(self, *, binary: bool = False) -> str:
        args = ["diff", "--no-renames", "--no-ext-diff", "--no-textconv", "--no-color",
                "--src-prefix=a/", "--dst-prefix=b/"]
        if binary:
            args.append("--binary")
        return self._git(*args, self._base_tree(), self.change())[1].decode("utf-8", "replace")

    def diff_stat(self) -> str:
        out = self._out("diff", "--no-renames", "--shortstat", self._base_tree(), self.change())
        return out or "0 files changed, 0 insertions(+), 0 deletions(-)"

    def commit(self, message: str, author_name: str, author_email: str) -> str:
        """Commit the workspace's files on :meth:`parent` (the base; in a round, the
        branch's head) as the task's branch, and record it as the round's change (one
        snapshot of the files, the only one of the round); returns the sha.
        :class:`~infra.adapters.git.gitops.NothingToCommit` when the files are the parent's."""
        if not message.strip():
            raise gitops.GitOperationError("empty commit message", retryable=False)
        tree = self.snapshot()
        parent = self.parent()
        if tree == (self._out("rev-parse", f"{parent}^{{tree}}") if parent else gitops.EMPTY_TREE):
            raise gitops.NothingToCommit(f"no change to commit in {self.work_tree}")
        parents = ["-p", parent] if parent else []
        sha = self._out("commit-tree", tree, *parents, "-m", message,
                        env=gitops.identity_env(author_name, author_email))
        self._git("update-ref", f"refs/heads/{self.branch()}", sha)
        self._git("config", _CHANGE, sha)
        return sha

    # -- checked, then pushed ----------------------------------------------------------
    def push(self, *, env: Mapping[str, str] | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
             masker: Masker | None = None) -> str:
        """Check the committed change (:func:`check_change`: all the branch changes
        against :meth:`base`), then push it as the task's branch to ``origin`` (the forge)
        with ``env``'s credentials, in a round leased on the branch's head when the round
        started; returns the sha."""
        branch = self.branch()
        sha = self._out("rev-parse", f"refs/heads/{branch}")
        check_change(self.git_dir, self.base(), sha, max_file_bytes=max_file_bytes, masker=masker)
        return gitops.push(self.git_dir, branch, env={**(env or {}), "GIT_DIR": str(self.git_dir)},
                           lease=self._config(_LEASE))


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


__all__ = ["CONFLICTS_REF", "DEFAULT_MAX_FILE_BYTES", "AgentClone", "Entry", "UnsafeChange", "check_change",
           "remove_orphans"]
