"""The coder interface: what the pipeline asks of any backend, and what it gets back.

Backends (the Anthropic tool-use loop, the Claude Code CLI, the scripted replay) all
take a :class:`CodeRequest` and a :class:`~infra.workspace.Workspace`, edit files in
the workspace's repository, and return a :class:`CodeOutcome`. They do not commit, push
or run the repository's tests: those are pipeline phases of their own, reported as
their own events. A coder that runs out of budget says so (``budget_exhausted``)
rather than raising, because that is an outcome the task's history should record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import msgspec

from events.task import Usage

from infra.adapters.git.workspace import secret_env_name

if TYPE_CHECKING:
    from infra.adapters.git.workspace import Workspace

CodeStatus = Literal["done", "budget_exhausted", "failed"]


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """Limits for one attempt. The defaults suit a typical issue on a mid-size repo;
    whichever limit is hit first ends the session."""

    max_turns: int = 40
    max_input_tokens: int = 2_000_000
    max_output_tokens: int = 64_000
    max_dollars: float = 5.0
    max_seconds: float = 1800.0


class CodeRequest(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    attempt: int
    title: str
    body: str
    specialty: str
    labels: tuple[str, ...] = ()
    repo: str
    repo_dir: str
    issue_number: int | None = None
    instructions: str = ""
    budget: Budget = msgspec.field(default_factory=Budget)

    @property
    def number(self) -> int | None:
        """The issue number: explicit, else the digits after the last ``-`` of the task
        id (task ids are ``<repo_token>-<number>``, see ``events.subjects.task_id_for``)."""
        if self.issue_number is not None:
            return self.issue_number
        tail = self.task_id.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else None


class CodeOutcome(msgspec.Struct, frozen=True, kw_only=True):
    summary: str
    status: CodeStatus
    reason: str = ""
    turns: int = 0
    usage: Usage = msgspec.field(default_factory=Usage)
    transcript: str = ""  # already masked: safe to store and show


@runtime_checkable
class Coder(Protocol):
    name: str

    async def implement(self, request: CodeRequest, workspace: Workspace) -> CodeOutcome: ...


# -- secret masking ------------------------------------------------------------------
MASK = "***"
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") would mangle ordinary text
_PATTERNS = (
    re.compile(r"sk-ant-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"(?i)(?<=authorization: )(bearer|token|basic) [^\s'\"]+"),
)
_URL_CREDS = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")


def mask_secrets(
    text: str, extra: Iterable[str] = (), *, environ: Mapping[str, str] | None = None
) -> str:
    """Replace secrets in ``text`` by ``***``: values of secret-looking environment
    variables (``*_TOKEN``, ``*_KEY``, ``*_SECRET``, ...; ``ANTHROPIC_API_KEY``,
    ``GITHUB_TOKEN`` and ``CCC_WEBHOOK_SECRET`` among them), the ``extra`` values,
    well-known token shapes, and passwords in URLs. Applied before any transcript
    or log line is stored, because events are kept forever."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if secret_env_name(k) and len(v) >= _MIN_SECRET_LEN}
    values.update(v for v in extra if v)  # chosen explicitly by the caller
    for value in sorted(values, key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return _URL_CREDS.sub(MASK, text)
