"""The agent's workspace: one directory per task attempt, commands confined to it.

Layout: ``<root>/<agent_id>/tasks/task-<task_id>/``
    ``repo/``           the clone the coder edits and the tests run in
    ``logs/``           full command output (events carry only a reference to it)
    ``home/``, ``tmp/`` HOME and TMPDIR of every command, so tools cannot read or
                        write the agent's real home (credentials, caches of other tasks)
    ``metadata.json``   who/what/when; ``finished_at`` marks it eligible for cleanup;
                        ``git_objects``: the agent's mirror objects the clone borrows
                        (``objects/info/alternates``), bound read-only in the sandbox

Why a scrubbed environment: the commands run code from the repository under change
(its tests, its build scripts). That code must not see the cluster's credentials, so a
child gets only PATH, HOME, LANG/LC_ALL, TMPDIR plus what the caller names explicitly.

Why a sandbox (:mod:`infra.adapters.git.sandbox`): a scrubbed environment is not enough.
A child could still read the agent's environment from ``/proc/$PPID/environ``, the data
dir, other workspaces and ``~``, reach the NATS port and outlive the task. Every command
therefore runs in the workspace's sandbox (bubblewrap by default), which sees the
system read-only and only ``repo/``, ``home/`` and ``tmp/`` of this workspace writable:
not ``logs/`` (the agent writes them) nor ``metadata.json`` (the network policy and the
cleanup mark live there). The objects the clone borrows from the agent's mirror of the
repository (:mod:`infra.adapters.git.mirrors`) are there read-only, so the model's git
works and cannot change them; which ones is read from the metadata, never from the
clone's ``.git`` (the model's to rewrite: it could name ``~/.ssh`` there). The network the repository asked for (``.ccc/sandbox.toml``)
is read from its base commit when it is cloned and kept in the metadata, out of the
reach of the commands and the coder.

Why process groups: a test runner forks (``make`` → ``sh`` → ``pytest`` → workers).
Killing only the direct child leaves the grandchildren running and holding the output
pipe open; each command therefore starts a new session and the whole group is killed on
timeout, on cancellation, and once the command itself has exited (nothing outlives it).
In a sandbox the PID namespace does the same for processes that left the group.

The filesystem calls here are blocking but short; ``create``/``cleanup_expired`` may be
wrapped in ``asyncio.to_thread`` by a caller that deletes large trees.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from events.errors import CccError, ConfigError
from events.subjects import check_id
from events.work import CommandResult

from infra.adapters.git.cleanup import remove_tree
from infra.adapters.git.runner import run_command
from infra.adapters.git.sandbox import (
    NO_NETWORK,
    Launch,
    Limits,
    NetworkPolicy,
    Sandbox,
    default_sandbox,
    parse_network,
)
from infra.adapters.obs.masking import secret_env_name

__all__ = ["Workspace", "WorkspaceEscape", "scrubbed_env_name"]

_SCRUB_PREFIXES = ("NATS_", "ANTHROPIC_", "GITHUB_", "CCC_", "AWS_", "GH_")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Where toolchains live, not credentials: passed through when set, because HOME moves
# and tools that default to ~/.rustup (rustup's cargo proxy) would otherwise not start.
_TOOLCHAIN_VARS = ("RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "GOROOT", "JAVA_HOME", "PYENV_ROOT",
                   "PYENV_VERSION", "VIRTUAL_ENV", "NVM_DIR")


class WorkspaceEscape(CccError):
    """A path or command tried to leave the workspace. Retrying cannot help."""

    retryable = False


def scrubbed_env_name(name: str) -> bool:
    """Names that never reach a workspace command from the parent environment: secrets,
    plus everything that configures the cluster itself (NATS_URL may embed credentials)."""
    return secret_env_name(name) or name.upper().startswith(_SCRUB_PREFIXES)


class Workspace:
    """One task attempt's directory. Construct with :meth:`create` (fresh) or
    :meth:`open` (existing). ``sandbox``: where its commands run (default: the process's
    bubblewrap sandbox; never none unless someone asks for :class:`NoSandbox`)."""

    def __init__(self, root: Path | str, agent_id: str, task_id: str, *, sandbox: Sandbox | None = None) -> None:
        check_id(agent_id, "agent id")  # ids are path components here: the one id check
        check_id(task_id, "task id")
        self.root = Path(root).resolve()
        self.agent_id = agent_id
        self.task_id = task_id
        self.path = self.root / agent_id / "tasks" / f"task-{task_id}"
        self.sandbox = sandbox if sandbox is not None else default_sandbox()

    # -- lifecycle ------------------------------------------------------------------
    @classmethod
    def create(
        cls, root: Path | str, agent_id: str, task_id: str, metadata: Mapping[str, Any] | None = None,
        *, sandbox: Sandbox | None = None,
    ) -> Workspace:
        """A fresh workspace. A directory left by an earlier attempt is removed first:
        a retry must not inherit half-applied edits or a dirty clone."""
        ws = cls(root, agent_id, task_id, sandbox=sandbox)
        remove_tree(ws.path)
        # 0700 down from the agent's directory: clones of private repositories, their
        # logs, the coder's transcript (mkdir's mode covers only the last component)
        ws.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (ws.root / agent_id, ws.root / agent_id / "tasks", ws.path):
            d.mkdir(mode=0o700, exist_ok=True)
            d.chmod(0o700)
        for d in (ws.repo_dir, ws.logs_dir, ws.home_dir, ws.tmp_dir):
            d.mkdir(mode=0o700)
        meta = {"agent_id": agent_id, "task_id": task_id,
                "created_at": datetime.now(UTC).isoformat(), **(metadata or {})}
        ws.write_metadata(meta)
        return ws

    @classmethod
    def open(cls, root: Path | str, agent_id: str, task_id: str, *, sandbox: Sandbox | None = None) -> Workspace:
        ws = cls(root, agent_id, task_id, sandbox=sandbox)
        if not ws.metadata_path.is_file():
            raise ConfigError(f"no workspace at {ws.path}")
        return ws

    @classmethod
    def containing(cls, repo_dir: Path | str, *, sandbox: Sandbox | None = None) -> Workspace | None:
        """The workspace whose clone is ``repo_dir``, or None when it is not one."""
        task_dir = Path(repo_dir).resolve().parent
        tasks, name = task_dir.parent, task_dir.name
        if tasks.name != "tasks" or not name.startswith("task-") or Path(repo_dir).resolve().name != "repo":
            return None
        try:
            return cls.open(tasks.parent.parent, tasks.parent.name, name.removeprefix("task-"), sandbox=sandbox)
        except CccError:
            return None

    @property
    def repo_dir(self) -> Path:
        return self.path / "repo"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def home_dir(self) -> Path:
        return self.path / "home"

    @property
    def tmp_dir(self) -> Path:
        return self.path / "tmp"

    @property
    def metadata_path(self) -> Path:
        return self.path / "metadata.json"

    @property
    def writable_dirs(self) -> list[Path]:
        """What a sandboxed command may write: the clone, its HOME and its TMPDIR."""
        return [self.repo_dir.resolve(), self.home_dir.resolve(), self.tmp_dir.resolve()]

    # -- metadata -------------------------------------------------------------------
    def read_metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_path.read_text(encoding="utf-8"))

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Replace metadata.json atomically (a crash never leaves half a file, which
        cleanup would have to treat as unfinished forever)."""
        tmp = self.metadata_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dict(metadata), indent=2, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, self.metadata_path)

    def update_metadata(self, **fields: Any) -> dict[str, Any]:
        meta = self.read_metadata()
        meta.update(fields)
        self.write_metadata(meta)
        return meta

    def mark_finished(self, when: datetime | None = None, **fields: Any) -> None:
        """Make the workspace eligible for :func:`cleanup_expired` after the retention."""
        self.update_metadata(finished_at=(when or datetime.now(UTC)).isoformat(), **fields)

    def set_network(self, policy: NetworkPolicy) -> None:
        """Record the network the repository asked for (read at clone time)."""
        self.update_metadata(sandbox_network=policy.setting())

    def borrowed_objects(self) -> list[Path]:
        """The object directories the clone borrows (recorded when it was made): existing
        directories under the workspaces' root only, whatever the metadata says."""
        try:
            recorded = self.read_metadata().get("git_objects") or []
        except (OSError, ValueError):
            return []
        found = []
        for raw in recorded if isinstance(recorded, list) else []:
            p = Path(str(raw)).resolve()
            if p.is_dir() and p.is_relative_to(self.root) and not p.is_relative_to(self.path):
                found.append(p)
        return found

    def network(self) -> NetworkPolicy:
        """The network this workspace's commands get: what :meth:`set_network` recorded,
        none when nothing was (read each time: the metadata is the one place it lives)."""
        try:
            value = self.read_metadata().get("sandbox_network", "none")
        except (OSError, ValueError):
            return NO_NETWORK
        return parse_network(value, f"{self.metadata_path}: sandbox_network")

    # -- confinement ----------------------------------------------------------------
    def confine(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a path given relative to ``repo_dir``; refuse anything that would
        land outside it: absolute paths, ``..`` components, symlinks pointing out.
        ``.git`` is refused too: writing hooks or config there would run code in the
        agent's own (unscrubbed) git calls."""
        raw = os.fspath(path)
        p = Path(raw)
        if not raw or p.is_absolute() or raw.startswith("~"):
            raise WorkspaceEscape(f"path {raw!r} must be relative to the repository")
        if ".." in p.parts:
            raise WorkspaceEscape(f"path {raw!r} contains '..'")
        if p.parts and p.parts[0] == ".git":
            raise WorkspaceEscape(f"path {raw!r} is inside .git")
        base = self.repo_dir.resolve()
        resolved = (base / p).resolve()
        if resolved != base and not resolved.is_relative_to(base):
            raise WorkspaceEscape(f"path {raw!r} resolves outside the workspace ({resolved})")
        if resolved.is_relative_to(base / ".git"):
            raise WorkspaceEscape(f"path {raw!r} resolves inside .git")
        return resolved

    def _cwd(self, cwd: str | os.PathLike[str] | None) -> Path:
        if cwd is None:
            return self.repo_dir.resolve()
        p = Path(cwd)
        if p.is_absolute():
            base = self.repo_dir.resolve()
            resolved = p.resolve()
            if resolved != base and not resolved.is_relative_to(base):
                raise WorkspaceEscape(f"cwd {str(p)!r} is outside the workspace repository")
            return resolved
        return self.confine(p)

    # -- commands -------------------------------------------------------------------
    def environment(
        self, allow: Iterable[str] = (), extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The scrubbed environment of a workspace command: PATH, HOME and TMPDIR
        (inside the workspace), the locale, toolchain locations (``RUSTUP_HOME``,
        ``JAVA_HOME``, ...). ``allow`` names variables copied from the parent; naming a
        secret/cluster variable there is a configuration error, not silently honoured.
        ``extra`` sets explicit values (e.g. a coder backend handing its own API key to
        its CLI): the caller chose those deliberately, so they are not filtered."""
        parent = os.environ
        env = {
            "PATH": parent.get("PATH") or _DEFAULT_PATH,
            "HOME": str(self.home_dir),
            "TMPDIR": str(self.tmp_dir),
            "LANG": parent.get("LANG") or "C.UTF-8",
            "LC_ALL": parent.get("LC_ALL") or parent.get("LANG") or "C.UTF-8",
            "GIT_TERMINAL_PROMPT": "0",
            # no __pycache__ dirs in the repo: they would show up as changes to commit
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for name in _TOOLCHAIN_VARS:
            if parent.get(name):
                env[name] = parent[name]
        rustup = Path.home() / ".rustup"
        if "RUSTUP_HOME" not in env and rustup.is_dir():
            env["RUSTUP_HOME"] = str(rustup)
        for name in allow:
            if scrubbed_env_name(name):
                raise ConfigError(f"environment variable {name} may not be passed to workspace commands")
            if name in parent:
                env[name] = parent[name]
        env.update(extra or {})
        return env

    async def run(
        self,
        cmd: list[str] | str,
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        log_name: str | None = None,
        max_output: int = 200_000,
        env_allow: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_limit: int = 50_000_000,
    ) -> CommandResult:
        """Run a command (a list is exec'd, a string goes through ``/bin/sh -c``) in
        the workspace's sandbox, in its own process group, with a scrubbed environment.
        On timeout the whole group is killed and ``timed_out`` is set; on cancellation
        the group is killed and ``CancelledError`` propagates. Never raises for a failing
        command; raises :class:`SandboxUnavailable` when no sandbox can be made (fail
        closed). A limit that stopped the command, or a host the proxy refused, is said
        at the end of the output."""
        workdir = self._cwd(cwd)
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ConfigError("empty command")
        shown = cmd if isinstance(cmd, str) else shlex.join(argv)
        log_path = self._log_path(log_name) if log_name else None
        async with self.sandboxed(argv, cwd=workdir, env=self.environment(env_allow, env)) as launch:
            result = await run_command(launch.argv, shown=shown, cwd=workdir, env=launch.env, timeout=timeout,
                                       log_path=log_path, max_output=max_output, log_limit=log_limit,
                                       preexec=launch.preexec)
            notes = launch.notes(None if result.timed_out else result.exit_code)
        if not notes:
            return result
        text = "".join(f"\n[sandbox: {n}]" for n in notes)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:  # noqa: ASYNC230 (a local file)
                f.write(text)
        return msgspec.structs.replace(result, output=result.output + text)

    @contextlib.asynccontextmanager
    async def sandboxed(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None,
        network: NetworkPolicy | None = None, read_only: Sequence[Path] = (), limits: Limits | None = None,
    ) -> AsyncIterator[Launch]:
        """``argv`` prepared to run in this workspace's sandbox (for callers that start
        the process themselves, like the Claude Code CLI coder): writable ``repo``,
        ``home`` and ``tmp``, the repository's network unless ``network`` is given,
        ``read_only`` extra paths (an executable's installation) besides the mirror objects
        the clone borrows, other workspaces hidden."""
        self.sandbox.check()  # fail closed, with the reason, before anything starts
        async with self.sandbox.launch(
            argv, cwd=cwd or self.repo_dir.resolve(), env=env, writable=self.writable_dirs,
            read_only=[*read_only, *self.borrowed_objects()], hide=(self.root,),
            network=self.network() if network is None else network,
            limits=limits,
        ) as launch:
            yield launch

    def _log_path(self, log_name: str) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", log_name).lstrip(".") or "command"
        if not name.endswith(".log"):
            name += ".log"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return self.logs_dir / name
