"""What the actors need from outside, declared by the actors (DESIGN.md §2).

The actors import no adapter: they are handed objects that satisfy these Protocols,
built by the one composition root (``infra.shell.app.cluster``). The values that cross
(:mod:`events.work`, :mod:`events.work_reports`) live in ``events``, below both sides.

- :class:`Workbench` and :class:`TaskWorkspace`: task workspaces, git on their clones
  and the repository's tests (infra: ``GitWorkbench`` over ``Workspace`` and gitops);
- :class:`Coder`: implements a change in a workspace (scripted, Anthropic, Claude Code);
- :class:`ForgeClient`: where to clone from and where a pull request opens (an agent's
  view), :class:`IssueForge`: labels and the tracking comment on an issue (forge sync),
  :class:`PullRequestBranches`: conflicts and the merge queue's git (the coordinator);
- :class:`Artifacts`: large outputs (diffs, logs, transcripts) kept outside the events;
- :class:`SecretMasker`: the one masker, for text the actors write where others read it;
- :class:`Telemetry`: spans (a consumer span per message, in the trace its headers
  carry; a span per task attempt and per pipeline phase) and the agent's own metrics.

The analyser the coordinator consults is declared next to the rules in
:mod:`actors.analysis`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable

from nats.aio.msg import Msg

from events.spend import Book
from events.work import BranchRound, CodeOutcome, CodeRequest, CommandResult, Rebase, TestCounts


# -- the agent's local work --------------------------------------------------------------
class TaskWorkspace(Protocol):
    """One task attempt's directory: the clone the coder edits and the tests run in,
    its logs, and the metadata that marks it finished (for retention cleanup)."""

    @property
    def path(self) -> Path: ...

    @property
    def repo_dir(self) -> Path: ...

    async def run(
        self, cmd: list[str] | str, *, timeout: float, log_name: str | None = None
    ) -> CommandResult:
        """Run a command confined to the workspace with a scrubbed environment; never
        raises for a failing command (see ``exit_code``/``timed_out``)."""
        ...

    def mark_finished(self, **fields: Any) -> None: ...


class Workbench(Protocol):
    """Where an agent works on repositories: task workspaces under its root, git on
    their clones, and the repository's own tests. The git and file-system calls block
    (git is a subprocess): the pipeline runs the slow ones in a thread.

    The workspace's ``.git`` is the coder's to rewrite: after :meth:`clone`, what the
    change is, its commit and its push are the agent's business alone (the workspace's
    files, compared with the commit the task started from, by git that never reads the
    workspace's git config), and nothing is pushed that is not ordinary files of the
    repository, or that holds a secret.

    A CI fix or a rebase works on the pull request's existing branch: after
    :meth:`clone`, :meth:`open_branch` checks it out as it is on the forge,
    :meth:`rebase` moves it onto its base's latest commit, :meth:`check_out_conflicts`
    gives the coder what does not rebase by itself. The change is then measured against
    the base (what the pull request changes, all of it, is what the push checks see),
    its commit goes on the branch's head, and the push is refused if the branch moved on
    the forge since the round began."""

    def prepare(self) -> None:
        """Make sure workspaces can be created (before the agent takes work)."""
        ...

    @property
    def sandbox_name(self) -> str:
        """Where its commands run ("bwrap", "none", ...): on the agent's registration."""
        ...

    def create_workspace(self, agent_id: str, task_id: str, metadata: Mapping[str, Any]) -> TaskWorkspace:
        """A fresh workspace for an attempt (what an earlier attempt left is removed)."""
        ...

    def finish_workspace(self, agent_id: str, task_id: str, outcome: str) -> None:
        """Mark the task's workspace finished, so it is removed after the retention; what
        debugging does not need (the checkout: the change is on the forge and in the
        artifacts) may go at once. Called on the event loop: it must not block for long."""
        ...

    def remove_expired(self, agent_id: str, retention: float) -> list[Path]: ...

    def clone(self, url: str, dest: Path, *, env: Mapping[str, str] | None = None) -> object: ...

    def default_branch(self, repo_dir: Path) -> str: ...

    def head_sha(self, repo_dir: Path) -> str | None:
        """The commit the change is measured against (the default branch as cloned; in a
        round, where the branch leaves its base), whatever the coder does later."""
        ...

    def open_branch(self, repo_dir: Path, branch: str, base_branch: str, *,
                    env: Mapping[str, str] | None = None) -> BranchRound:
        """Fetch the pull request's ``branch`` and ``base_branch`` from the forge as they
        are now (``env``: its credentials) and check the branch out in the workspace; its
        head is where the round's commit goes and what the push is leased on (and tells a
        CI fix whether the branch moved since the checks that failed: then it is the head
        to report, and nothing is committed or pushed). Before the coder or any command
        ran."""
        ...

    def rebase(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> Rebase:
        """Rebase the opened branch on its base's latest commit, mechanically (``message``
        is for when its net change has to become one commit); when it rebased, the
        workspace has the result checked out. On real conflicts nothing changes and the
        conflicting files are returned, both sides shown."""
        ...

    def check_out_conflicts(self, repo_dir: Path) -> None:
        """After a :meth:`rebase` with conflicts: the workspace gets the branch's net
        change applied on the new base, conflict markers where it collides; the round's
        commit then goes on the base, as the branch's whole change."""
        ...

    def conflict_markers(self, repo_dir: Path, paths: list[str] | tuple[str, ...]) -> list[str]:
        """Which of ``paths`` still hold conflict markers in the change (after
        :meth:`commit_all`: in the commit)."""
        ...

    def repo_file(self, repo_dir: Path, path: str, *, max_bytes: int) -> bytes | None:
        """A file of the repository for the agent itself to read (instructions): at most
        ``max_bytes + 1`` bytes, and None unless it is a regular file reached without
        following a symlink (a committed ``CLAUDE.md -> /proc/self/environ`` is not)."""
        ...

    def languages(self, repo_dir: Path) -> dict[str, int]: ...

    def detect_test_command(self, repo_dir: Path) -> list[str] | None: ...

    def branch_name(self, task_id: str, title: str) -> str: ...

    def create_branch(self, repo_dir: Path, name: str) -> None: ...

    def changed_files(self, repo_dir: Path) -> list[str]:
        """The paths the change touches against :meth:`head_sha`: all that the branch
        changes. Once the round's change is recorded (a commit of :meth:`commit_all`, or
        the branch :meth:`open_branch` or :meth:`rebase` left when no coder follows), this,
        :meth:`diff` and :meth:`diff_stat` describe that commit, whatever happens to the
        files later; before, the workspace's files as they are."""
        ...

    def diff(self, repo_dir: Path) -> str: ...

    def diff_stat(self, repo_dir: Path) -> str: ...

    def commit_all(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> str:
        """Commit the workspace's files as the branch of :meth:`create_branch` (or
        :meth:`open_branch`), on the commit the round's commit goes on (for a new branch,
        the base); the sha, or "" when the files change nothing against that commit
        (nothing is committed: the coder made no change)."""
        ...

    def push(self, repo_dir: Path, branch: str, *, env: Mapping[str, str] | None = None,
             max_file_bytes: int = ...) -> str:
        """Check the committed change, then push it with ``env``'s credentials; the sha.
        A change that is not only ordinary files of the repository (git's own files, a
        submodule, a symlink out of the tree, a file above ``max_file_bytes``) or that
        holds a secret raises a non-retryable :class:`~events.errors.CccError` saying why;
        a branch that moved on the forge since :meth:`open_branch` a retryable one."""
        ...

    def test_counts(self, output: str) -> TestCounts:
        """The counts of the summary a test runner printed in ``output``."""
        ...


@runtime_checkable
class Coder(Protocol):
    """Edits files in the workspace's repository to resolve the request. It does not
    commit, push or run the repository's tests: those are pipeline phases of their own.
    A coder that runs out of budget says so (``budget_exhausted``) rather than raising."""

    name: str

    async def implement(self, request: CodeRequest, workspace: Any) -> CodeOutcome:
        """``workspace`` is the :class:`TaskWorkspace` the workbench created for the
        attempt (typed ``Any`` here: each backend takes the adapter's concrete type)."""
        ...


# -- forges ------------------------------------------------------------------------------
class SpendView(Protocol):
    """The cluster's spend ledger as the scheduler reads it: the entries and caps last
    seen (:mod:`events.spend`); a queued task whose scope is exhausted is not assigned.
    ``on_change`` is called when a scope may have become exhausted or free again (a cap
    changed, a refusal, a settlement), so the scheduler looks again."""

    on_change: Callable[[], None] | None

    async def start(self) -> object: ...

    async def stop(self) -> None: ...

    def book(self) -> Book: ...


class ForgeClient(Protocol):
    """What an agent needs from the forge (local bare repos, or GitHub)."""

    name: str

    def clone_url(self, repo: str) -> str: ...

    def git_env(self, repo: str) -> dict[str, str]: ...

    async def open_pull_request(
        self, *, repo: str, branch: str, base: str, title: str, body: str, draft: bool, issue_number: int
    ) -> tuple[str, int | None]: ...


class IssueForge(Protocol):
    """What the forge sync needs from a forge (GitHub)."""

    async def set_state_label(self, repo: str, number: int, label: str) -> object: ...

    async def upsert_tracking_comment(self, repo: str, number: int, marker: str, body: str) -> object: ...


class PullRequestBranches(Protocol):
    """What the coordinator needs from the repositories' git to follow open pull
    requests: whether a branch still merges into its moved base (``git merge-tree``),
    and the merge queue's steps. Implemented over git against the forge's clone URL,
    so it is the same for the local forge and GitHub (infra: ``GitBranches``). Every
    call blocks on git and network; the implementation runs them off the event loop."""

    async def base_sha(self, repo: str, base: str) -> str:
        """The base branch's head commit now."""
        ...

    async def conflicts(self, repo: str, base: str, branch: str) -> tuple[str, list[str]]:
        """``(base sha, conflicting files)`` of merging ``branch`` into ``base`` as they
        are now; no files when it merges cleanly."""
        ...

    async def prepare_merge(self, repo: str, base: str, branch: str, ref: str) -> tuple[str, str, list[str]]:
        """Merge ``branch`` into the latest ``base`` and push the result to ``ref`` (the
        merge queue's candidate, which CI then tests): ``(candidate sha, base sha,
        conflicting files)``; with conflicts nothing is pushed and the sha is ""."""
        ...

    async def fast_forward(self, repo: str, base: str, sha: str) -> bool:
        """Move ``base`` to ``sha`` (the tested candidate) if that is a fast-forward;
        False when ``base`` moved meanwhile (the candidate must be tested again)."""
        ...

    async def delete_ref(self, repo: str, ref: str) -> None:
        """Remove a merge-queue candidate ref (idempotent)."""
        ...


# -- outputs -----------------------------------------------------------------------------
class Artifacts(Protocol):
    """Large outputs, stored outside the events; an event carries the reference."""

    async def put(self, name: str, data: bytes) -> str:
        """Store ``data`` (text as bytes: a diff) with secrets masked; returns its reference."""
        ...

    async def put_text(self, name: str, text: str) -> str:
        """Store a log or a transcript with secrets masked (artifacts are kept, and
        shown to whoever reads the task); returns its reference."""
        ...


class SecretMasker(Protocol):
    def __call__(self, text: str) -> str:
        """``text`` with every secret it may carry replaced."""
        ...


# -- telemetry ---------------------------------------------------------------------------
class AttemptTelemetry(Protocol):
    """One task attempt as it is traced and measured: it starts when the attempt does
    (its span is the current one until :meth:`ended`), each phase ends at a report."""

    def phase_ended(self, phase: str, *, failed: bool = False) -> None:
        """A pipeline phase ended now; it began when the previous one ended."""
        ...

    def ended(self, outcome: str) -> None:
        """The attempt ended (``done``, ``failed``, ``cancelled``, ``handed_back``, ``lost``)."""
        ...


class Telemetry(Protocol):
    def handling(self, name: str, msg: Msg, **attributes: Any) -> ContextManager[object]:
        """A span around handling ``msg``, in the trace its headers carry (so the events
        the handler appends continue that trace)."""
        ...

    def attempt_started(self, agent_id: str, task_id: str, attempt: int) -> AttemptTelemetry: ...


class NoAttemptTelemetry:
    def phase_ended(self, phase: str, *, failed: bool = False) -> None:
        pass

    def ended(self, outcome: str) -> None:
        pass


class NoTelemetry:
    """Neither spans nor metrics: for actors built without the composition root (tests,
    benches). Traces then stop at this process."""

    def handling(self, name: str, msg: Msg, **attributes: Any) -> ContextManager[object]:
        return contextlib.nullcontext()

    def attempt_started(self, agent_id: str, task_id: str, attempt: int) -> AttemptTelemetry:
        return NoAttemptTelemetry()


NO_TELEMETRY = NoTelemetry()
