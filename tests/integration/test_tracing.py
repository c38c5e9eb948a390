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
from opentelemetry.trace import SpanKind

from infra.adapters.obs.tracing import inject, span_from_msg
from tests.support.tracing import memory  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

# The other process: extract the context from the headers it is given, make a consumer
# span and a child of it, and print its finished spans as JSON.
CHILD = r"""
import json, sys
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from infra.adapters.obs.tracing import setup_tracing, span_from_msg, start_span

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
