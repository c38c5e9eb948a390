"""Value types of one work attempt that cross between the agent's pipeline and the
adapters it works through: what a coder is asked and answers, what a workspace command
did, what a test run counted, and where a round on a pull request's existing branch
starts (:class:`BranchRound`, :class:`Rebase`, :class:`ConflictedFile`).

They live here, below both, because the actors declare the Protocols they need
(``actors.ports``) and the adapters implement them: neither side may import the other,
so the values they exchange belong to the domain. None of them is an event; the
reports an agent appends (``events.agent``) carry what of them the log keeps.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from events.task import Usage, WorkKind

CodeStatus = Literal["done", "budget_exhausted", "failed"]
RebaseStatus = Literal["rebased", "up_to_date", "conflicts"]


# -- the coder's side ------------------------------------------------------------------
class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """Limits for one attempt. The defaults suit a typical issue on a mid-size repo;
    whichever limit is hit first ends the session."""

    max_turns: int = 40
    max_input_tokens: int = 2_000_000
    max_output_tokens: int = 64_000
    max_dollars: float = 5.0
    max_seconds: float = 1800.0


class CodeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the pipeline asks a coder to do for one attempt."""

    task_id: str
    attempt: int
    title: str
    body: str
    specialty: str
    labels: tuple[str, ...] = ()
    repo: str
    repo_dir: str
    issue_number: int | None = None
    author: str = ""  # the issue's author: a scope of the spend ledger (events.spend)
    instructions: str = ""
    budget: Budget = msgspec.field(default_factory=Budget)
    # what a reviewer or a commenter asked for this attempt: like the body, text from the
    # issue tracker, kept apart so the prompt can frame it as a comment (events.untrusted);
    # in a CI fix, the failing checks' log tails; in a rebase, the conflicts (both sides)
    guidance: str = ""
    # which round on the task this is: its first implementation, or a CI fix / a rebase
    # on the pull request's own branch (``round``: that fix's or rebase's number, from 1)
    work: WorkKind = "implement"
    round: int = 0

    @property
    def number(self) -> int | None:
        """The issue number: explicit, else the digits after the last ``-`` of the task
        id (task ids end in ``<repo_token>-<number>``, see ``events.subjects.task_id_for``)."""
        if self.issue_number is not None:
            return self.issue_number
        tail = self.task_id.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else None


class CodeOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a coder answers. Running out of budget is an outcome (``budget_exhausted``),
    not an exception: the task's history should record it."""

    summary: str
    status: CodeStatus
    reason: str = ""
    turns: int = 0
    usage: Usage = msgspec.field(default_factory=Usage)
    transcript: str = ""  # already masked: safe to store and show
    # ``budget_exhausted`` because the cluster's spend ledger refused the next call: the
    # scope it named (``repo:acme/app``, ``day``, ...); "" for the attempt's own budget
    budget_scope: str = ""


# -- the workspace's side --------------------------------------------------------------
class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a command did. ``output`` is stdout+stderr interleaved, truncated in the
    middle (the head shows what started, the tail holds the summary a test runner
    prints last); the full output is in ``log_path``."""

    command: str
    exit_code: int
    output: str
    duration: float
    timed_out: bool = False
    log_path: str | None = None
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class TestCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Counts from a test runner's summary. The pass/fail verdict is the exit code; the
    counts are what a human reads on the task board ("3 passed, 1 failed") and what the
    events carry. When the output was not recognised (``framework="unknown"``),
    ``total == 0`` and ``failed == 1`` if the run failed, so ``failed > 0`` is always a
    reliable failure signal."""

    __test__ = False  # not a pytest test class

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    total: int = 0
    framework: str = "unknown"

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.errors == 0

    def summary(self) -> str:
        if self.framework == "unknown":
            verdict = "failed" if self.failed else "passed"
            return f"tests {verdict} (unrecognised output)"
        parts = [f"{n} {word}" for n, word in ((self.passed, "passed"), (self.failed, "failed"),
                                               (self.errors, "errors"), (self.skipped, "skipped")) if n]
        return ", ".join(parts) or "no tests ran"


# -- a round on a pull request's existing branch ---------------------------------------
class BranchRound(msgspec.Struct, frozen=True, kw_only=True):
    """A pull request's branch and its base as fetched from the forge when a CI fix or a
    rebase round started. ``head`` is what the push is leased on (it is refused if the
    branch moved meanwhile); ``fork_point`` is where the branch leaves the base, so what
    the pull request changes is ``fork_point..head``."""

    branch: str
    base_branch: str
    head: str
    base: str  # the base branch's latest commit
    fork_point: str


class ConflictedFile(msgspec.Struct, frozen=True, kw_only=True):
    """A file the branch's change and the new base both changed incompatibly: git's
    messages about it and its conflicting regions as merged, both sides between the
    markers (``<<<<<<< <base>`` ... ``=======`` ... ``>>>>>>> <branch>``), cut to size."""

    path: str
    messages: tuple[str, ...] = ()
    regions: str = ""


class Rebase(msgspec.Struct, frozen=True, kw_only=True):
    """What rebasing a branch on its base's latest commit did: ``rebased`` (its commits
    replayed on ``base``, or, where only the commit-by-commit replay conflicts, its net
    change as one commit on it), ``up_to_date`` (it already contains ``base``), or
    ``conflicts`` (the change and the base collide in ``conflicts``: nothing was changed).
    ``head`` is the branch's head afterwards: ``base`` itself when nothing of the change
    is left (it is in the base already)."""

    status: RebaseStatus
    head: str
    base: str
    squashed: bool = False
    conflicts: tuple[ConflictedFile, ...] = ()
