"""GitHub's CI as the cluster sees it: a pull request's checks read through the API, and
its failed jobs re-run through the API.

:meth:`GitHubChecks.collect` turns "a check of this commit finished" (a ``check_run``,
``check_suite`` or ``workflow_run`` webhook, translated by
:mod:`infra.adapters.http.webhook_translate` into a :class:`CommitRef`) into the fact
``issue.checks_completed``, once *every* check of the commit has finished:

1. the task branch's open pull request must be at that commit (checks of an earlier push
   are history, and a branch without an open pull request in this repository, a fork's,
   is nobody's task). A merge-queue candidate (``ccc-queue/<task_id>``) has no pull
   request: its checks go as they are, and the coordinator takes them only while that
   very commit is the task's candidate;
2. all check runs of the commit (the latest of each name) and all its workflow runs on
   the branch must be completed; otherwise nothing yet: the delivery of the last one to
   finish reports, as does any later delivery of the same commit;
3. each check becomes a :class:`~events.checks.CheckRun`; a failing GitHub Actions job's
   log is fetched (``/actions/jobs/{id}/logs`` answers with a redirect to a short-lived
   download URL that needs no token), and its tail kept, masked by the process's masker
   (:mod:`events.secrets`) and bounded (:data:`events.checks.LOG_TAIL_CHARS`); another
   app's failing check keeps its reported output instead. ``started`` says whether the job
   got past setting up (an infrastructure failure otherwise). A workflow run waiting for a
   maintainer's approval has no jobs: it becomes a check with conclusion
   ``action_required``;
4. the same checks' conclusions on the pull request's base commit, where GitHub has them,
   go along (``base``): a check red on the base too, or green there, tells the classifier
   (:func:`events.checks.classify`) a red base or a flaky check from a broken change.

The fact's id names the commit and what its checks concluded (names, conclusions, run
ids), so every delivery about one outcome collapses into one fact, a redelivery included,
and a re-run's outcome (new run ids) is a new one.

:class:`GitHubChecks` is also the forge-CI runner of the GitHub forge (structurally, the
``CIRunner`` protocol of the ForgeCI actor): GitHub runs the checks by itself on a push
(:meth:`~GitHubChecks.commit_pushed` does nothing), and :meth:`~GitHubChecks.rerun`
re-runs the failed jobs of the named checks (``rerun-failed-jobs`` of their workflow runs;
a re-requested check suite for another app's checks); the results come by webhook again.

Errors are the forge's (:mod:`infra.adapters.forge.errors`): GitHub unreachable, failing
(5xx) or rate-limiting -> retryable; a refusal (401/403/404/422) -> not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import requests
import structlog
from github import Github, GithubException, RateLimitExceededException

from events.checks import LOG_TAIL_CHARS, PASSING, CheckRun
from events.issue import IssueChecksCompleted
from events.secrets import process_masker
from events.subjects import repo_parts
from events.task_state import TaskState

from infra.adapters.forge.errors import ForgeError
from infra.adapters.forge.github_api import GitHubCalls, check_github_repo

log = structlog.get_logger("ccc.forge.github_checks")

ACTIONS_APP = "github-actions"  # the app slug of GitHub Actions' check runs
WAITING = "action_required"
NO_JOBS = frozenset({WAITING, "startup_failure"})  # a workflow run that ends so never had jobs
SET_UP_STEPS = frozenset({"set up job", "complete job"})  # the runner's own steps, not the job's
LOG_READ_BYTES = LOG_TAIL_CHARS * 8  # what is read of a log's end (before masking and cutting)
MAX_LOG_BYTES = 256 * 1024 * 1024  # a log longer than this is not read to its end
LOG_TIMEOUT = 30.0
_TIMESTAMP = re.compile(r"(?m)^\ufeff?\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z ")  # Actions' line prefix
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")


class CommitRef(Protocol):
    """What :meth:`GitHubChecks.collect` is asked about: a commit of a task branch
    (:class:`infra.adapters.http.webhook_translate.CommitChecks` is one)."""

    source: str
    repo: str
    number: int
    head_sha: str
    branch: str
    trigger: str
    actor: str
    candidate: bool  # a merge-queue candidate's branch (no pull request, no base)


class Collected(NamedTuple):
    """The fact, once every check of the commit has finished; else why not yet."""

    fact: IssueChecksCompleted | None
    reason: str = ""


class GitHubChecks:
    """Reads and re-runs a pull request's checks with a GitHub forge's client
    (:class:`~infra.adapters.forge.github.GitHubForge`: its credentials, thread pool,
    retries and error translation)."""

    source = "github"

    def __init__(self, forge: GitHubCalls, *, log_read_bytes: int = LOG_READ_BYTES,
                 max_log_bytes: int = MAX_LOG_BYTES, log_timeout: float = LOG_TIMEOUT) -> None:
        self.forge = forge
        self.log_read_bytes = log_read_bytes
        self.max_log_bytes = max_log_bytes
        self.log_timeout = log_timeout

    # -- the webhook receiver's collector ---------------------------------------------
    async def collect(self, commit: CommitRef) -> Collected:
        """``issue.checks_completed`` for ``commit`` if every check of it has finished,
        else None and why (the module docstring)."""
        repo = check_github_repo(commit.repo)
        return await self.forge.call(f"read the checks of {repo}@{commit.head_sha[:12]}",
                                     lambda gh: self._collect(gh, repo, commit))

    def _collect(self, gh: Github, repo: str, commit: CommitRef) -> Collected:
        r = gh.get_repo(repo)
        sha, branch = commit.head_sha, commit.branch
        owner, _ = repo_parts(repo)
        pr_number, base_sha = None, ""
        if not commit.candidate:
            pr = next(iter(r.get_pulls(state="open", head=f"{owner}:{branch}")), None)
            if pr is None:
                return Collected(None, f"no open pull request from {branch!r} in {repo}")
            if pr.head.sha != sha:
                return Collected(None, f"pull request #{pr.number} is at {pr.head.sha[:12]} now: the checks of "
                                       f"{sha[:12]} are of an earlier push")
            pr_number, base_sha = pr.number, pr.base.sha or ""
        runs = list(r.get_commit(sha).get_check_runs())  # the latest check run of each name
        workflows = [w for w in r.get_workflow_runs(head_sha=sha) if w.head_branch == branch]
        # a workflow run counts on its own: the jobs that wait for others have no check run yet
        pending = (sorted({c.name for c in runs if c.status != "completed"})
                   + sorted({f"workflow {_workflow_name(w)}" for w in workflows if w.status != "completed"}))
        if pending:
            return Collected(None, f"still running on {sha[:12]}: {', '.join(pending[:6])}"
                                   f"{', ...' if len(pending) > 6 else ''} (the last to finish reports)")
        checks = [self._check(gh, r, c) for c in sorted(runs, key=lambda c: (c.name, c.id))]
        with_runs = {c.check_suite.id for c in runs}
        checks += [CheckRun(name=_workflow_name(w), conclusion=w.conclusion, url=w.html_url or "", run_id=w.id,
                            started=False)
                   for w in sorted(workflows, key=lambda w: w.id)
                   if w.conclusion in NO_JOBS and w.check_suite_id not in with_runs]
        if not checks:
            return Collected(None, f"no checks on {sha[:12]} yet")
        base = self._base_results(r, base_sha, {c.name for c in checks})
        done = [c.completed_at for c in runs if c.completed_at is not None]
        outcome = "\n".join(sorted(f"{c.name}={c.conclusion}@{c.run_id}" for c in checks))
        digest = hashlib.sha256(outcome.encode()).hexdigest()[:16]
        fact = IssueChecksCompleted(
            event_id=f"{commit.source}:{repo}#{commit.number}:checks:{sha}:{digest}", source=commit.source,
            repo=repo, number=commit.number, occurred_at=_utc(max(done)) if done else datetime.now(UTC),
            actor=commit.actor, head_sha=sha, branch=branch, pr_number=pr_number, checks=tuple(checks),
            base_sha=base_sha, base=base)
        return Collected(fact)

    def _check(self, gh: Github, r: Any, run: Any) -> CheckRun:
        conclusion = run.conclusion or "neutral"
        started, duration = run.started_at is not None, 0.0
        if run.started_at is not None and run.completed_at is not None:
            duration = max(0.0, (run.completed_at - run.started_at).total_seconds())
        tail = ""
        if conclusion not in PASSING and conclusion != WAITING:
            if _app(run) == ACTIONS_APP:  # a job: its steps say whether it ran, its log what happened
                if (steps := self._steps(r, run.id)) is not None:
                    started = any(s.name.lower() not in SET_UP_STEPS and s.conclusion not in (None, "skipped")
                                  for s in steps)
                tail = self._job_log(gh, r, run.id)
            else:  # another app's check: what it reported is all there is
                out = run.output
                tail = _tail("\n".join(t for t in (out.title, out.summary, out.text) if t) if out else "")
        return CheckRun(name=run.name, conclusion=conclusion, url=run.html_url or run.details_url or "",
                        log_tail=tail, started=started, run_id=run.id, duration=duration)

    @staticmethod
    def _steps(r: Any, job_id: int) -> list | None:
        """A job's steps (none: it never got a runner), or None if GitHub will not say."""
        try:
            return list(r.get_workflow_job(job_id).steps or ())
        except GithubException as e:
            if _retryable(e):
                raise
            return None

    def _job_log(self, gh: Github, r: Any, job_id: int) -> str:
        """The masked tail of a job's log. A log GitHub no longer has (404, 410), or a
        download that fails, leaves a note instead: the fact goes out without it. GitHub's
        API failing raises (retryable): a later delivery of the commit collects again."""
        try:
            headers, _ = gh.requester.requestBlobAndCheck("GET", f"{r.url}/actions/jobs/{job_id}/logs")
        except GithubException as e:
            if _retryable(e):
                raise
            return f"(no log: GitHub answered {e.status} for the job's log)"
        location = headers.get("location") or headers.get("Location")
        if not location:
            return "(no log: GitHub gave no address for the job's log)"
        try:  # a signed URL: the signature is the credential, the token is not sent along
            with requests.get(location, stream=True, timeout=self.log_timeout, allow_redirects=True,
                              headers={"Range": f"bytes=-{self.log_read_bytes}"}) as got:
                if got.status_code == 416:  # nothing to read: an empty log
                    return ""
                if got.status_code not in (200, 206):
                    return f"(no log: its download answered HTTP {got.status_code})"
                data, cut = self._read_tail(got.iter_content(64 * 1024))
                cut = cut or got.status_code == 206
        except requests.RequestException as e:
            log.warning("checks.log_unavailable", job_id=job_id, error=type(e).__name__)
            return f"(no log: its download failed: {type(e).__name__})"
        return _tail(data.decode("utf-8", "replace"), cut=cut)

    def _read_tail(self, chunks: Iterable[bytes]) -> tuple[bytes, bool]:
        """The last ``log_read_bytes`` of a download (and whether anything came before)."""
        kept, total = bytearray(), 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_log_bytes:
                raise requests.RequestException(f"the log is longer than {self.max_log_bytes} bytes")
            kept += chunk
            if len(kept) > self.log_read_bytes:
                del kept[: len(kept) - self.log_read_bytes]
        return bytes(kept), total > len(kept)

    @staticmethod
    def _base_results(r: Any, base_sha: str, names: set[str]) -> dict[str, str]:
        """The conclusions of the same checks on the base commit, where GitHub has them;
        best effort (a base without checks, or one GitHub refuses to show, gives none)."""
        if not base_sha or not base_sha.strip("0"):
            return {}
        try:
            return {c.name: c.conclusion for c in r.get_commit(base_sha).get_check_runs()
                    if c.name in names and c.status == "completed" and c.conclusion}
        except GithubException as e:
            if _retryable(e):
                raise
            return {}

    # -- the ForgeCI actor's runner ---------------------------------------------------
    async def commit_pushed(self, task: TaskState, sha: str, ref: str) -> IssueChecksCompleted | None:
        """GitHub runs the checks of a push by itself; their results come by webhook."""
        return None

    async def rerun(self, task: TaskState, sha: str, checks: tuple[str, ...]) -> IssueChecksCompleted | None:
        """Re-run the named checks of ``sha`` where they failed: the failed jobs of their
        workflow runs, and the check suites of other apps' checks (GitHub asks the app
        again). Checks already running again are left alone, so a retried call does not
        re-run twice. The results come by webhook: returns None."""
        if task.issue.source != self.source:
            raise ForgeError(f"task {task.task_id} is a {task.issue.source} issue's, not a GitHub one's")
        repo = check_github_repo(task.issue.repo)
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha or ""):
            raise ForgeError(f"re-run the checks of {repo}: not a commit id: {sha[:80]!r}")
        names = frozenset(checks)
        if not names:
            raise ForgeError(f"re-run the checks of {repo}@{sha[:12]}: no check named")
        done = await self.forge.call(f"re-run {', '.join(sorted(names))} on {repo}@{sha[:12]}",
                                     lambda gh: self._rerun(gh, repo, sha, names))
        log.info("checks.rerun", repo=repo, head_sha=sha[:12], checks=sorted(names), **done)
        return None

    def _rerun(self, gh: Github, repo: str, sha: str, names: frozenset[str]) -> dict[str, list[int]]:
        r = gh.get_repo(repo)
        found = [c for c in r.get_commit(sha).get_check_runs() if c.name in names]
        waiting = {w.id for w in r.get_workflow_runs(head_sha=sha)
                   if w.conclusion == WAITING and _workflow_name(w) in names}
        if not found and not waiting:
            raise ForgeError(f"{repo}@{sha[:12]} has no check named {', '.join(sorted(names))}")
        runs: set[int] = set()
        suites: set[int] = set()
        for c in found:
            if c.status != "completed" or (c.conclusion or "") in PASSING or c.conclusion == WAITING:
                continue  # running again already, passed, or waiting for a maintainer (not ours to re-run)
            if _app(c) == ACTIONS_APP:
                runs.add(r.get_workflow_job(c.id).run_id)
            else:
                suites.add(c.check_suite.id)
        started: list[int] = []
        for run_id in sorted(runs):
            run = r.get_workflow_run(run_id)
            if run.status != "completed":
                continue  # already re-running (an earlier call, or someone on GitHub)
            self._post(lambda url=f"{run.url}/rerun-failed-jobs": gh.requester.requestJsonAndCheck("POST", url),
                       still=lambda run_id=run_id: r.get_workflow_run(run_id).status == "completed")
            started.append(run_id)
        for suite_id in sorted(suites):
            gh.requester.requestJsonAndCheck("POST", f"{r.url}/check-suites/{suite_id}/rerequest")
        return {"workflow_runs": started, "check_suites": sorted(suites), "awaiting_approval": sorted(waiting)}

    @staticmethod
    def _post(request: Callable[[], Any], still: Callable[[], bool]) -> None:
        """A re-run request; GitHub's 403 because the run was re-started meanwhile is done."""
        try:
            request()
        except GithubException as e:
            if e.status == 403 and not still():
                return
            raise


def _app(run: Any) -> str:
    app = run.app
    return (app.slug or "") if app is not None else ""


def _workflow_name(run: Any) -> str:
    """A workflow run's name as a check's: its workflow's, else its file's."""
    return run.name or (run.path or "").rsplit("/", 1)[-1] or f"workflow run {run.id}"


def _retryable(e: GithubException) -> bool:
    return isinstance(e, RateLimitExceededException) or e.status in (408, 429) or e.status >= 500


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _tail(text: str, *, cut: bool = False) -> str:
    """The end of a log as a fix attempt is shown it: without Actions' timestamps, masked
    (the whole read part first, so no secret is cut in two before it is recognised),
    then at most :data:`~events.checks.LOG_TAIL_CHARS`, from a line's start."""
    text = _TIMESTAMP.sub("", text.replace("\r\n", "\n"))
    if cut and (end := _PEM_END.search(text)) and "-----BEGIN" not in text[:end.start()]:
        text = text[end.end():]  # the end of a key block whose beginning was not read: unrecognisable
    text = process_masker().text(text)
    if len(text) > LOG_TAIL_CHARS:
        text, cut = text[-LOG_TAIL_CHARS:], True
    if cut and "\n" in text:
        text = text.split("\n", 1)[1]  # the first line is a part of one
    return text.strip("\n")


__all__ = ["ACTIONS_APP", "Collected", "CommitRef", "GitHubChecks"]
