"""Tracing: OpenTelemetry spans, with the W3C trace context carried in NATS headers.

    provider = setup_tracing("ccc-coordinator")        # once per process, from OTEL_* env
    headers = inject({"Nats-Msg-Id": event_id})         # publish side: adds traceparent
    with span_from_msg(None, "coordinator.intake", msg, task_id=tid):   # consume side
        ...

Exporters follow the standard environment variables:

* ``OTEL_TRACES_EXPORTER`` -- comma-separated ``otlp``, ``console``, ``none``. Unset:
  ``otlp`` if ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set, otherwise none. (The OTel default would be ``otlp``; ours is none, so a laptop
  run does not try to reach a collector that is not there.)
* OTLP: ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``http/protobuf`` (default) or ``grpc``;
  endpoint, headers, timeout, certificates are read by the exporter itself. The exporter
  is the optional ``opentelemetry-exporter-otlp`` package (extra ``[otlp]``); if it is
  missing, a warning is logged once and spans are not exported.
* ``console`` writes one JSON span per line to stderr (stdout belongs to the CLI).
* ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``,
  ``OTEL_PROPAGATORS`` and ``OTEL_SDK_DISABLED`` are honoured as the SDK defines them.

With no exporter, spans are still created (and cost little), so the trace context still
propagates through this process to the next one: a collector attached to any process
later sees whole traces.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Tracer

log = structlog.get_logger("ccc.tracing")

TRACER_NAME = "ccc"
_OTLP_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
_warned: set[str] = set()


def _warn_once(key: str, event: str, **kw: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(event, **kw)


# -- set-up ----------------------------------------------------------------------------
def exporter_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment asks for (``[]``: none)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        names = ["otlp"]
    else:
        names = []
    out = []
    for name in names:
        if name == "none":
            continue
        if name not in ("otlp", "console"):
            _warn_once("exporter:" + name, "tracing.unknown_exporter", exporter=name,
                       supported="otlp, console, none")
            continue
        if name not in out:
            out.append(name)
    return out


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    module_name = _OTLP_MODULES.get(protocol)
    if module_name is None:
        _warn_once("protocol:" + protocol, "tracing.unknown_otlp_protocol", protocol=protocol,
                   supported=", ".join(_OTLP_MODULES))
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        _warn_once("otlp-missing", "tracing.otlp_exporter_missing", protocol=protocol, error=str(e),
                   hint="pip install 'claude-code-cluster[otlp]' (opentelemetry-exporter-otlp); "
                        "spans are not exported")
        return None
    return module.OTLPSpanExporter()  # endpoint, headers, TLS: from OTEL_EXPORTER_OTLP_*


def _console_exporter() -> SpanExporter:
    return ConsoleSpanExporter(
        out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + os.linesep)


def setup_tracing(
    service_name: str,
    *,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """A tracer provider configured from the ``OTEL_*`` environment. ``exporter``: an
    extra exporter fed synchronously (tests: ``InMemorySpanExporter``). ``set_global``:
    make it the process's provider (OpenTelemetry allows that once per process; a later
    call keeps the first one and returns its new provider unregistered)."""
    env = os.environ if environ is None else environ
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    for name in exporter_names(env):
        if name == "otlp":
            exp = _otlp_exporter(env)
            if exp is not None:
                provider.add_span_processor(BatchSpanProcessor(exp))
        else:
            provider.add_span_processor(SimpleSpanProcessor(_console_exporter()))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if set_global:
        if isinstance(trace.get_tracer_provider(), TracerProvider):
            _warn_once("global-set", "tracing.provider_already_set", service=service_name)
        else:
            trace.set_tracer_provider(provider)
    return provider


def get_tracer(name: str = TRACER_NAME) -> Tracer:
    """A tracer of the global provider (a proxy until :func:`setup_tracing` runs)."""
    return trace.get_tracer(name)


# -- propagation in NATS headers ---------------------------------------------------------
class _HeaderGetter(Getter):
    """NATS headers: a ``dict[str, str]`` (or ``None``); names matched case-insensitively."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            low = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == low), None)
        if value is None:
            return None
        return [value] if isinstance(value, str) else [str(v) for v in value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


def inject(headers: MutableMapping[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Add ``traceparent`` (and ``tracestate``/``baggage`` if any) for the current span,
    or the span in ``context``, to ``headers``; returns them. Nothing is added when no
    span is active."""
    carrier: Any = {} if headers is None else headers
    propagate.inject(carrier, context=context)
    return carrier


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The context carried by message headers (an empty context if none)."""
    return propagate.extract(headers or {}, getter=_GETTER)


def _attributes(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, (str, bool, int, float)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, bool, int, float)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


@contextlib.contextmanager
def start_span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    *,
    tracer: Tracer | None = None,
    context: Context | None = None,
) -> Iterator[Span]:
    """A span, current for the block; an exception escaping it is recorded and sets the
    status to error."""
    with (tracer or get_tracer()).start_as_current_span(
        name, context=context, kind=kind, attributes=_attributes(attributes or {}),
    ) as span:
        yield span


@contextlib.contextmanager
def span_from_msg(tracer: Tracer | None, name: str, msg: Any, **attrs: Any) -> Iterator[Span]:
    """A ``CONSUMER`` span for handling a NATS message, a child of the context in its
    headers. ``msg``: a ``nats.aio.msg.Msg`` or its headers (a mapping or ``None``)."""
    headers = msg.headers if hasattr(msg, "headers") else msg
    base: dict[str, Any] = {"messaging.system": "nats"}
    subject = getattr(msg, "subject", None)
    if subject:
        base["messaging.destination.name"] = subject
    reply = getattr(msg, "reply", None)
    if reply and reply.startswith("$JS.ACK."):
        with contextlib.suppress(Exception):
            md = msg.metadata
            base["messaging.nats.stream"] = md.stream
            base["messaging.nats.stream_sequence"] = md.sequence.stream
            base["messaging.nats.delivered"] = md.num_delivered
    base.update(attrs)
    with start_span(name, SpanKind.CONSUMER, base, tracer=tracer, context=extract(headers)) as span:
        yield span


__all__ = [
    "SpanKind",
    "exporter_names",
    "extract",
    "get_tracer",
    "inject",
    "setup_tracing",
    "span_from_msg",
    "start_span",
]
