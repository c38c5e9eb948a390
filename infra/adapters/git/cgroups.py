"""A process limit for sandboxed commands when the agent runs as root.

``RLIMIT_NPROC`` (set by ``prlimit`` inside the sandbox) is what bounds a fork bomb, but
the kernel exempts the global root user from it: a command of an agent running as root
(a CI container, say) maps to uid 0 outside its user namespace, and the limit is never
checked. Root can use the ``pids`` cgroup controller instead: one cgroup per command
with ``pids.max``, which the child enters between fork and exec (so bwrap and everything
under it are counted), removed when the command is over.

Only when the agent is root and a ``pids`` hierarchy it can write to exists (cgroup v1's
``pids`` mount, or v2 where the agent's cgroup delegates ``pids`` to children); otherwise
:meth:`PidsLimiter.find` returns None and the sandbox says that the limit is not enforced.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from infra.adapters.git.processes import die_with_parent

__all__ = ["PidsGroup", "PidsLimiter"]


class PidsGroup:
    """One command's cgroup: :meth:`preexec` is the child's ``preexec_fn``."""

    def __init__(self, path: Path, limiter: PidsLimiter) -> None:
        self.path = path
        self._limiter = limiter
        # opened here, written in the child: between fork and exec only a write(2) happens
        self._fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def preexec(self) -> Callable[[], None]:
        fd = self._fd

        def enter() -> None:
            die_with_parent()
            os.write(fd, b"0")  # "0": the writing process itself, in v1 and v2 alike

        return enter

    def close(self) -> None:
        """Remove the cgroup, or leave it to the limiter's next sweep while the kernel is
        still reaping its processes (the PID namespace has ended them): waiting here
        would add that moment to every command."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if not _remove(self.path):
            self._limiter.later(self.path)


def _remove(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False  # EBUSY: processes still in it
    return True


class PidsLimiter:
    def __init__(self, base: Path) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._stale: list[Path] = list(base.glob("ccc-*"))  # left by an agent that was killed

    def later(self, path: Path) -> None:
        with self._lock:
            self._stale.append(path)

    def sweep(self) -> None:
        with self._lock:
            self._stale = [p for p in self._stale if not _remove(p)]

    @classmethod
    def find(cls) -> PidsLimiter | None:
        if os.geteuid() != 0:
            return None
        try:
            own = Path("/proc/self/cgroup").read_text().splitlines()
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return None
        paths: dict[str, str] = {}  # "pids" (v1) or "" (v2) -> our path in that hierarchy
        for line in own:
            _, controllers, path = line.split(":", 2)
            if "pids" in controllers.split(","):
                paths["pids"] = path
            elif controllers == "":
                paths[""] = path
        for line in mounts:
            fields = line.split()
            sep = fields.index("-")
            root, point, fstype, opts = fields[3], fields[4], fields[sep + 1], fields[sep + 3]
            if fstype == "cgroup" and "pids" in opts.split(",") and "pids" in paths:
                base = Path(point) / os.path.relpath(paths["pids"], root)
            elif fstype == "cgroup2" and "" in paths:
                base = Path(point) / os.path.relpath(paths[""], root)
                try:
                    if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                        continue
                except OSError:
                    continue
            else:
                continue
            if os.access(base, os.W_OK):
                return cls(base.resolve())
        return None

    def group(self, max_pids: int) -> PidsGroup:
        self.sweep()
        path = self.base / f"ccc-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        try:
            (path / "pids.max").write_text(str(max_pids))
            return PidsGroup(path, self)
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise
