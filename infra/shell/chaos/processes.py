"""Processes of ``ccc chaos``: the ``ccc`` command line and the lines it prints when
ready, a clean environment, one actor process (:class:`Proc`) and finding, by pid,
what runs under a sandbox or under a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_CCC_SCRIPT = Path(sys.executable).parent / "ccc"
CCC = [str(_CCC_SCRIPT)] if _CCC_SCRIPT.is_file() else [sys.executable, "-m", "infra.shell.cli.main"]
# what `ccc up` and `ccc agent` print once they are running
READY = {"up": "claude-code-cluster is up", "agent": "registered; Ctrl-C"}


# -- processes ---------------------------------------------------------------------------------
def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without anything that would point ``ccc`` elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCC_", "NATS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Proc:
    """One ``ccc`` process in its own session (so a crash can take its whole process
    group, as a host crash would). Output is appended to files across restarts."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0  # wall clock
        self._out_offset = 0

    def start(self) -> None:
        out = open(self.out_path, "ab")  # noqa: SIM115 - handed to the child
        err = open(self.err_path, "ab")  # noqa: SIM115
        self._out_offset = out.tell()
        try:
            self.started_at = time.time()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True, cwd=str(self.out_path.parent))
        finally:
            out.close()
            err.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        try:
            with open(self.out_path, "rb") as f:
                f.seek(self._out_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def wait_for_output(self, text: str, timeout: float = 30.0) -> float:
        """Wait until this incarnation printed ``text``; returns the wall time seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return time.time()
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode if self.proc else '?'}: "
                                   f"{self.stderr_tail()}")
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{self.name} did not print {text!r} in {timeout}s: {self.stderr_tail()}")

    def stderr_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def signal(self, sig: int, group: bool = False) -> None:
        if not self.running:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.proc.pid, sig)  # session leader: pid == pgid
            else:
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process and its process group (the workspace commands run in
        sessions of their own and are reaped by the sandbox)."""
        self.signal(signal.SIGKILL, group=True)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
        return self.proc.returncode


def _ps() -> list[tuple[int, int, str]]:
    rows = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rows.append((int(d.name), ppid, args))
        except (OSError, IndexError, ValueError):
            continue
    return rows


def processes_under(root: Path) -> list[tuple[int, int, str]]:
    """Live processes whose command line or working directory is inside ``root``:
    everything a sandbox started, directly or not."""
    root_s = str(root.resolve())
    me = os.getpid()
    found = []
    for pid, ppid, args in _ps():
        if pid == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if root_s in args or cwd.startswith(root_s):
            found.append((pid, ppid, args))
    return found


def process_tree(root_pid: int) -> set[int]:
    """The live descendants of ``root_pid`` (not itself)."""
    rows = _ps()
    found, frontier = set(), {root_pid}
    while frontier:
        frontier = {p for p, pp, _ in rows if pp in frontier and p not in found}
        found |= frontier
    return found


def is_alive(pid: int) -> bool:
    """Running, and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
