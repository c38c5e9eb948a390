"""Where an agent works on repositories, as the pipeline sees it (``actors.ports.Workbench``):
task workspaces under one root directory, git on their clones (:mod:`gitops`), and the
repository's own tests (how to run them, and the counts their output reports).

Only the root and the sandbox are state here; every call goes to the module that owns
the concept. The git and file-system calls block: the pipeline runs the slow ones in a
thread.

The sandbox (:mod:`infra.adapters.git.sandbox`) is probed when the agent starts
(:meth:`GitWorkbench.prepare`); if none can be made, the agent still starts, and every
command of every attempt is refused with the reason (fail closed). The repository's
network setting is read when it is cloned, from the commit the task starts on, before
the coder or any command could change it.

Git after the clone goes through the agent's own clone of each workspace
(:mod:`infra.adapters.git.agent_clone`, kept under ``<root>/.agent-clones``, outside every
task directory and so outside every sandbox): the change is the workspace's files as
that clone's git sees them, and it is committed, checked and pushed there, never with
the workspace's ``.git`` (the model's to rewrite).

A round on a pull request's existing branch (a CI fix, a rebase: :meth:`GitWorkbench.
open_branch`, :meth:`~GitWorkbench.rebase`, :meth:`~GitWorkbench.check_out_conflicts`)
fetches and rebases in the agent's clone, then checks the result out in the workspace
with the workspace's own git, from the agent's clone (a local path: no credentials),
before the coder or any command ran there, so the coder finds the branch checked out.

Warm repositories (:mod:`infra.adapters.git.mirrors`): a workspace's clone is made from
the agent's mirror of the repository (fetched first), usually by taking a checkout built
in the background after the previous task (:mod:`~infra.adapters.git.background`), so
the task does not wait for the repository's files to be written. The workspace borrows
the mirror's objects (its metadata names them: the sandbox binds them read-only).

What a finished task keeps (:meth:`GitWorkbench.finish_workspace`): its ``metadata.json``
and ``logs/`` until the retention ends. The checkout, its ``home`` and ``tmp`` and the
agent's clone go at once: the change is on the forge (the push) and in the log (the
diff, the test log and the transcript are artifacts the reports reference), and a
checkout of a large repository is most of a workspace's size (30,000 files: ~170 MB of
~170 MB). They are renamed into ``<root>/<agent>/trash`` (instant, on the agent's event
loop) and deleted by the background thread; the retention clean-up sweeps what a crash
left there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from events.errors import ConfigError
from events.work import BranchRound, Rebase, TestCounts

from infra.adapters.git import gitops
from infra.adapters.git.agent_clone import CONFLICTS_REF, DEFAULT_MAX_FILE_BYTES, AgentClone, remove_orphans
from infra.adapters.git.background import Chores
from infra.adapters.git.cleanup import cleanup_expired, remove_tree
from infra.adapters.git.mirrors import MIRRORS_DIR, Mirror, mirror_name
from infra.adapters.git.sandbox import (
    MAX_SANDBOX_FILE,
    NO_NETWORK,
    SANDBOX_FILES,
    NetworkPolicy,
    Sandbox,
    SandboxUnavailable,
    default_sandbox,
    parse_sandbox_file,
)
from infra.adapters.git.test_output import parse_test_counts
from infra.adapters.git.workspace import Workspace

log = structlog.get_logger("ccc.workbench")

TRASH_DIR = "trash"
MIRROR_RETENTION = 7 * 24 * 3600.0  # a mirror no task used for this long is removed


class GitWorkbench:
    """``spares``: warm checkouts kept ready per repository (0: every task builds its
    own from the mirror); ``mirror_retention``: seconds after which a mirror no task used
    is removed."""

    def __init__(self, root: Path | str, *, sandbox: Sandbox | None = None, spares: int = 1,
                 mirror_retention: float = MIRROR_RETENTION) -> None:
        self.root = Path(root)
        self.sandbox = sandbox if sandbox is not None else default_sandbox()
        self.spares = spares
        self.mirror_retention = mirror_retention
        self.chores = Chores()

    @property
    def sandbox_name(self) -> str:
        return self.sandbox.name

    # -- task workspaces ---------------------------------------------------------------
    def prepare(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)  # workspaces hold clones of private repositories: the agent's only
        try:
            self.sandbox.check()  # once, at start: the failure is logged with its reason here
        except SandboxUnavailable:
            pass  # and every command refused with it later (fail closed, per attempt)

    def create_workspace(self, agent_id: str, task_id: str, metadata: Mapping[str, Any]) -> Workspace:
        return Workspace.create(self.root, agent_id, task_id, metadata, sandbox=self.sandbox)

    def finish_workspace(self, agent_id: str, task_id: str, outcome: str) -> None:
        """Mark it finished and drop all but its metadata and logs (see the module's
        docstring): renamed away here, deleted in the background."""
        ws = Workspace.open(self.root, agent_id, task_id)
        ws.mark_finished(outcome=outcome, kept=["metadata.json", "logs"])
        remove_tree(self._agent_clone(ws.repo_dir).git_dir)  # the push is over: not needed
        trash = self.root / agent_id / TRASH_DIR
        moved = False
        for d in (ws.repo_dir, ws.home_dir, ws.tmp_dir):
            if d.exists() or d.is_symlink():
                trash.mkdir(mode=0o700, exist_ok=True)
                os.rename(d, trash / f"{ws.path.name}-{d.name}-{uuid.uuid4().hex[:8]}")
                moved = True
        if moved:
            self.chores.submit(("trash", agent_id), _empty, trash)

    def remove_expired(self, agent_id: str, retention: float) -> list[Path]:
        """Finished workspaces past the retention, the agent's orphaned clones, what the
        trash still holds, and mirror generations (or whole mirrors) nothing uses."""
        removed = cleanup_expired(self.root, agent_id, retention)
        remove_orphans(self.root / ".agent-clones", max(retention, 3600.0))
        _empty(self.root / agent_id / TRASH_DIR)
        mirrors = self.root.resolve() / agent_id / MIRRORS_DIR  # as the workspaces recorded them
        if mirrors.is_dir():
            in_use = borrowed_objects(self.root, agent_id)
            for path in sorted(mirrors.iterdir()):
                if path.is_dir() and not path.is_symlink():
                    Mirror(path, "").collect(in_use, self.mirror_retention)
        return removed

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for the background chores (warm checkouts, trash) submitted so far: for
        benches and tests that need the agent's disk quiet. False on timeout."""
        return self.chores.settle(timeout)

    def _agent_clone(self, repo_dir: Path) -> AgentClone:
        """The agent's clone of the workspace at ``repo_dir``: one per workspace, named
        by its path as given, symlinks not resolved (a retry's fresh workspace replaces it;
        a workspace swapped for a link is still found, and refused)."""
        key = hashlib.sha256(os.path.abspath(repo_dir).encode()).hexdigest()[:20]
        return AgentClone(self.root / ".agent-clones" / f"{key}.git", repo_dir)

    def _cloned(self, repo_dir: Path) -> AgentClone:
        clone = self._agent_clone(repo_dir)
        if not clone.exists():
            raise ConfigError(f"{repo_dir} was not cloned by this workbench: no agent clone to work with")
        return clone

    # -- git on a workspace's clone --------------------------------------------------------
    def clone(self, url: str, dest: Path, *, env: Mapping[str, str] | None = None) -> None:
        """Clone (a task workspace's: from the agent's mirror of ``url``, fetched first),
        then fix the network the workspace's commands get from the repository's
        ``.ccc/sandbox.toml`` at the cloned commit (refused here, with the reason, when the
        operator does not allow what it asks for)."""
        ws = Workspace.containing(dest, sandbox=self.sandbox)
        if ws is None:  # not a task workspace: a plain clone
            gitops.clone(url, dest, env=env)
        else:
            started = time.perf_counter()
            mirror = Mirror(ws.root / ws.agent_id / MIRRORS_DIR / mirror_name(url), url)  # (absolute)
            made = mirror.check_out(dest, env=env, record=lambda objects: ws.update_metadata(
                git_objects=[str(objects)]))
            gitops.run_git(dest, "remote", "set-url", "origin", url)  # as a clone of the forge has it
            if self.spares > 0:
                self.chores.submit(("refill", str(mirror.path)), mirror.refill, self.spares)
            log.info("workspace.checked_out", task_id=ws.task_id, warm=made.warm, mirror_cloned=made.cloned,
                     mirror_repaired=made.repaired, commit=made.sha, seconds=round(time.perf_counter() - started, 3))
        # before the coder or any command runs: the agent's own clone, for all git from now on
        AgentClone.take(self._agent_clone(dest).git_dir, dest)
        if ws is not None:
            policy = repo_network_policy(dest)
            self.sandbox.admit(policy)
            ws.set_network(policy)

    def default_branch(self, repo_dir: Path) -> str:
        return self._cloned(repo_dir).default_branch()

    def head_sha(self, repo_dir: Path) -> str | None:
        return self._cloned(repo_dir).base()

    # -- a round on a pull request's existing branch ----------------------------------------
    def open_branch(self, repo_dir: Path, branch: str, base_branch: str, *,
                    env: Mapping[str, str] | None = None) -> BranchRound:
        clone = self._cloned(repo_dir)
        opened = clone.open_branch(branch, base_branch, env=env)
        self._check_out(clone, f"refs/heads/{branch}", branch)
        return opened

    def rebase(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> Rebase:
        clone = self._cloned(repo_dir)
        outcome = clone.rebase(message, author_name, author_email)
        if outcome.status == "rebased":
            self._check_out(clone, f"refs/heads/{clone.branch()}", clone.branch())
        return outcome

    def check_out_conflicts(self, repo_dir: Path) -> None:
        clone = self._cloned(repo_dir)
        _, base = clone.start_on_conflicts()
        self._check_out(clone, CONFLICTS_REF, clone.branch(), head_at=base)

    @staticmethod
    def _check_out(clone: AgentClone, ref: str, branch: str, *, head_at: str | None = None) -> None:
        gitops.check_out_from(clone.work_tree, clone.git_dir, ref, branch, head_at=head_at)
        clone.adopt_index()

    def conflict_markers(self, repo_dir: Path, paths: list[str] | tuple[str, ...]) -> list[str]:
        return self._cloned(repo_dir).markers_left(paths)

    def branch_name(self, task_id: str, title: str) -> str:
        return gitops.branch_name(task_id, title)

    def create_branch(self, repo_dir: Path, name: str) -> None:
        self._cloned(repo_dir).start_branch(name)
        gitops.create_branch(repo_dir, name)  # the coder sees it checked out (its .git is still ours)

    def changed_files(self, repo_dir: Path) -> list[str]:
        return self._cloned(repo_dir).changed_files()

    def diff(self, repo_dir: Path) -> str:
        return self._cloned(repo_dir).diff()

    def diff_stat(self, repo_dir: Path) -> str:
        return self._cloned(repo_dir).diff_stat()

    def commit_all(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> str:
        """The commit's sha, or "" when the files change nothing against where it would go."""
        try:
            return self._cloned(repo_dir).commit(message, author_name, author_email)
        except gitops.NothingToCommit:
            return ""

    def push(self, repo_dir: Path, branch: str, *, env: Mapping[str, str] | None = None,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
        clone = self._cloned(repo_dir)
        if clone.branch() != branch:
            raise ConfigError(f"the change was committed as {clone.branch()!r}, not {branch!r}")
        return clone.push(env=env, max_file_bytes=max_file_bytes)

    def repo_file(self, repo_dir: Path, path: str, *, max_bytes: int) -> bytes | None:
        return gitops.read_regular_file(repo_dir, path, max_bytes=max_bytes)

    # -- what kind of repository this is, and its own tests --------------------------------
    def languages(self, repo_dir: Path) -> dict[str, int]:
        return gitops.languages(repo_dir)

    def detect_test_command(self, repo_dir: Path) -> list[str] | None:
        return gitops.detect_test_command(repo_dir)

    def test_counts(self, output: str) -> TestCounts:
        return parse_test_counts(output)


def _empty(trash: Path) -> None:
    """Delete what the trash holds (finished tasks' checkouts). The background thread and
    the retention clean-up may both be at it: what the other removed first is skipped."""
    if trash.is_dir():
        for entry in list(trash.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                remove_tree(entry)


def borrowed_objects(root: Path, agent_id: str) -> set[str]:
    """The mirror objects the agent's unfinished workspaces borrow (their metadata's
    ``git_objects``): what a clean-up must leave in place."""
    found: set[str] = set()
    tasks = root / agent_id / "tasks"
    for meta_path in tasks.glob("task-*/metadata.json") if tasks.is_dir() else ():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and not meta.get("finished_at"):
            found.update(str(p) for p in meta.get("git_objects") or () if isinstance(p, str))
    return found


def repo_network_policy(repo_dir: Path) -> NetworkPolicy:
    """The repository's sandbox setting at HEAD, read from git's object store rather than
    the working tree: a regular file of the commit (a symlink would read whatever it
    points at on the agent's host), at most :data:`MAX_SANDBOX_FILE` bytes."""
    found = []
    for name in SANDBOX_FILES:
        status, out, _ = gitops.run_git(repo_dir, "ls-tree", "-z", "HEAD", "--", name, check=False)
        entry = out.decode("utf-8", "replace").strip("\0")
        if status != 0 or not entry:
            continue
        meta, _, _path = entry.partition("\t")
        mode, kind, sha = meta.split()
        if kind != "blob" or mode not in ("100644", "100755"):
            raise ConfigError(f"{name}: must be a regular file in the repository (found mode {mode})")
        size = int(gitops.git_output(repo_dir, "cat-file", "-s", sha))
        if size > MAX_SANDBOX_FILE:
            raise ConfigError(f"{name}: {size} bytes, more than the {MAX_SANDBOX_FILE} a sandbox setting may have")
        found.append((name, gitops.run_git(repo_dir, "cat-file", "blob", sha)[1].decode("utf-8", "replace")))
    if len(found) > 1:
        raise ConfigError(f"both {' and '.join(n for n, _ in found)} exist: keep one")
    return parse_sandbox_file(found[0][1], found[0][0]) if found else NO_NETWORK
