"""Pure tests: state machines, scheduling, analysis, parsers, projections. No NATS."""
