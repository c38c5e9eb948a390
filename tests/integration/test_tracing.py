"""Traces cross processes: the W3C trace context travels in (NATS) headers, and spans
created in another process are children of the span that published. Spans are
collected in memory in each process; no collector is involved."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from infra.adapters.obs import tracing
from infra.adapters.obs.tracing import TraceIndex, extract, inject, setup_tracing, span_from_msg, start_span

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# The other process: extract the context from the headers it is given, make a consumer
# span and a child of it, and print its finished spans as JSON.
CHILD = r"""
import json, sys
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from infra.tracing import setup_tracing, span_from_msg, start_span

headers = json.loads(sys.argv[1])
memory = InMemorySpanExporter()
provider = setup_tracing("ccc-agent-test", exporter=memory)
tracer = provider.get_tracer("test-child")
with span_from_msg(tracer, "agent.handle_assignment", headers, task_id="acme_app-1"):
    with start_span("pipeline.tests", attributes={"phase": "testing"}):
        pass
provider.shutdown()
print(json.dumps([
    {"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
     "span_id": format(s.context.span_id, "016x"),
     "parent_span_id": format(s.parent.span_id, "016x") if s.parent else None,
     "parent_remote": bool(s.parent and s.parent.is_remote),
     "kind": s.kind.name, "service": s.resource.attributes.get("service.name"),
     "attributes": dict(s.attributes)}
    for s in memory.get_finished_spans()
]))
"""


def _ids(span) -> tuple[str, str]:
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


@pytest.fixture
def memory():
    exporter = InMemorySpanExporter()
    provider = setup_tracing("ccc-test", exporter=exporter, set_global=False,
                             environ={"OTEL_TRACES_EXPORTER": "none"})
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_trace_links_across_two_processes(memory):
    tracer, exporter = memory
    with tracer.start_as_current_span("coordinator.schedule", kind=SpanKind.PRODUCER) as parent:
        headers = inject({"Nats-Msg-Id": "acme_app-1:4"})
        assert headers["Nats-Msg-Id"] == "acme_app-1:4"  # existing headers are kept
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(headers)], check=False,
                             capture_output=True, text=True, timeout=30, cwd=ROOT, env=_child_env())
    assert out.returncode == 0, out.stderr
    child_spans = {s["name"]: s for s in json.loads(out.stdout)}
    [finished] = exporter.get_finished_spans()
    trace_id, parent_id = _ids(finished)
    assert finished.context == parent.get_span_context()

    consumer = child_spans["agent.handle_assignment"]
    phase = child_spans["pipeline.tests"]
    assert consumer["trace_id"] == phase["trace_id"] == trace_id  # one trace, two processes
    assert consumer["parent_span_id"] == parent_id and consumer["parent_remote"]
    assert consumer["kind"] == "CONSUMER" and consumer["attributes"]["task_id"] == "acme_app-1"
    assert phase["parent_span_id"] == consumer["span_id"] and not phase["parent_remote"]
    assert consumer["service"] == "ccc-agent-test"
    version, tp_trace, tp_span, flags = headers["traceparent"].split("-")
    assert (version, tp_trace, tp_span) == ("00", trace_id, parent_id) and int(flags, 16) & 1  # sampled


async def test_traceparent_travels_in_a_real_nats_message(nc, ns, memory):
    tracer, exporter = memory
    subject = f"{ns.prefix}.trace.test"
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_msg(msg):
        with span_from_msg(tracer, "consume", msg, agent_id="agent-a"):
            pass
        if not got.done():
            got.set_result(msg)

    sub = await nc.subscribe(subject, cb=on_msg)
    try:
        with tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER):
            await nc.publish(subject, b"{}", headers=inject({"Nats-Msg-Id": "x-1"}))
        msg = await asyncio.wait_for(got, 10)
    finally:
        await sub.unsubscribe()
    assert "traceparent" in msg.headers and msg.headers["Nats-Msg-Id"] == "x-1"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    pub, con = spans["publish"], spans["consume"]
    assert con.context.trace_id == pub.context.trace_id
    assert con.parent.span_id == pub.context.span_id and con.parent.is_remote
    assert con.kind == SpanKind.CONSUMER
    assert con.attributes["messaging.destination.name"] == subject
    assert con.attributes["agent_id"] == "agent-a"


async def test_jetstream_message_keeps_the_context_and_names_its_sequence(store, ns, memory):
    """What actors consume: a stored message, redelivered later, still carries it."""
    tracer, exporter = memory
    js = store.js
    subject = ns.subject("task.acme_app-9.created")
    with tracer.start_as_current_span("intake") as intake:
        await js.publish(subject, b"{}", headers=inject({"Nats-Msg-Id": "acme_app-9:1"}))
    psub = await js.pull_subscribe(subject, durable=None, stream=ns.events_stream)
    [msg] = await psub.fetch(1, timeout=5)
    with span_from_msg(tracer, "coordinator.analyse", msg):
        pass
    await msg.ack()
    con = next(s for s in exporter.get_finished_spans() if s.name == "coordinator.analyse")
    assert con.context.trace_id == intake.get_span_context().trace_id
    assert con.attributes["messaging.nats.stream_sequence"] == msg.metadata.sequence.stream


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


def test_trace_index_puts_later_work_in_the_task_trace(memory):
    tracer, exporter = memory
    index = TraceIndex(maxsize=2)
    with tracer.start_as_current_span("intake") as intake:
        index.remember("t1")
    index.remember("t0", {"nothing": "here"})  # no context: not remembered
    with start_span("schedule", tracer=tracer, context=index.context("t1")):
        pass
    sched = next(s for s in exporter.get_finished_spans() if s.name == "schedule")
    assert sched.parent.span_id == intake.get_span_context().span_id
    index.remember("t2", {"traceparent": inject({}, index.context("t1"))["traceparent"]})
    index.remember("t3", {"Traceparent": inject({}, index.context("t1"))["traceparent"]})
    assert len(index) == 2 and index.context("t1") is None and index.context("t3") is not None


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
