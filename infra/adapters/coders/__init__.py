"""Coder backends: the Anthropic Messages API tool loop, the Claude Code CLI and the
scripted replay. Each satisfies the Protocol the agent declares (``actors.ports.Coder``)
and speaks the value types of :mod:`events.work` (``CodeRequest`` in, ``CodeOutcome`` out)."""

from infra.adapters.coders.scripted import ScriptedCoder

__all__ = ["ScriptedCoder"]
