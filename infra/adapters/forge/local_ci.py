"""The local forge's CI: the repository's ``.ccc/test-command``, run in the sandbox on
a commit of a pull request (or a merge-queue candidate), reported as one check,
``ccc/test``, in an :class:`~events.issue.IssueChecksCompleted` fact.

Why here: GitHub runs a pull request's checks by itself; the local forge (bare
repositories on disk) has nobody to do it, and without checks the offline demo and
the tests could not exercise the loop "red CI -> fix -> green". The ``ForgeCI`` actor
(:mod:`actors.forge_ci`) calls :class:`LocalCIRunner` on every push it hears of and
publishes what it returns.

What a run does, and why each step is shaped so:

* The command is read from the commit's *objects* in the forge's bare repository
  (``git ls-tree``/``cat-file``), not from a checkout: it must be a regular file
  (a symlink ``.ccc/test-command -> /proc/self/environ`` is refused, not followed) of
  at most :data:`MAX_TEST_COMMAND` bytes; its first line that is not blank or a
  ``#`` comment is the command, as for the agent's own test run. No file: the check is
  ``skipped`` (which passes), with a log that says why.
* The commit is fetched (``--depth 1``, no tags, hooks disabled) into a fresh task
  workspace (:class:`~infra.adapters.git.workspace.Workspace`) and the command runs
  there with ``sh -c``, exactly as the agent's tests run: in the agent sandbox
  (bubblewrap by default), with a scrubbed environment, writable ``repo``/``home``/
  ``tmp`` only, the network the repository's ``.ccc/sandbox.toml`` asks for *at the
  base commit* (a pull request cannot grant itself network), and a wall-time limit
  (``timed_out``; ``started=False`` when it printed nothing, so the failure reads as
  the infrastructure's). A sandbox that cannot be made gives ``startup_failure``.
* The output is masked; its tail goes into the check (``log_tail``) and the whole
  (bounded) log into the artifacts store (``log_ref``).
* When the head fails, the same check runs on the base commit (the merge-base of the
  commit and the base branch), cached per base sha, and its conclusion goes into the
  fact's ``base``: a check red on the base too is the base's fault, not the change's.

:func:`plan_test_command` and :func:`checks_completed` are pure.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

import structlog

from events.checks import LOG_TAIL_CHARS, CheckRun
from events.errors import CccError, ConfigError
from events.issue import IssueChecksCompleted
from events.task_state import TaskState

from infra.adapters.forge.errors import ForgeError
from infra.adapters.forge.local import LocalForge
from infra.adapters.git import gitops
from infra.adapters.git.cleanup import remove_tree
from infra.adapters.git.sandbox import (
    MAX_SANDBOX_FILE,
    NO_NETWORK,
    SANDBOX_FILES,
    NetworkPolicy,
    Sandbox,
    parse_sandbox_file,
)
from infra.adapters.git.workspace import Workspace

log = structlog.get_logger("ccc.local_ci")

SOURCE = "local"
CHECK_NAME = "ccc/test"
TEST_COMMAND = ".ccc/test-command"
MAX_TEST_COMMAND = 16 * 1024
MAX_OUTPUT = 400_000  # of a run's output kept (head and tail), stored as its log
WORKSPACE_OWNER = "forge-ci"  # the workspaces' "agent" directory under the work root
REGULAR_MODES = ("100644", "100755")
_MODE_KINDS = {"120000": "a symlink", "160000": "a submodule", "040000": "a directory"}


# what a check sees of where it runs, as on GitHub Actions and most CI services: tests
# that only run in CI (``skipUnless(os.environ.get("CI"))``) run here, not on the agent;
# and, like GITHUB_RUN_ATTEMPT, CCC_CI_RUN_ATTEMPT says which run of the commit this is
CI_ENV: dict[str, str] = {"CI": "true", "CCC_CI": "1"}


class ArtifactStore(Protocol):
    """Where logs are kept (``actors.ports.Artifacts``; it masks what it stores)."""

    async def put_text(self, name: str, text: str) -> str: ...


class RepoFile(NamedTuple):
    """A path of a commit, as its tree has it: ``mode`` "" when absent; ``data`` only for
    a regular file within the size limit (one byte more than the limit says "too big")."""

    mode: str
    data: bytes | None = None


class Plan(NamedTuple):
    """What to run for the check; without a command, the conclusion and why."""

    command: str | None
    conclusion: str = ""
    message: str = ""


# -- pure ---------------------------------------------------------------------------------
def plan_test_command(entry: RepoFile, sha: str, max_bytes: int = MAX_TEST_COMMAND) -> Plan:
    """The command ``.ccc/test-command`` names at commit ``sha``, or why there is none:
    absent -> ``skipped`` (nothing to run passes); not a regular file, too large, not
    text, or no command in it -> ``failure`` (the repository must fix it)."""
    at = f"at {sha[:12]}"
    if not entry.mode:
        return Plan(None, "skipped", f"ccc-ci: no {TEST_COMMAND} {at}: the repository names no test command, "
                                     f"so there is nothing to run (add {TEST_COMMAND} with the command that "
                                     "runs its tests)")
    if entry.mode not in REGULAR_MODES or entry.data is None:
        kind = _MODE_KINDS.get(entry.mode, f"not a regular file (mode {entry.mode})")
        return Plan(None, "failure", f"ccc-ci: {TEST_COMMAND} {at} is {kind}: refused, it must be a regular "
                                     "file holding the command")
    if len(entry.data) > max_bytes:
        return Plan(None, "failure", f"ccc-ci: {TEST_COMMAND} {at} is larger than {max_bytes} bytes: refused")
    try:
        text = entry.data.decode("utf-8")
    except UnicodeDecodeError:
        return Plan(None, "failure", f"ccc-ci: {TEST_COMMAND} {at} is not UTF-8 text: refused")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            if "\0" in line:
                break
            return Plan(line.strip())
    return Plan(None, "failure", f"ccc-ci: {TEST_COMMAND} {at} holds no command (only blank lines or "
                                 "# comments)")


def conclusion_of(exit_code: int, timed_out: bool) -> str:
    if timed_out:
        return "timed_out"
    return "success" if exit_code == 0 else "failure"


def log_text(command: str, output: str, *, exit_code: int, timed_out: bool, duration: float,
             timeout: float, sandbox: str) -> str:
    """The run's log as stored and shown: the command, its output, how it ended."""
    if timed_out:
        end = f"[ccc-ci: timed out after {timeout:.0f} s; the command and everything it started were killed]"
    else:
        end = f"[ccc-ci: exit code {exit_code} after {duration:.1f} s]"
    return f"$ {command}\n[ccc-ci: sandbox {sandbox}]\n{output}{'' if output.endswith(chr(10)) else chr(10)}{end}\n"


def tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    return text if len(text) <= limit else text[-limit:]


def checks_completed(
    task: TaskState, *, sha: str, ref: str, checks: tuple[CheckRun, ...], base_sha: str = "",
    base: dict[str, str] | None = None, at: datetime, event_id: str = "",
) -> IssueChecksCompleted:
    """The forge fact for ``checks`` of ``sha`` of the task's pull request. The event id is
    the publisher's to choose (the actor makes it deterministic); a default is given."""
    issue = task.issue
    return IssueChecksCompleted(
        event_id=event_id or f"ci:{task.task_id}:{sha}", source=issue.source, repo=issue.repo,
        number=issue.number, occurred_at=at, actor=WORKSPACE_OWNER, head_sha=sha, branch=ref,
        pr_number=task.pr_number, checks=checks, base_sha=base_sha, base=dict(base or {}),
    )


# -- git on the forge's bare repository ----------------------------------------------------
def read_commit_file(git_dir: Path, sha: str, path: str, max_bytes: int) -> RepoFile:
    """``path`` in commit ``sha``, read from the object store (nothing checked out, no
    symlink followed): at most ``max_bytes + 1`` bytes of a regular file."""
    status, out, err = gitops.run_git(git_dir, "ls-tree", "-z", sha, "--", path, check=False)
    if status != 0:
        raise ForgeError(f"cannot read {path} at {sha[:12]}: {gitops.redact(err.strip())}")
    entry = out.decode("utf-8", "replace").split("\0", 1)[0]
    if not entry:
        return RepoFile("")
    meta, _, _ = entry.partition("\t")
    mode, kind, blob = meta.split()
    if kind != "blob" or mode not in REGULAR_MODES:
        return RepoFile(mode)
    size = int(gitops.git_output(git_dir, "cat-file", "-s", blob))
    if size > max_bytes:
        return RepoFile(mode, b"\0" * (max_bytes + 1))  # only its size matters: too big
    return RepoFile(mode, gitops.run_git(git_dir, "cat-file", "blob", blob)[1])


def network_at(git_dir: Path, sha: str) -> NetworkPolicy:
    """The repository's sandbox setting (``.ccc/sandbox.toml``) at ``sha``."""
    found = []
    for name in SANDBOX_FILES:
        f = read_commit_file(git_dir, sha, name, MAX_SANDBOX_FILE)
        if not f.mode:
            continue
        if f.data is None:
            raise ConfigError(f"{name}: must be a regular file in the repository (found mode {f.mode})")
        if len(f.data) > MAX_SANDBOX_FILE:
            raise ConfigError(f"{name}: more than the {MAX_SANDBOX_FILE} bytes a sandbox setting may have")
        found.append((name, f.data.decode("utf-8", "replace")))
    if len(found) > 1:
        raise ConfigError(f"both {' and '.join(n for n, _ in found)} exist: keep one")
    return parse_sandbox_file(found[0][1], found[0][0]) if found else NO_NETWORK


def _commit(git_dir: Path, sha: str) -> str:
    sha = (sha or "").strip().lower()
    if not sha or not all(c in "0123456789abcdef" for c in sha) or len(sha) not in (40, 64):
        raise ForgeError(f"not a commit id: {sha!r}")
    status, _, _ = gitops.run_git(git_dir, "cat-file", "-e", f"{sha}^{{commit}}", check=False)
    if status != 0:
        raise ForgeError(f"{git_dir}: no commit {sha[:12]} (the branch was rewritten?)")
    return sha


def merge_base(git_dir: Path, sha: str, branch: str) -> str:
    """The commit ``sha`` forked from ``branch``; "" when they share no history."""
    status, out, _ = gitops.run_git(git_dir, "merge-base", sha, f"refs/heads/{branch}", check=False)
    return out.decode().strip() if status == 0 else ""


# -- the runner -------------------------------------------------------------------------------
class LocalCIRunner:
    """``sandbox``: where the command runs (the agents' sandbox, or a factory of it);
    ``work_dir``: where run workspaces are made (each removed after its run);
    ``mask``: the one secret masker, for the log tail carried in the event."""

    source = SOURCE

    def __init__(
        self,
        forge: LocalForge,
        sandbox: Sandbox | Callable[[], Sandbox],
        artifacts: ArtifactStore,
        mask: Callable[[str], str],
        *,
        work_dir: Path | str,
        timeout: float = 600.0,
        base_cache_size: int = 256,
    ) -> None:
        self.forge = forge
        self.sandbox = sandbox if isinstance(sandbox, Sandbox) else sandbox()
        self.artifacts = artifacts
        self.mask = mask
        self.work_dir = Path(work_dir)
        self.timeout = timeout
        self.base_cache_size = base_cache_size
        self._base: OrderedDict[str, dict[str, str]] = OrderedDict()
        # a lock per base sha while anyone holds it (then collected)
        self._base_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.runs = 0  # commands run (heads and bases)

    # -- CIRunner ---------------------------------------------------------------------
    async def commit_pushed(self, task: TaskState, sha: str, ref: str) -> IssueChecksCompleted | None:
        return await self._checks(task, sha, ref)

    async def rerun(self, task: TaskState, sha: str, checks: tuple[str, ...]) -> IssueChecksCompleted | None:
        """The local forge has one check (``ccc/test``): a re-run runs it again."""
        ref = task.queue_ref if task.status == "merging" and task.queue_ref else task.branch
        return await self._checks(task, sha, ref or "")

    # -- a run --------------------------------------------------------------------------
    async def _checks(self, task: TaskState, sha: str, ref: str) -> IssueChecksCompleted:
        if task.issue.source != self.source:
            raise ForgeError(f"task {task.task_id} is of {task.issue.source!r}, not the local forge")
        repo = task.issue.repo
        git_dir = self.forge.repo_path(repo)
        if not self.forge.exists(repo):
            raise ForgeError(f"unknown repository {repo!r}")
        sha = await asyncio.to_thread(_commit, git_dir, sha)
        base_branch = task.base_branch or await asyncio.to_thread(self.forge.default_branch, repo)
        base_sha = await asyncio.to_thread(merge_base, git_dir, sha, base_branch)
        check = await self._run(task, git_dir, sha, base_sha, keep_log=True, attempt=task.reruns + 1)
        base: dict[str, str] = {}
        if not check.passed and base_sha and base_sha != sha:
            try:
                base = await self._base_checks(task, git_dir, base_sha)
            except CccError as e:  # the head's result stands without the comparison
                log.warning("local_ci.base_not_checked", task_id=task.task_id, base_sha=base_sha, error=str(e))
        log.info("local_ci.checked", task_id=task.task_id, repo=repo, sha=sha, ref=ref,
                 conclusion=check.conclusion, base_sha=base_sha, base=base)
        return checks_completed(task, sha=sha, ref=ref, checks=(check,), base_sha=base_sha, base=base,
                                at=datetime.now(UTC))

    async def _base_checks(self, task: TaskState, git_dir: Path, base_sha: str) -> dict[str, str]:
        """The check's conclusion on the base commit: run once per base sha (tasks failing
        on the same base at the same time wait for one run), then cached."""
        lock = self._base_locks.get(base_sha)
        if lock is None:
            lock = self._base_locks[base_sha] = asyncio.Lock()
        async with lock:
            if base_sha in self._base:
                self._base.move_to_end(base_sha)
                return dict(self._base[base_sha])
            check = await self._run(task, git_dir, base_sha, base_sha, keep_log=False)
            result = {check.name: check.conclusion}
            self._base[base_sha] = result
            while len(self._base) > self.base_cache_size:
                self._base.popitem(last=False)
            return dict(result)

    async def _run(self, task: TaskState, git_dir: Path, sha: str, network_sha: str, *, keep_log: bool,
                   attempt: int = 1) -> CheckRun:
        """Run the check on ``sha``, with the network the repository asks for at
        ``network_sha`` (the base: "" when there is none, then no network)."""
        entry = await asyncio.to_thread(read_commit_file, git_dir, sha, TEST_COMMAND, MAX_TEST_COMMAND)
        plan = plan_test_command(entry, sha)
        if plan.command is None:
            return await self._check(task, sha, plan.conclusion, plan.message, keep_log=keep_log)
        try:
            network = await asyncio.to_thread(self._admitted_network, task, git_dir, network_sha)
        except ConfigError as e:  # SandboxUnavailable too: no sandbox, nothing runs
            return await self._check(task, sha, "startup_failure",
                                     f"ccc-ci: the check could not start: {e}", started=False, keep_log=keep_log)
        ws = await asyncio.to_thread(self._workspace, git_dir, sha, network)
        try:
            result = await ws.run(plan.command, timeout=self.timeout, max_output=MAX_OUTPUT,
                                  env={**CI_ENV, "CCC_CI_RUN_ATTEMPT": str(attempt)})
            self.runs += 1
        except ConfigError as e:
            return await self._check(task, sha, "startup_failure",
                                     f"ccc-ci: the check could not start: {e}", started=False, keep_log=keep_log)
        finally:
            await asyncio.to_thread(remove_tree, ws.path)
        conclusion = conclusion_of(result.exit_code, result.timed_out)
        text = log_text(plan.command, result.output, exit_code=result.exit_code, timed_out=result.timed_out,
                        duration=result.duration, timeout=self.timeout, sandbox=self.sandbox.name)
        ran = not result.timed_out or bool(result.output.strip())
        return await self._check(task, sha, conclusion, text, started=ran, keep_log=keep_log,
                                 duration=result.duration)

    def _admitted_network(self, task: TaskState, git_dir: Path, sha: str) -> NetworkPolicy:
        """The network the repository asks for at ``sha``, if the operator allows it, and a
        sandbox that works (probed once); ConfigError (SandboxUnavailable) says why not."""
        network = network_at(git_dir, sha) if sha else NO_NETWORK
        self.sandbox.admit(network, f"{task.issue.repo} at {sha[:12] or 'no base commit'}")
        self.sandbox.check()
        return network

    def _workspace(self, git_dir: Path, sha: str, network: NetworkPolicy) -> Workspace:
        """A fresh workspace with ``sha`` checked out (detached; fetched alone, shallow;
        hooks never run), its commands given ``network``."""
        run_id = f"{sha[:12]}-{uuid.uuid4().hex[:12]}"
        ws = Workspace.create(self.work_dir, WORKSPACE_OWNER, run_id, {"commit": sha}, sandbox=self.sandbox)
        try:
            repo = ws.repo_dir
            gitops.run_git(repo, "init", "-q")
            status, _, err = gitops.run_git(repo, "fetch", "-q", "--no-tags", "--depth", "1",
                                            "--no-recurse-submodules", "--", git_dir.as_uri(), sha, check=False)
            if status != 0:
                raise ForgeError(f"cannot fetch {sha[:12]} from {git_dir}: {gitops.redact(err.strip())}",
                                 retryable=True)
            gitops.run_git(repo, "checkout", "-q", "--detach", "FETCH_HEAD")
            ws.set_network(network)
        except BaseException:
            remove_tree(ws.path)
            raise
        return ws

    async def _check(self, task: TaskState, sha: str, conclusion: str, text: str, *, started: bool = True,
                     keep_log: bool, duration: float = 0.0) -> CheckRun:
        masked = self.mask(text)
        log_ref = ""
        if keep_log:
            name = f"ci/{task.task_id}/{sha}/{uuid.uuid4().hex[:12]}.log"
            try:
                log_ref = await self.artifacts.put_text(name, masked)
            except CccError as e:  # the check's result counts more than its stored log
                log.warning("local_ci.log_not_stored", task_id=task.task_id, sha=sha, error=str(e))
        return CheckRun(name=CHECK_NAME, conclusion=conclusion, log_ref=log_ref, log_tail=tail(masked),
                        started=started, duration=duration)
