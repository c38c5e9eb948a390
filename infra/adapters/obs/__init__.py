"""Observability: structlog JSON logs, OpenTelemetry tracing with the trace context in
NATS headers, an agent process's own metrics, the actors' telemetry (spans and those
metrics, as ``actors.ports.Telemetry`` asks), and the one secret masker every log line,
event and artifact goes through."""
