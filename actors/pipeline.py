"""An agent's work pipeline for one task attempt. Every phase ends in a report on
the agent's own aggregate; the coordinator turns reports into task transitions.

    workspace (clone) -> analyse codebase -> implement (coder) + commit -> run tests
      -> push -> open pull request

Large outputs (the diff, the test log, the coder's transcript) go to the artifacts
store (the JetStream object store), masked (:mod:`events.secrets`); reports carry a
reference and a digest.

What the coder left is committed as soon as it is done (the repository's tests then run
on exactly that, and cannot add to it), by the workbench's own git, never the
workspace's; the push checks it first, and a change that holds a secret or anything but
ordinary files of the repository fails the attempt (not retried: that is for a human).

A phase that fails reports ``agent.work_failed`` with the phase, the reason and whether
a retry may help. Everything outside the process comes in through the Protocols of
:mod:`actors.ports`; the reports are typed values (:mod:`events.work_reports`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import structlog

from events.errors import CccError
from events.secrets import process_masker
from events.task_state import TaskState
from events.work import Budget, CodeRequest
from events.work_reports import (
    ChangesPushed,
    CodebaseAnalysed,
    ImplementationProduced,
    PullRequestOpened,
    TestsRun,
    WorkReportBody,
    WorkspacePrepared,
)

from actors.ports import Artifacts, Coder, ForgeClient, Workbench

log = structlog.get_logger("ccc.pipeline")

Report = Callable[[WorkReportBody], Awaitable[None]]  # appends the phase's report


class PipelineSettings(msgspec.Struct, frozen=True, kw_only=True):
    test_timeout: float = 600.0
    command_timeout: float = 300.0
    author_name: str = "claude-code-cluster"
    author_email: str = "ccc@localhost"
    budget: Budget = msgspec.field(default_factory=Budget)
    max_file_bytes: int = 5 * 1024 * 1024  # a pushed change with a bigger file is refused


class Superseded(Exception):
    """The coordinator declared this agent offline while it worked: the task was taken
    back, so the work must stop (and the agent register afresh), not be reported."""


class PhaseFailed(CccError):
    def __init__(self, phase: str, reason: str, *, retryable: bool = True, log_ref: str = "") -> None:
        super().__init__(f"{phase}: {reason}", retryable=retryable)
        self.phase = phase
        self.reason = reason
        self.log_ref = log_ref


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


INSTRUCTION_FILES = ("CLAUDE.md", "AGENTS.md", ".ccc/instructions.md")
MAX_INSTRUCTIONS_BYTES = 20_000  # per file


def instructions_of(workbench: Workbench, repo_dir: Path) -> str:
    """The repository's own instructions for coding agents, if it has any: regular files
    only, never through a symlink (a committed ``CLAUDE.md -> /proc/self/environ`` would
    put the agent's environment into the prompt), at most :data:`MAX_INSTRUCTIONS_BYTES`
    each."""
    parts = []
    for name in INSTRUCTION_FILES:
        data = workbench.repo_file(repo_dir, name, max_bytes=MAX_INSTRUCTIONS_BYTES)
        if data is None:
            continue
        text = data[:MAX_INSTRUCTIONS_BYTES].decode("utf-8", "replace")
        if len(data) > MAX_INSTRUCTIONS_BYTES:
            text += f"\n[... cut at {MAX_INSTRUCTIONS_BYTES} bytes]"
        parts.append(f"# {name}\n{text}")
    return "\n\n".join(parts)


async def run_pipeline(
    *,
    agent_id: str,
    task: TaskState,
    settings: PipelineSettings,
    workbench: Workbench,
    coder: Coder,
    forge: ForgeClient,
    artifacts: Artifacts,
    report: Report,
) -> None:
    """Run one attempt. Raises :class:`PhaseFailed` (not yet reported: the caller reports
    it) on failure; ``asyncio.CancelledError`` propagates (the caller reports the
    cancellation)."""
    issue = task.issue
    attempt = task.attempt
    prefix = f"{task.task_id}/{attempt}"
    masker = process_masker()

    # 1. workspace
    phase = "workspace"
    try:
        ws = workbench.create_workspace(agent_id, task.task_id, {
            "repo": issue.repo, "issue": issue.number, "attempt": attempt, "title": issue.title})
        url = forge.clone_url(issue.repo)
        git_env = await asyncio.to_thread(forge.git_env, issue.repo)  # may mint an App token
        await asyncio.to_thread(workbench.clone, url, ws.repo_dir, env=git_env)
        base_branch = workbench.default_branch(ws.repo_dir)
        base_commit = workbench.head_sha(ws.repo_dir) or ""
        await report(WorkspacePrepared(path=str(ws.path), base_commit=base_commit))

        # 2. analyse the codebase
        phase = "analysis"
        languages = await asyncio.to_thread(workbench.languages, ws.repo_dir)
        test_command = workbench.detect_test_command(ws.repo_dir)
        await report(CodebaseAnalysed(languages=languages, test_command=tuple(test_command or ())))

        # 3. implement
        phase = "implementation"
        branch = workbench.branch_name(task.task_id, issue.title)
        workbench.create_branch(ws.repo_dir, branch)
        outcome = await coder.implement(CodeRequest(
            task_id=task.task_id, attempt=attempt, title=issue.title, body=issue.body, guidance=task.guidance,
            specialty=task.specialty, labels=issue.labels, repo=issue.repo,
            repo_dir=str(ws.repo_dir), issue_number=issue.number,
            instructions=instructions_of(workbench, ws.repo_dir), budget=settings.budget,
        ), ws)
        transcript_ref = ""
        if outcome.transcript:
            transcript_ref = await artifacts.put_text(f"transcripts/{prefix}.txt", outcome.transcript)
        if outcome.status == "failed":
            raise PhaseFailed("implementation", outcome.reason or "the coder failed", retryable=True)
        files = await asyncio.to_thread(workbench.changed_files, ws.repo_dir)
        if not files:
            raise PhaseFailed("implementation", "the coder made no change", retryable=True)
        message = masker.text(f"{issue.title}\n\n{outcome.summary}\n\nResolves {issue.repo}#{issue.number} "
                              f"(task {task.task_id}, attempt {attempt})")
        commit = await asyncio.to_thread(workbench.commit_all, ws.repo_dir, message,
                                         settings.author_name, settings.author_email)
        # the work is kept, masked, whatever the push decides about it below: the digest
        # is of the bytes stored
        diff = masker.text(await asyncio.to_thread(workbench.diff, ws.repo_dir)).encode()
        diff_ref = await artifacts.put(f"diffs/{prefix}.diff", diff)
        await report(ImplementationProduced(
            coder=coder.name, summary=outcome.summary[:2000], files_changed=tuple(files),
            diff_stat=await asyncio.to_thread(workbench.diff_stat, ws.repo_dir),
            diff_ref=diff_ref, diff_digest=_digest(diff), turns=outcome.turns, usage=outcome.usage,
            transcript_ref=transcript_ref,
        ))
        budget_hit = outcome.status == "budget_exhausted"

        # 4. tests
        phase = "testing"
        passed = failed = 0
        tests_ok = True
        if test_command:
            result = await ws.run(test_command, timeout=settings.test_timeout, log_name="tests.log")
            counts = workbench.test_counts(result.output)
            log_ref = await artifacts.put_text(f"logs/{prefix}/tests.log", result.output)
            passed, failed = counts.passed, counts.failed + counts.errors
            tests_ok = result.exit_code == 0 and not result.timed_out
            await report(TestsRun(command=tuple(test_command), exit_code=result.exit_code,
                                  passed=counts.passed, failed=counts.failed, errors=counts.errors,
                                  skipped=counts.skipped, duration=round(result.duration, 3),
                                  timed_out=result.timed_out, log_ref=log_ref))
            if not tests_ok and not budget_hit:
                why = "tests timed out" if result.timed_out else (
                    f"{failed} test(s) failed" if failed else f"test command exited {result.exit_code}")
                raise PhaseFailed("testing", why, retryable=True, log_ref=log_ref)

        # 5. push (the commit of step 3, checked first)
        phase = "push"
        try:
            await asyncio.to_thread(workbench.push, ws.repo_dir, branch,
                                    env=await asyncio.to_thread(forge.git_env, issue.repo),
                                    max_file_bytes=settings.max_file_bytes)
        except CccError as e:  # e.g. "the change contains a secret (…): not pushed"
            raise PhaseFailed(phase, str(e), retryable=e.retryable, log_ref=diff_ref) from e
        await report(ChangesPushed(branch=branch, commit=commit))

        # 6. pull request (a draft when the budget ran out or tests did not pass)
        phase = "pull_request"
        draft = budget_hit or not tests_ok
        body = (
            f"Resolves #{issue.number}\n\n{outcome.summary}\n\n"
            f"Tests: {passed} passed, {failed} failed\n"
            + (f"\nDraft: {outcome.reason or 'budget exhausted'}\n" if draft else "")
            + f"\n_Opened by claude-code-cluster agent `{agent_id}` (task `{task.task_id}`, attempt {attempt})._"
        )
        url, number = await forge.open_pull_request(
            repo=issue.repo, branch=branch, base=base_branch, title=masker.text(issue.title),
            body=masker.text(body), draft=draft, issue_number=issue.number,
        )
        await report(PullRequestOpened(branch=branch, pr_url=url, pr_number=number, draft=draft,
                                       tests_passed=passed, tests_failed=failed))
        ws.mark_finished(outcome="pr_opened")
    except (PhaseFailed, Superseded, asyncio.CancelledError):
        raise
    except CccError as e:
        raise PhaseFailed(phase, str(e), retryable=e.retryable) from e
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still a reported failure
        log.error("pipeline.crashed", task_id=task.task_id, phase=phase, exc_info=True)
        raise PhaseFailed(phase, f"{type(e).__name__}: {e}", retryable=True) from e
