"""The ``memory`` fixture: a tracer of a fresh, non-global provider whose finished spans
are kept in memory (no exporter from the environment), and that in-memory exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.adapters.obs.tracing import setup_tracing


@pytest.fixture
def memory():
    exporter = InMemorySpanExporter()
    provider = setup_tracing("ccc-test", exporter=exporter, set_global=False,
                             environ={"OTEL_TRACES_EXPORTER": "none"})
    yield provider.get_tracer("test"), exporter
    provider.shutdown()
