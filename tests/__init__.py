"""The test suite: ``unit/`` (pure, no NATS), ``integration/`` (real nats-server, git,
local HTTP servers speaking the Anthropic/GitHub wire protocols), ``e2e/`` (whole
processes), ``contracts/`` (one suite every Coder / forge passes), ``fakes/`` and
``support/`` (wire-protocol stand-ins and helpers), ``fixtures/`` (data)."""
