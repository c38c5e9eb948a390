"""What the actors need from outside, declared by the actors (DESIGN.md §2).

The actors import no adapter: they are handed objects that satisfy these Protocols,
built by the one composition root (``infra.shell.app.cluster``). The values that cross
(:mod:`events.work`, :mod:`events.work_reports`) live in ``events``, below both sides.

- :class:`Workbench` and :class:`TaskWorkspace`: task workspaces, git on their clones
  and the repository's tests (infra: ``GitWorkbench`` over ``Workspace`` and gitops);
- :class:`Coder`: implements a change in a workspace (scripted, Anthropic, Claude Code);
- :class:`ForgeClient`: where to clone from and where a pull request opens (an agent's
  view), :class:`IssueForge`: labels and the tracking comment on an issue (forge sync);
- :class:`Artifacts`: large outputs (diffs, logs, transcripts) kept outside the events;
- :class:`SecretMasker`: the one masker, for text the actors write where others read it;
- :class:`Telemetry`: spans (a consumer span per message, in the trace its headers
  carry; a span per task attempt and per pipeline phase) and the agent's own metrics.

The analyser the coordinator consults is declared next to the rules in
:mod:`actors.analysis`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable

from nats.aio.msg import Msg

from events.work import CodeOutcome, CodeRequest, CommandResult, TestCounts


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
    repository, or that holds a secret."""

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
        """Mark the task's workspace finished, so it is removed after the retention."""
        ...

    def remove_expired(self, agent_id: str, retention: float) -> list[Path]: ...

    def clone(self, url: str, dest: Path, *, env: Mapping[str, str] | None = None) -> object: ...

    def default_branch(self, repo_dir: Path) -> str: ...

    def head_sha(self, repo_dir: Path) -> str | None:
        """The commit the task starts from (as cloned, whatever the coder does later)."""
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
        """The paths the workspace's files change, against the commit the task started from."""
        ...

    def diff(self, repo_dir: Path) -> str: ...

    def diff_stat(self, repo_dir: Path) -> str: ...

    def commit_all(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> str:
        """Commit the workspace's files as the branch of :meth:`create_branch`; the sha."""
        ...

    def push(self, repo_dir: Path, branch: str, *, env: Mapping[str, str] | None = None,
             max_file_bytes: int = ...) -> str:
        """Check the committed change, then push it with ``env``'s credentials; the sha.
        A change that is not only ordinary files of the repository (git's own files, a
        submodule, a symlink out of the tree, a file above ``max_file_bytes``) or that
        holds a secret raises a non-retryable :class:`~events.errors.CccError` saying why."""
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
