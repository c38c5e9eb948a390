"""Tracing in one process, spans kept in memory: propagation headers, new roots, span
errors and attributes, and the exporters chosen from the environment."""

from __future__ import annotations

import json
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.adapters.obs import tracing
from infra.adapters.obs.tracing import extract, inject, setup_tracing, span_from_msg, start_span
from tests.support.tracing import memory  # noqa: F401 - fixture


def test_no_headers_means_a_new_root_span(memory):
    tracer, exporter = memory
    with span_from_msg(tracer, "orphan", None):
        pass
    with span_from_msg(tracer, "orphan2", {"Nats-Msg-Id": "x"}):
        pass
    assert all(s.parent is None for s in exporter.get_finished_spans())
    assert inject({}) == {}  # no active span: nothing to propagate
    assert not trace.get_current_span(extract({})).get_span_context().is_valid


def test_header_names_are_matched_case_insensitively(memory):
    tracer, _ = memory
    with tracer.start_as_current_span("p") as p:
        tp = inject({})["traceparent"]
    ctx = trace.get_current_span(extract({"TraceParent": tp})).get_span_context()
    assert ctx.trace_id == p.get_span_context().trace_id and ctx.is_remote


def test_start_span_records_errors_and_attributes(memory):
    tracer, exporter = memory
    attributes = {"files": ("a.py", "b.py"), "n": 2, "none": None, "obj": object}
    with pytest.raises(ValueError), start_span("phase", attributes=attributes, tracer=tracer):
        raise ValueError("boom")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["files"] == ("a.py", "b.py") and span.attributes["n"] == 2
    assert "none" not in span.attributes and isinstance(span.attributes["obj"], str)
    assert any(e.name == "exception" for e in span.events)


def test_exporters_from_the_environment(monkeypatch):
    assert tracing.exporter_names({}) == []
    assert tracing.exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "none",
                                   "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) == []
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "console,zipkin,console"}) == ["console"]
    assert tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []


def test_console_and_missing_otlp_exporters_still_give_a_working_provider(capsys, monkeypatch):
    provider = setup_tracing("svc", set_global=False, environ={"OTEL_TRACES_EXPORTER": "console"})
    with provider.get_tracer("t").start_as_current_span("visible"):
        pass
    provider.shutdown()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["name"] == "visible"

    # otlp requested, exporter package absent (or present): never raises, spans still made
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    memory = InMemorySpanExporter()
    provider = setup_tracing("svc", set_global=False, exporter=memory,
                             environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    with provider.get_tracer("t").start_as_current_span("still"):
        pass
    provider.shutdown()
    assert [s.name for s in memory.get_finished_spans()] == ["still"]
