"""Adapters below the actors: the concrete things the actors Protocols stand for.

``nats`` (embedded server, cluster, connection, provisioning, settings, issue
publishing, artifacts), ``git`` (git operations, task workspaces, their command runner
and cleanup, test-output parsing, child processes), ``forge`` (local and GitHub),
``coders`` (Anthropic API, Claude Code CLI, scripted), ``http`` (the ASGI service,
status-API server, webhook receiver), ``obs`` (logs, tracing, metrics, the secret
masker). They import ``events`` and ``projections``, never ``actors`` or the shell.
"""
