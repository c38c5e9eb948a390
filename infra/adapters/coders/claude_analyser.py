"""The model the Claude analyser asks (``actors.claude_analysis``): one Anthropic Messages
API call that forces a call to one tool, so the answer is structured.

The analyser owns the prompt, the tool's schema and what the answer means; this adapter
owns the API: the client and its credentials, retries (the SDK's) and a deadline, the
fallback from forced to automatic tool choice for models that refuse it, what the call
cost, and turning every way the call can fail into :class:`ModelUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, NamedTuple

import anthropic

from events.errors import InfrastructureError
from events.task import Usage

from infra.adapters.coders.anthropic_coder import api_error_reason
from infra.adapters.coders.prices import usage_of

# Forced tool use (tool_choice "tool") is model-gated: Haiku 4.5 supports it, is fast and cheap.
DEFAULT_ANALYSIS_MODEL = "claude-haiku-4-5"


class ModelUnavailable(InfrastructureError):
    """The model could not be asked (not configured, an API error, no answer in time)."""


class ToolAnswer(NamedTuple):
    arguments: Any  # what the model called the tool with; None if it did not call it
    stop_reason: str
    usage: Usage


class ClaudeToolModel:
    """``call_tool`` through the Messages API. ``client`` defaults to one built from the
    environment (``ANTHROPIC_API_KEY`` …) on first use, so a cluster without credentials
    starts, and its analyser falls back to the rules saying why."""

    def __init__(
        self,
        client: anthropic.AsyncAnthropic | None = None,
        model: str = DEFAULT_ANALYSIS_MODEL,
        *,
        max_tokens: int = 1_024,
        max_retries: int = 2,
        timeout: float = 60.0,
    ) -> None:
        self._client = client
        self.model = model
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.timeout = timeout

    def client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            self._client = anthropic.AsyncAnthropic(max_retries=self.max_retries)
        return self._client

    async def call_tool(self, *, system: str, prompt: str, tool: Mapping[str, Any]) -> ToolAnswer:
        try:
            client = self.client()
        except Exception as exc:
            raise ModelUnavailable(f"not configured: {exc}") from exc
        name = tool["name"]
        try:
            try:
                response = await self._create(client, system, prompt, tool, {"type": "tool", "name": name})
            except anthropic.BadRequestError as exc:
                if "tool_choice" not in str(exc):
                    raise
                # some models reject forced tool use: ask for the tool call instead
                response = await self._create(client, system, prompt, tool, {"type": "auto"})
        except TimeoutError as exc:
            raise ModelUnavailable(f"no answer within {self.timeout:.0f}s") from exc
        except (anthropic.AnthropicError, TypeError, ValueError) as exc:  # TypeError: no credentials
            raise ModelUnavailable(api_error_reason(exc)) from exc
        calls = [b for b in response.content if b.type == "tool_use" and b.name == name]
        return ToolAnswer(arguments=calls[0].input if calls else None, stop_reason=response.stop_reason,
                          usage=usage_of(self.model, response.usage))

    async def _create(self, client: anthropic.AsyncAnthropic, system: str, prompt: str,
                      tool: Mapping[str, Any], choice: dict[str, Any]) -> Any:
        return await asyncio.wait_for(client.messages.create(
            model=self.model, max_tokens=self.max_tokens, system=system, tools=[dict(tool)],
            tool_choice=choice, messages=[{"role": "user", "content": prompt}],
        ), timeout=self.timeout)
