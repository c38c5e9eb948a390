"""A coder that replays a recorded session: the backend of the tests and of the
offline demo (no API key, fully deterministic).

A script is JSON::

    {"attempts": [
        {"steps": [
            {"write":  {"path": "src/x.py", "content": "..."}},
            {"edit":   {"path": "src/x.py", "old": "...", "new": "..."}},
            {"delete": {"path": "old.txt"}},
            {"run":    {"command": "python -m pytest -q", "timeout": 60, "check": false}}
         ],
         "summary": "what was done"},
        ...]}

Attempt *k* (1-based) replays ``attempts[min(k, len) - 1]``, so a script can fail its
first attempt and succeed on the retry. A round on the pull request's branch replays
its own list the same way, by its number: CI fix *n* ``"ci_fixes"``, a rebase with
conflicts ``"rebases"`` (each a list of ``{"steps": ..., "summary": ...}``, like
``attempts``); a script without one fails that round, saying so. ``edit`` needs ``old`` to occur exactly once
(as a real coder's edit tool does: an ambiguous edit is a failed step, not a guess).
A ``run`` step's exit code is only recorded unless ``check`` is true.

Where scripts come from, first match wins:
1. ``<script_dir>/<repo_token>-<issue_number>.json`` (outside the repository: tests and
   the demo keep recordings next to the sample repo);
2. ``.ccc/scripts/<issue_number>.json`` in the workspace's repository, read before any
   step runs (the recording ships with the repo; it is committed there, so it is not
   part of the change).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from events.subjects import repo_token
from events.task import Usage
from events.work import CodeOutcome, CodeRequest, CodeStatus

from infra.adapters.git.workspace import Workspace, WorkspaceEscape
from infra.adapters.obs.masking import mask_secrets

_TRANSCRIPT_OUTPUT = 2_000  # chars of each command's output kept in the transcript


class _Write(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    content: str


class _Edit(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    old: str
    new: str


class _Delete(msgspec.Struct, forbid_unknown_fields=True):
    path: str


class _Run(msgspec.Struct, forbid_unknown_fields=True):
    command: str | list[str]
    timeout: float = 60.0
    check: bool = False


class _Attempt(msgspec.Struct):
    steps: list[dict[str, Any]] = msgspec.field(default_factory=list)
    summary: str = ""


class Script(msgspec.Struct):
    """A recorded session file (the format in the module's docstring)."""

    attempts: list[_Attempt]
    ci_fixes: list[_Attempt] = msgspec.field(default_factory=list)
    rebases: list[_Attempt] = msgspec.field(default_factory=list)

    def session(self, request: CodeRequest) -> _Attempt | None:
        """The recording for this request's round, or None if there is none."""
        if request.work == "implement":
            recorded, number = self.attempts, request.attempt
        else:
            recorded = self.ci_fixes if request.work == "ci_fix" else self.rebases
            number = request.round
        return recorded[min(max(number, 1), len(recorded)) - 1] if recorded else None


_STEPS: dict[str, type[msgspec.Struct]] = {"write": _Write, "edit": _Edit, "delete": _Delete, "run": _Run}


class _StepFailed(Exception):
    pass


class ScriptedCoder:
    name = "scripted"

    def __init__(self, script_dir: Path | str | None = None) -> None:
        self.script_dir = Path(script_dir) if script_dir is not None else None

    def find_script(self, request: CodeRequest, workspace: Workspace) -> Path | None:
        number = request.number
        if number is None:
            return None
        if self.script_dir is not None:
            candidate = self.script_dir / f"{repo_token(request.repo)}-{number}.json"
            if candidate.is_file():
                return candidate
        candidate = workspace.confine(f".ccc/scripts/{number}.json")
        return candidate if candidate.is_file() else None

    async def implement(self, request: CodeRequest, workspace: Workspace) -> CodeOutcome:
        usage = Usage(model="scripted")
        try:
            path = self.find_script(request, workspace)
        except WorkspaceEscape as exc:
            return CodeOutcome(summary="scripted session refused", status="failed", reason=str(exc),
                               usage=usage)
        if path is None:
            return CodeOutcome(
                summary="no recorded session",
                status="failed",
                reason=f"no recorded session for {request.repo}#{request.number} (task {request.task_id})",
                usage=usage,
            )
        try:
            script = msgspec.json.decode(path.read_bytes(), type=Script)
            if not script.attempts:
                raise msgspec.ValidationError("no attempts")
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            return CodeOutcome(summary="invalid recorded session", status="failed",
                               reason=f"invalid script {path.name}: {exc}", usage=usage)
        attempt = script.session(request)
        if attempt is None:
            key = "ci_fixes" if request.work == "ci_fix" else "rebases"
            return CodeOutcome(summary="no recorded session", status="failed", usage=usage,
                               reason=f"{path.name} records no {request.work} session (no {key!r})")
        return await self._replay(attempt, request, workspace, usage)

    async def _replay(
        self, attempt: _Attempt, request: CodeRequest, workspace: Workspace, usage: Usage
    ) -> CodeOutcome:
        budget = request.budget
        deadline = time.monotonic() + budget.max_seconds
        which = f"attempt {request.attempt}" + (f", {request.work} {request.round}" if request.work != "implement" else "")
        transcript: list[str] = [f"scripted session, {which}: {len(attempt.steps)} steps"]
        turns = 0

        def outcome(status: CodeStatus, summary: str, reason: str = "") -> CodeOutcome:
            # the summary goes into the PR body and the events, the reason into
            # agent.work_failed (a failed step's output may hold a secret): masked as the
            # transcript is, as every coder does
            return CodeOutcome(summary=mask_secrets(summary), status=status, reason=mask_secrets(reason),
                               turns=turns, usage=usage, transcript=mask_secrets("\n".join(transcript)))

        for raw in attempt.steps:
            if turns >= budget.max_turns:
                return outcome("budget_exhausted", "stopped: turn budget exhausted",
                               f"turn budget of {budget.max_turns} exhausted")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return outcome("budget_exhausted", "stopped: time budget exhausted",
                               f"time budget of {budget.max_seconds}s exhausted")
            turns += 1
            try:
                transcript.append(f"{turns}. " + await self._step(raw, turns, request, workspace, remaining))
            except (_StepFailed, WorkspaceEscape) as exc:
                transcript.append(f"{turns}. FAILED: {exc}")
                return outcome("failed", f"scripted step {turns} failed", f"step {turns}: {exc}")
        summary = attempt.summary or f"applied {turns} recorded steps"
        transcript.append(f"done: {summary}")
        return outcome("done", summary)

    async def _step(
        self, raw: dict[str, Any], index: int, request: CodeRequest, workspace: Workspace, remaining: float
    ) -> str:
        if len(raw) != 1 or next(iter(raw)) not in _STEPS:
            raise _StepFailed(f"unknown step {sorted(raw)}: expected one of {sorted(_STEPS)}")
        kind, args = next(iter(raw.items()))
        try:
            step = msgspec.convert(args, _STEPS[kind])
        except msgspec.ValidationError as exc:
            raise _StepFailed(f"bad {kind} step: {exc}") from exc
        if isinstance(step, _Run):
            return await self._run(step, index, request, workspace, remaining)
        target = workspace.confine(step.path)  # type: ignore[attr-defined]
        if isinstance(step, _Write):
            if target.is_dir():
                raise _StepFailed(f"write {step.path}: is a directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(step.content.encode("utf-8"))
            return f"write {step.path} ({len(step.content)} chars)"
        if isinstance(step, _Edit):
            if not target.is_file():
                raise _StepFailed(f"edit {step.path}: no such file")
            try:
                text = target.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _StepFailed(f"edit {step.path}: not UTF-8 text") from exc
            count = text.count(step.old) if step.old else 0
            if count != 1:
                raise _StepFailed(f"edit {step.path}: old text found {count} times, expected exactly once")
            target.write_bytes(text.replace(step.old, step.new, 1).encode("utf-8"))
            return f"edit {step.path} (-{len(step.old)} +{len(step.new)} chars)"
        assert isinstance(step, _Delete)
        if target.is_dir() and not target.is_symlink():
            raise _StepFailed(f"delete {step.path}: is a directory")
        if not (target.exists() or target.is_symlink()):
            raise _StepFailed(f"delete {step.path}: no such file")
        target.unlink()
        return f"delete {step.path}"

    async def _run(
        self, step: _Run, index: int, request: CodeRequest, workspace: Workspace, remaining: float
    ) -> str:
        result = await workspace.run(
            step.command,
            timeout=max(0.1, min(step.timeout, remaining)),
            log_name=f"coder-attempt{request.attempt}-step{index}",
        )
        state = "timed out" if result.timed_out else f"exit {result.exit_code}"
        line = f"run `{result.command}` -> {state} in {result.duration:.1f}s"
        tail = result.output[-_TRANSCRIPT_OUTPUT:]
        if step.check and not result.ok:
            raise _StepFailed(f"{line}\n{tail}")
        return f"{line}\n{tail}" if tail else line
