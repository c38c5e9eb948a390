"""Child processes must not outlive us.

``start_new_session`` gives a child its own process group (so a timeout can kill
the whole group), but it also detaches it from our fate: if this process is
SIGKILLed, the child would run on. On Linux, ``PR_SET_PDEATHSIG`` asks the kernel
to send the child SIGTERM when its parent dies; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A ``preexec_fn``: runs in the child between fork and exec."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass  # best effort: the process still works, it just is not tied to us
