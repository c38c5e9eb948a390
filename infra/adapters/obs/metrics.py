"""An agent process's own metrics: how long its pipeline phases take, how many task
attempts it finished and how many it is working on. These are measurements of this
process, not facts of the log (those are computed from the read model:
``projections.metrics.ClusterMetrics``), so they live with the other instrumentation.
Naming follows the seed design (``claude_*``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASE_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class AgentMetrics:
    """What an agent process measures about its own work (not facts of the log)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.phase_seconds = Histogram(
            "claude_agent_phase_duration_seconds", "Pipeline phase duration in this process",
            ["agent_id", "phase", "outcome"], registry=self.registry, buckets=PHASE_DURATION_BUCKETS)
        self.tasks = Counter("claude_agent_tasks_processed", "Task attempts finished by this process",
                             ["agent_id", "outcome"], registry=self.registry)
        self.running = Gauge("claude_agent_running_tasks", "Tasks this process is working on",
                             ["agent_id"], registry=self.registry)

    @contextlib.contextmanager
    def phase(self, agent_id: str, phase: str) -> Iterator[None]:
        """Time a phase; ``outcome`` is ``ok``, ``error`` or ``cancelled``."""
        start, outcome = time.perf_counter(), "error"
        try:
            yield
            outcome = "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.phase_seconds.labels(agent_id, phase, outcome).observe(time.perf_counter() - start)
