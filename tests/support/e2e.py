"""Helpers for the end-to-end tests that drive ``ccc`` as real processes.

Every process is started through :class:`CccProcess` and registered with a
:class:`Processes` owner that stops it (SIGTERM, then SIGKILL) whatever the test did.
Waiting is polling (``ccc tasks --json``, ``ps``), never a fixed sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from infra.adapters.forge.local import LocalForge

REPO_ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "ccc"
CCC = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "infra.shell.cli.main"]

T = TypeVar("T")

# -- the sample repository and its recorded sessions ------------------------------------
REPO = "acme/calc"
CALC = "def add(a, b):\n    return a - b\n"
TEST = ("import unittest\n\nfrom calc import add\n\n\n"
        "class AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
FILES = {"calc.py": CALC, "tests/__init__.py": "", "tests/test_calc.py": TEST,
         ".ccc/test-command": "python3 -m unittest discover -s tests -v\n"}
FIX = [{"edit": {"path": "calc.py", "old": "return a - b", "new": "return a + b"}}]


def sleep_step(seconds: int) -> list[dict]:
    return [{"run": {"command": f"sleep {seconds}", "timeout": seconds + 30}}]


def make_repo(data_dir: Path) -> LocalForge:
    forge = LocalForge(data_dir / "forge")
    forge.create_repo(REPO, FILES)
    return forge


def write_script(script_dir: Path, number: int, *attempts: list[dict]) -> None:
    """``acme_calc-<number>.json``: attempt k replays ``attempts[k-1]`` (the last one after)."""
    script_dir.mkdir(parents=True, exist_ok=True)
    body = {"attempts": [{"steps": steps, "summary": f"attempt {i + 1}"} for i, steps in enumerate(attempts)]}
    (script_dir / f"acme_calc-{number}.json").write_text(json.dumps(body))


# -- processes ------------------------------------------------------------------------------
def clean_env() -> dict[str, str]:
    """The environment without anything that would point ``ccc`` elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CCC_", "NATS_")) and k != "PYTEST_CURRENT_TEST"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ccc(data_dir: Path | None, *args: str, timeout: float = 30.0, check: bool = False,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one ``ccc [--data-dir D] ...`` command to completion."""
    argv = [*CCC, *(["--data-dir", str(data_dir)] if data_dir else []), *args]
    result = subprocess.run(argv, check=False, cwd=REPO_ROOT, env={**clean_env(), **(env or {})}, text=True,
                            capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


class CccProcess:
    """A long-running ``ccc`` command; stdout and stderr go to files (no pipe to fill)."""

    def __init__(self, log_dir: Path, name: str, data_dir: Path, *args: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([*CCC, "--data-dir", str(data_dir), *args], cwd=REPO_ROOT,
                                     env=clean_env(), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err)
        self.pid = self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for_output(self, text: str, timeout: float = 20.0) -> str:
        def seen() -> str | None:
            if self.proc.poll() is not None and text not in self.stdout:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n"
                                     f"{self.stdout}\n{self.stderr}")
            return self.stdout if text in self.stdout else None
        return wait_for(seen, timeout, f"{self.name} to print {text!r}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        self._err.close()
        return self.proc.returncode


class Processes:
    """Owns every process a test starts; :meth:`close` stops them all and then kills
    anything still running under the test's directory (a nats-server, a workspace
    command) by pid, so a failing test leaves nothing behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[CccProcess] = []

    def start(self, name: str, data_dir: Path, *args: str) -> CccProcess:
        p = CccProcess(self.root / "logs", name, data_dir, *args)
        self.started.append(p)
        return p

    def up(self, data_dir: Path, *args: str, name: str = "up") -> tuple[CccProcess, str]:
        """``ccc up --api-port 0 ...``; returns the process and the status API's base URL."""
        p = self.start(name, data_dir, "--log-level", "info", "up", "--api-port", "0", *args)
        out = p.wait_for_output("Ctrl-C to stop.")
        api = next((line.split()[2].removesuffix("/api/v1/tasks") for line in out.splitlines()
                    if line.strip().startswith("status API")), "")
        return p, api

    def close(self) -> None:
        for p in reversed(self.started):
            p.stop(timeout=20.0)
        for pid, _, _ in processes_under(self.root):
            kill_quietly(pid)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.proc.returncode}) ---\n{p.stdout}\n{p.stderr}"
                         for p in self.started)


# -- looking at the system -------------------------------------------------------------------
def wait_for(check: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tasks(data_dir: Path) -> dict[str, dict]:
    """The task board as ``ccc tasks --json`` prints it."""
    result = ccc(data_dir, "tasks", "--json", check=True)
    return {row["task"]["task_id"]: row["task"] for row in map(json.loads, result.stdout.splitlines())}


def task_via_api(api: str, task_id: str) -> dict | None:
    status, body = http_json(f"{api}/api/v1/tasks/{task_id}")
    return body if status == 200 else None


def wait_task(data_dir: Path, task_id: str, predicate: Callable[[dict], bool], timeout: float = 30.0,
              what: str = "", api: str = "") -> dict:
    """Poll the status API at ``api`` if given (cheap), else ``ccc tasks --json``."""
    last: dict[str, Any] = {}

    def check() -> dict | None:
        task = task_via_api(api, task_id) if api else tasks(data_dir).get(task_id)
        last["task"] = task
        return task if task is not None and predicate(task) else None
    try:
        return wait_for(check, timeout, f"{task_id} {what}", interval=0.1 if api else 0.2)
    except AssertionError as e:
        t = last.get("task") or {}
        raise AssertionError(f"{e}; last seen: status={t.get('status')} attempt={t.get('attempt')} "
                             f"agent={t.get('agent_id')} reason={t.get('status_reason')!r} "
                             f"failure={t.get('failure_reason')!r}") from None


def status_is(*states: str) -> Callable[[dict], bool]:
    return lambda t: t["status"] in states


def publish(data_dir: Path, title: str, *, number: int, label: str = "backend") -> str:
    result = ccc(data_dir, "issue", "publish", "--repo", REPO, "--title", title, "--label", label,
                 "--number", str(number), "--json", check=True)
    return json.loads(result.stdout)["task_id"]


def http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def ps() -> list[tuple[int, int, str]]:
    # -ww: full command lines (pytest sets COLUMNS, and ps would cut them there)
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        pid, ppid, *args = line.split(None, 2)
        rows.append((int(pid), int(ppid), args[0] if args else ""))
    return rows


def cwd_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def processes_under(root: Path) -> list[tuple[int, int, str]]:
    """Processes whose command line or working directory is inside ``root``."""
    root_s = str(root.resolve())
    return [(pid, ppid, args) for pid, ppid, args in ps()
            if pid != os.getpid() and (root_s in args or cwd_of(pid).startswith(root_s))]


def descendants(pid: int) -> set[int]:
    rows = ps()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp, _ in rows if pp in frontier and p not in found}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is as good as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def sleeps_under(data_dir: Path, seconds: int) -> list[int]:
    """Pids of the scripted ``sleep N`` workspace commands running under ``data_dir``."""
    return [pid for pid, _, args in processes_under(data_dir) if f"sleep {seconds}" in args]
