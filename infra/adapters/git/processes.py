"""Child processes must not outlive us.

``start_new_session`` gives a child its own process group (so a timeout can kill
the whole group), but it also detaches it from our fate: if this process is
SIGKILLed, the child would run on. On Linux, ``PR_SET_PDEATHSIG`` asks the kernel
to send the child SIGTERM when its parent dies; elsewhere this is a no-op.

Everything is resolved here, at import, in the parent: between fork and exec the child
of a threaded process may only do async-signal-safe work, so ``die_with_parent`` is a
single prepared foreign call (no library lookup, no allocation in Python code paths
that take locks).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc is in the process already
        _prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        _prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        _prctl = None

_SIGTERM = int(signal.SIGTERM)


def die_with_parent() -> None:
    """A ``preexec_fn``: runs in the child between fork and exec."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)


def kill_group(pgid: int) -> None:
    """SIGKILL a whole process group (a command started with ``start_new_session``
    and everything it forked); a group that is already gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM and wait; SIGKILL if it does not go within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL and reap: no flush, no goodbye (fault tests)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
