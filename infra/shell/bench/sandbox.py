"""``ccc bench sandbox``: what the sandbox costs per command, beside a plain subprocess,
in the same run.

Every command goes through the real :meth:`Workspace.run` (the runner, its process
group, its output collector), once with no sandbox and once in bubblewrap (with the
``prlimit`` wrapper inside), and optionally with a network allow-list (the filtering
proxy outside, the forwarder inside). The commands alternate, so a machine that gets
busier part way through slows every side alike. The per-task cost follows from the
commands a task runs (the repository's tests once, plus the coder's commands).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import msgspec

from infra.adapters.git.sandbox import (
    NetworkPolicy,
    NoSandbox,
    Sandbox,
    make_sandbox,
    sandbox_python,
    system_mounts,
)
from infra.adapters.git.workspace import Workspace


def commands() -> dict[str, list[str]]:
    """``true``, and a Python start-up: the same interpreter on both sides (the system's,
    which is the one a sandboxed command sees)."""
    python = sandbox_python(system_mounts()) or "python3"
    return {"true": ["true"], "python3 -c pass": [python, "-c", "pass"]}


class SideResult(msgspec.Struct, kw_only=True):
    side: str  # "plain", "bwrap", "bwrap+proxy"
    command: str
    runs: int
    median_ms: float
    mean_ms: float
    p90_ms: float


class SandboxBench(msgspec.Struct, kw_only=True):
    runs: int
    results: list[SideResult]
    ratios: dict[str, dict[str, float]]  # command -> side -> median ratio to plain
    overhead_ms: dict[str, dict[str, float]]  # command -> side -> median minus plain's


async def run_sandbox_bench(*, runs: int = 50, proxy: bool = True, executable: str = "bwrap",
                            progress: Callable[[int, int], None] | None = None) -> SandboxBench:
    sides: dict[str, tuple[Sandbox, NetworkPolicy | None]] = {
        "plain": (NoSandbox(), None), "bwrap": (make_sandbox("bwrap", executable=executable), None)}
    if proxy:
        sides["bwrap+proxy"] = (sides["bwrap"][0], NetworkPolicy(mode="hosts", hosts=("example.invalid",)))
    sides["bwrap"][0].check()  # no sandbox here: say so instead of measuring nothing
    COMMANDS = commands()
    times: dict[tuple[str, str], list[float]] = {(s, c): [] for s in sides for c in COMMANDS}
    total, done = runs * len(COMMANDS), 0
    with tempfile.TemporaryDirectory(prefix="ccc-bench-sandbox-") as root:
        workspaces = {name: Workspace.create(root, "bench", f"t-{i}", {}, sandbox=sb)
                      for i, (name, (sb, _)) in enumerate(sides.items())}
        for name, (_, network) in sides.items():
            if network is not None:
                workspaces[name].set_network(network)
        for _ in range(runs):
            for command, argv in COMMANDS.items():
                for name in sides:
                    started = time.perf_counter()
                    result = await workspaces[name].run(argv, timeout=60)
                    elapsed = (time.perf_counter() - started) * 1000
                    if result.exit_code != 0:
                        raise RuntimeError(f"{name}: {command} failed ({result.exit_code}): {result.output[-500:]}")
                    times[(name, command)].append(elapsed)
                done += 1
                if progress is not None:
                    progress(done, total)
    results = [SideResult(side=s, command=c, runs=len(t), median_ms=round(statistics.median(t), 2),
                          mean_ms=round(statistics.fmean(t), 2),
                          p90_ms=round(sorted(t)[max(0, int(len(t) * 0.9) - 1)], 2))
               for (s, c), t in times.items()]
    med = {(r.side, r.command): r.median_ms for r in results}
    ratios = {c: {s: round(med[(s, c)] / med[("plain", c)], 2) for s in sides if s != "plain"} for c in COMMANDS}
    overhead = {c: {s: round(med[(s, c)] - med[("plain", c)], 2) for s in sides if s != "plain"} for c in COMMANDS}
    return SandboxBench(runs=runs, results=results, ratios=ratios, overhead_ms=overhead)
