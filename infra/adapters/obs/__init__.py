"""Observability: structlog JSON logs, OpenTelemetry tracing with the trace context in
NATS headers, and the one secret masker every log line, event and artifact goes through."""
