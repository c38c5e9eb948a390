"""Telemetry for the actors: OpenTelemetry spans (a consumer span per message, in the
trace the message's headers carry; a span per task attempt with one per pipeline
phase) and, in an agent process, its Prometheus metrics (:class:`AgentMetrics`).
What the actors ask for is declared in ``actors.ports`` (``Telemetry``).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Tracer

from infra.adapters.obs.metrics import AgentMetrics
from infra.adapters.obs.tracing import get_tracer, span_from_msg


class TracedAttempt:
    """One task attempt: its span is the current one from construction to
    :meth:`ended`, so the reports appended meanwhile carry its trace context."""

    def __init__(self, tracer: Tracer, metrics: AgentMetrics | None, agent_id: str, task_id: str,
                 attempt: int) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self.agent_id = agent_id
        self.attributes = {"ccc.task_id": task_id, "ccc.attempt": attempt}
        self._phase_start, self._phase_start_ns = time.perf_counter(), time.time_ns()
        if metrics is not None:
            metrics.running.labels(agent_id).inc()
        self.span: Span = tracer.start_span("agent.task",
                                            attributes={**self.attributes, "ccc.agent_id": agent_id})
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def phase_ended(self, phase: str, *, failed: bool = False) -> None:
        now, now_ns = time.perf_counter(), time.time_ns()
        if self.metrics is not None:
            self.metrics.phase_seconds.labels(self.agent_id, phase, "error" if failed else "ok") \
                .observe(now - self._phase_start)
        self.tracer.start_span(f"pipeline.{phase}", start_time=self._phase_start_ns,
                               attributes=self.attributes).end(end_time=now_ns)
        self._phase_start, self._phase_start_ns = now, now_ns

    def ended(self, outcome: str) -> None:
        otel_context.detach(self._token)
        self.span.set_attribute("ccc.outcome", outcome)
        self.span.end()
        if self.metrics is not None:
            self.metrics.running.labels(self.agent_id).dec()
            self.metrics.tasks.labels(self.agent_id, outcome).inc()


class OtelTelemetry:
    """Spans through the process's tracer provider (or ``tracer``); ``metrics``: the
    agent's own, if this process serves them."""

    def __init__(self, metrics: AgentMetrics | None = None, *, tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.tracer = tracer

    def handling(self, name: str, msg: Any, **attributes: Any) -> AbstractContextManager[Span]:
        return span_from_msg(self.tracer, name, msg, **attributes)

    def attempt_started(self, agent_id: str, task_id: str, attempt: int) -> TracedAttempt:
        return TracedAttempt(self.tracer or get_tracer(), self.metrics, agent_id, task_id, attempt)


__all__ = ["OtelTelemetry", "TracedAttempt"]
