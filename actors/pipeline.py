"""An agent's work pipeline for one round of a task. Every phase ends in a report on
the agent's own aggregate; the coordinator turns reports into task transitions.

    workspace (clone) -> analyse codebase -> implement (coder) + commit -> run tests
      -> [plugins' pull-request policies] -> push -> open pull request

The task says which round (``task.work``):

* ``implement``: a new branch from the default branch, and a pull request for it;
* ``ci_fix``: the pull request's checks failed because of the change. The branch is
  checked out as it is on the forge, rebased on the latest base first when that applies
  by itself (after a merge queue ejected it, the combination with the new base is what
  failed), the coder fixes it with the failing logs as guidance, and the fix is pushed
  to the same branch: the same pull request, a new head commit;
* ``rebase``: the base moved and the branch conflicts with it. ``git rebase`` first;
  only real conflicts go to the coder (the branch's net change on the new base with
  conflict markers, both sides also in its guidance), and the result is committed as
  the branch's change on the new base. A rebase that applies by itself is reported as
  the implementation of coder ``git-rebase``.

A CI fix round whose branch moved on the forge since the checks that failed (its head
is no longer ``task.head_sha``: an earlier attempt pushed its fix and was lost before it
reported, or a person pushed to the pull request) has nothing to fix yet: the checks
that count are the moved head's. The round neither rebases nor calls the coder nor
pushes; it reports the branch as it is (coder ``forge-branch``, what the pull request
changes), runs the tests on it for the record, and reports the pull request with the
moved head, whose checks then decide (a failing one queues the next fix, on that head).
Repeating the fix instead would fail every attempt: the coder finds it already made.

A round's change is what the pull request changes (against its base), so the push
checks see all of it; its push is leased on the branch's head when the round started,
so a push someone made to the branch since is never overwritten.

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
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import structlog

from events.errors import CccError
from events.refs import object_digest
from events.secrets import process_masker
from events.task_state import TaskState
from events.work import BranchRound, Budget, CodeOutcome, CodeRequest, Rebase
from events.work_reports import (
    ChangesPushed,
    CodebaseAnalysed,
    ImplementationProduced,
    PullRequestOpened,
    TestsRun,
    WorkReportBody,
    WorkspacePrepared,
)

from actors.plugins import NO_PLUGINS, PluginHooks, Veto
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
    # the pull-request policies of the process's hook plugins (actors.plugins), asked
    # before each push; none by default
    plugins: PluginHooks = NO_PLUGINS


class Superseded(Exception):
    """The coordinator declared this agent offline while it worked: the task was taken
    back, so the work must stop (and the agent register afresh), not be reported."""


class BudgetDeferred(Exception):
    """The cluster's spend ledger refused the attempt's first model call: nothing was
    done, so there is no work to keep — the task goes back to the queue (handed back, no
    attempt used up), where it waits ``budget:<scope>`` until the scope resets or its
    cap is raised."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PhaseFailed(CccError):
    def __init__(self, phase: str, reason: str, *, retryable: bool = True, log_ref: str = "") -> None:
        super().__init__(f"{phase}: {reason}", retryable=retryable)
        self.phase = phase
        self.reason = reason
        self.log_ref = log_ref


def _digest(data: bytes) -> str:
    """The object store's own digest of ``data`` (``SHA-256=<base64url>``): what it
    records for the stored object, so the two compare as strings (:mod:`events.refs`)."""
    return object_digest(data)


REBASE_CODER = "git-rebase"  # the "coder" of a rebase that applied by itself
FORGE_BRANCH_CODER = "forge-branch"  # the "coder" of a CI fix whose branch moved: the branch as it is
MAX_GUIDANCE = 20_000  # characters of guidance a round's coder is given

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


def conflict_guidance(rebase: Rebase, *, branch: str, base_branch: str, guidance: str = "") -> str:
    """What the coder of a rebase round with conflicts is told: which files collide and
    how (git's messages), the conflicting regions with both sides between the markers,
    then the task's own guidance. Framed as data by the coder's prompt builder: the
    regions are the repository's contents, which the pull request's author wrote."""
    intro = (f"Rebase of {branch} on the latest {base_branch} ({rebase.base[:12]}): the branch's change is "
             f"applied on it in the working tree and collides with it in {len(rebase.conflicts)} file(s). "
             "Resolve each conflict keeping the intent of both sides and remove every marker line "
             f"(<<<<<<< then {base_branch}'s side, ||||||| then the version both started from, ======= then "
             "the branch's side up to >>>>>>>); the result is committed as the branch's whole change on the "
             "new base.")
    parts = [intro]
    for f in rebase.conflicts:
        lines = [f"--- {f.path} ---", *f.messages]
        if f.regions:
            lines.append(f.regions)
        parts.append("\n".join(lines))
    if guidance.strip():
        parts.append(guidance.strip())
    text = "\n\n".join(parts)
    return text if len(text) <= MAX_GUIDANCE else text[:MAX_GUIDANCE] + "\n[... cut]"


def _round_number(task: TaskState) -> int:
    return {"implement": 0, "ci_fix": task.ci_fixes, "rebase": task.rebases}[task.work]


def _round_name(task: TaskState) -> str:
    return {"implement": f"attempt {task.attempt}", "ci_fix": f"CI fix {task.ci_fixes}",
            "rebase": f"rebase {task.rebases}"}[task.work]


def branch_moved(task: TaskState, opened: BranchRound) -> bool:
    """Whether a CI fix round finds the pull request's branch moved on the forge since
    the checks that failed (those of ``task.head_sha``): its fix is already pushed (by an
    earlier attempt lost before it reported, or by a person), so the new head's checks
    decide, not a coder. Never for another round, nor without a recorded head."""
    return task.work == "ci_fix" and bool(task.head_sha) and opened.head != task.head_sha


def moved_summary(task: TaskState, opened: BranchRound) -> str:
    return (f"{opened.branch} moved on the forge from {task.head_sha[:12]} to {opened.head[:12]} since the "
            "failing checks: the branch is taken as it is (not rebased, nothing pushed), so its checks decide.")


async def _rebase_round(workbench: Workbench, repo_dir: Path, task: TaskState, base_branch: str, *,
                        squash_message: str, identity: tuple[str, str]) -> Rebase:
    """After :meth:`~actors.ports.Workbench.open_branch`: rebase the branch on the latest
    base where that applies by itself. Where it does not, a CI fix works on the branch as
    it is; a rebase round gives the coder the conflicts to resolve."""
    branch = task.branch
    rebase = await asyncio.to_thread(workbench.rebase, repo_dir, squash_message, *identity)
    if rebase.status == "rebased" and rebase.head == rebase.base:
        raise PhaseFailed("workspace", f"rebased on {base_branch}, {branch} changes nothing: its change is "
                                       f"already in {base_branch}", retryable=False)
    if rebase.status == "conflicts":
        files = ", ".join(f.path for f in rebase.conflicts)
        log.info("pipeline.rebase_conflicts", task_id=task.task_id, work=task.work, files=files)
        if task.work == "rebase":
            await asyncio.to_thread(workbench.check_out_conflicts, repo_dir)
    return rebase


def _commit_message(task: TaskState, summary: str, trailer: str, *, base_branch: str, base_commit: str,
                    conflicts: tuple[str, ...]) -> str:
    issue = task.issue
    if task.work == "ci_fix":
        return f"Fix the checks: {issue.title}\n\n{summary}\n\nFor {issue.repo}#{issue.number} {trailer}"
    resolved = (f"Rebased on {base_branch} ({base_commit[:12]}), conflicts resolved in {', '.join(conflicts)}.\n\n"
                if conflicts else "")
    return f"{issue.title}\n\n{summary}\n\n{resolved}Resolves {issue.repo}#{issue.number} {trailer}"


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
    """Run one round (``task.work``) of one attempt. Raises :class:`PhaseFailed` (not yet
    reported: the caller reports it) on failure; ``asyncio.CancelledError`` propagates
    (the caller reports the cancellation)."""
    issue = task.issue
    attempt = task.attempt
    work = task.work
    number = _round_number(task)
    prefix = f"{task.task_id}/{attempt}" + (f"-{work}-{number}" if work != "implement" else "")
    masker = process_masker()
    identity = (settings.author_name, settings.author_email)
    trailer = f"(task {task.task_id}, attempt {attempt}" + (
        f", {_round_name(task)})" if work != "implement" else ")")
    if work != "implement" and not (task.branch and task.pr_url):
        raise PhaseFailed("workspace", f"a {work} round needs the pull request's branch, and the task has "
                                       "no pull request", retryable=False)

    # 1. workspace
    phase = "workspace"
    try:
        ws = workbench.create_workspace(agent_id, task.task_id, {
            "repo": issue.repo, "issue": issue.number, "attempt": attempt, "title": issue.title,
            "work": work, "round": number})
        url = forge.clone_url(issue.repo)
        git_env = await asyncio.to_thread(forge.git_env, issue.repo)  # may mint an App token
        await asyncio.to_thread(workbench.clone, url, ws.repo_dir, env=git_env)
        # the instructions come from the default branch as cloned, not from the pull
        # request's branch (which earlier rounds' coders wrote)
        instructions = instructions_of(workbench, ws.repo_dir)
        base_branch = task.base_branch or workbench.default_branch(ws.repo_dir)
        rebase: Rebase | None = None
        moved: BranchRound | None = None  # a CI fix's branch, moved since its checks failed
        if work == "implement":
            branch = workbench.branch_name(task.task_id, issue.title)
        else:
            branch = task.branch
            # the branch as it is on the forge now, checked out in the workspace
            opened = await asyncio.to_thread(workbench.open_branch, ws.repo_dir, branch, base_branch, env=git_env)
            if branch_moved(task, opened):
                moved = opened
                log.info("pipeline.branch_moved", task_id=task.task_id, branch=branch,
                         failed_head=task.head_sha[:12], head=opened.head[:12])
            else:
                squash_message = masker.text(f"{issue.title}\n\nThe branch's change, rebased on {base_branch} as "
                                             f"one commit.\n\nResolves {issue.repo}#{issue.number} {trailer}")
                rebase = await _rebase_round(workbench, ws.repo_dir, task, base_branch,
                                             squash_message=squash_message, identity=identity)
        base_commit = workbench.head_sha(ws.repo_dir) or ""
        await report(WorkspacePrepared(path=str(ws.path), base_commit=base_commit))

        # 2. analyse the codebase
        phase = "analysis"
        languages = await asyncio.to_thread(workbench.languages, ws.repo_dir)
        test_command = await asyncio.to_thread(workbench.detect_test_command, ws.repo_dir)
        await report(CodebaseAnalysed(languages=languages, test_command=tuple(test_command or ())))

        # 3. implement (a rebase that applied by itself needs no coder, nor a CI fix whose
        # branch moved: the branch as it is is what gets checked)
        phase = "implementation"
        conflicts = tuple(f.path for f in rebase.conflicts) if rebase and work == "rebase" else ()
        transcript_ref = ""
        if moved is not None:
            outcome = CodeOutcome(summary=moved_summary(task, moved), status="done")
            coder_name, commit = FORGE_BRANCH_CODER, moved.head
        elif work == "rebase" and not conflicts:
            assert rebase is not None
            how = "as one commit" if rebase.squashed else (
                "already on it" if rebase.status == "up_to_date" else "its commits replayed")
            outcome = CodeOutcome(summary=f"Rebased on {base_branch} ({rebase.base[:12]}): {how}.", status="done")
            coder_name, commit = REBASE_CODER, rebase.head
        else:
            coder_name = coder.name
            if work == "implement":
                workbench.create_branch(ws.repo_dir, branch)
            guidance = task.guidance
            if conflicts:
                assert rebase is not None
                guidance = conflict_guidance(rebase, branch=branch, base_branch=base_branch, guidance=task.guidance)
            outcome = await coder.implement(CodeRequest(
                task_id=task.task_id, attempt=attempt, title=issue.title, body=issue.body, guidance=guidance,
                specialty=task.specialty, labels=issue.labels, repo=issue.repo,
                repo_dir=str(ws.repo_dir), issue_number=issue.number, author=issue.author,
                instructions=instructions, budget=settings.budget, work=work, round=number,
            ), ws)
            if outcome.transcript:
                transcript_ref = await artifacts.put_text(f"transcripts/{prefix}.txt", outcome.transcript)
            if outcome.status == "failed":
                raise PhaseFailed("implementation", outcome.reason or "the coder failed", retryable=True)
            # the files are read once, for the commit ("" when they change nothing): from
            # here on the change is that commit, whatever the tests do to the files
            message = _commit_message(task, outcome.summary, trailer, base_branch=base_branch,
                                      base_commit=base_commit, conflicts=conflicts)
            commit = await asyncio.to_thread(workbench.commit_all, ws.repo_dir, masker.text(message), *identity)
            if not commit and conflicts:
                raise PhaseFailed("implementation", f"the resolution leaves nothing of {branch}'s change on "
                                                    f"{base_branch}", retryable=False)
            if not commit:
                if outcome.status == "budget_exhausted" and outcome.budget_scope:
                    raise BudgetDeferred(outcome.reason)  # the ledger said no before any work
                raise PhaseFailed("implementation", "the coder made no change", retryable=True)
            if conflicts:  # the coder's part is the resolution: no marker may be left
                left = await asyncio.to_thread(workbench.conflict_markers, ws.repo_dir, conflicts)
                if left:
                    raise PhaseFailed("implementation", f"conflict markers left in {', '.join(left)}",
                                      retryable=True)
        files = await asyncio.to_thread(workbench.changed_files, ws.repo_dir)
        if not files and moved is not None:  # pushed so: a retry would find the same
            raise PhaseFailed("implementation", f"{branch} moved on the forge to {moved.head[:12]}, which changes "
                                                f"nothing against {base_branch}", retryable=False)
        if not files:  # (a round's coder made a change, but it undid the branch's)
            raise PhaseFailed("implementation", f"{branch} changes nothing against {base_branch}", retryable=True)
        # the work is kept, masked, whatever the push decides about it below: the digest
        # is of the bytes stored; for a round it is all the pull request changes
        diff = masker.text(await asyncio.to_thread(workbench.diff, ws.repo_dir)).encode()
        diff_ref = await artifacts.put(f"diffs/{prefix}.diff", diff)
        await report(ImplementationProduced(
            coder=coder_name, summary=outcome.summary[:2000], files_changed=tuple(files),
            diff_stat=await asyncio.to_thread(workbench.diff_stat, ws.repo_dir),
            diff_ref=diff_ref, diff_digest=_digest(diff), turns=outcome.turns,
            usage=outcome.usage if coder_name not in (REBASE_CODER, FORGE_BRANCH_CODER) else None,
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
            # (on a moved branch the result is for the record: its checks decide, and a
            # retry would only test the same commit again)
            if not tests_ok and not budget_hit and moved is None:
                why = "tests timed out" if result.timed_out else (
                    f"{failed} test(s) failed" if failed else f"test command exited {result.exit_code}")
                raise PhaseFailed("testing", why, retryable=True, log_ref=log_ref)

        # the plugins' pull-request policies, before anything leaves the workspace: a
        # veto is for a human (the commit stays on the workspace's branch, the diff in the
        # artifacts); a plugin that cannot answer refuses too, retryable (actors.plugins).
        # A moved branch pushes nothing: there is nothing to ask about.
        if moved is None and settings.plugins.asks_pull_requests:
            phase = "policy"
            draft_now = (budget_hit or not tests_ok) if work == "implement" else task.draft
            ruling = await settings.plugins.pull_request(task, tuple(files), draft_now)
            if isinstance(ruling.decision, Veto):
                log.info("pipeline.pull_request_refused", task_id=task.task_id, plugin=ruling.plugin,
                         reason=ruling.decision.reason, fault=ruling.fault)
                raise PhaseFailed(phase, f"plugin {ruling.plugin} refused the pull request: "
                                         f"{ruling.decision.reason}; not pushed",
                                  retryable=bool(ruling.fault), log_ref=diff_ref)

        # 5. push (the commit of step 3, checked first; a round's, leased on the branch's
        # head when the round started); a moved branch is on the forge already: no push
        phase = "push"
        if moved is not None:
            pushed = moved.head
        else:
            try:
                pushed = await asyncio.to_thread(workbench.push, ws.repo_dir, branch,
                                                 env=await asyncio.to_thread(forge.git_env, issue.repo),
                                                 max_file_bytes=settings.max_file_bytes)
            except CccError as e:  # e.g. "the change contains a secret (…): not pushed"
                raise PhaseFailed(phase, str(e), retryable=e.retryable, log_ref=diff_ref) from e
            await report(ChangesPushed(branch=branch, commit=pushed or commit))

        # 6. pull request (a draft when the budget ran out or tests did not pass); a
        # round's is the one already open: the push updated it
        phase = "pull_request"
        if work == "implement":
            draft = budget_hit or not tests_ok
            body = (
                f"Resolves #{issue.number}\n\n{outcome.summary}\n\n"
                f"Tests: {passed} passed, {failed} failed\n"
                + (f"\nDraft: {outcome.reason or 'budget exhausted'}\n" if draft else "")
                + f"\n_Opened by claude-code-cluster agent `{agent_id}` (task `{task.task_id}`, attempt {attempt})._"
            )
            pr_url, pr_number = await forge.open_pull_request(
                repo=issue.repo, branch=branch, base=base_branch, title=masker.text(issue.title),
                body=masker.text(body), draft=draft, issue_number=issue.number,
            )
        else:
            draft, pr_url, pr_number = task.draft, task.pr_url, task.pr_number
        await report(PullRequestOpened(branch=branch, pr_url=pr_url, pr_number=pr_number, draft=draft,
                                       tests_passed=passed, tests_failed=failed, head_sha=pushed or commit,
                                       base_branch=base_branch))
        ws.mark_finished(outcome="pr_opened")
    except (PhaseFailed, Superseded, BudgetDeferred, asyncio.CancelledError):
        raise
    except CccError as e:
        raise PhaseFailed(phase, str(e), retryable=e.retryable) from e
    except Exception as e:  # noqa: BLE001 - an unexpected failure is still a reported failure
        log.error("pipeline.crashed", task_id=task.task_id, phase=phase, exc_info=True)
        raise PhaseFailed(phase, f"{type(e).__name__}: {e}", retryable=True) from e
