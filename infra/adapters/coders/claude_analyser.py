"""The model the Claude analyser asks (``actors.claude_analysis``): one Anthropic Messages
API call that forces a call to one tool, so the answer is structured.

The analyser owns the prompt, the tool's schema and what the answer means; this adapter
owns the API: the client and its credentials, retries (the SDK's) and a deadline, the
fallback from forced to automatic tool choice for models that refuse it, what the call
cost, and turning every way the call can fail into :class:`ModelUnavailable`.

Given the cluster's spend ledger (:mod:`events.spend`), a call charged to scopes
(``charge_to``: the issue's task, repository, author and the day) reserves its maximum
cost first and settles what it cost after, like an agent's calls; a refused reservation
is :class:`ModelUnavailable` naming the exhausted scope (the analyser then uses its rules:
nothing is spent, nothing stops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import anthropic

from events.errors import CccError, InfrastructureError
from events.spend import Refusal, Scope, SpendLedger, to_micro
from events.task import Usage

from infra.adapters.coders.anthropic_coder import FRAMING_TOKENS, HOLD_MARGIN, api_error_reason
from infra.adapters.coders.prices import max_call_cost, prompt_bound, usage_of

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
        ledger: SpendLedger | None = None,
    ) -> None:
        self.ledger = ledger  # the cluster's spend ledger (None: calls are not charged)
        self._client = client
        self.model = model
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.timeout = timeout

    def client(self) -> anthropic.AsyncAnthropic:
        if self._client is None:
            self._client = anthropic.AsyncAnthropic(max_retries=self.max_retries)
        return self._client

    async def call_tool(self, *, system: str, prompt: str, tool: Mapping[str, Any],
                        charge_to: Sequence[Scope] = ()) -> ToolAnswer:
        try:
            client = self.client()
        except Exception as exc:
            raise ModelUnavailable(f"not configured: {exc}") from exc
        reservation = None
        if self.ledger is not None and charge_to:
            # (two requests at most: the forced call and its automatic fallback)
            bound = prompt_bound(system, prompt, dict(tool)) + FRAMING_TOKENS
            amount = 2 * to_micro(max_call_cost(self.model, bound, self.max_tokens))
            try:
                reservation = await self.ledger.reserve(charge_to, amount, ttl=2 * self.timeout + HOLD_MARGIN)
            except CccError as exc:
                raise ModelUnavailable(str(exc)) from exc
            if isinstance(reservation, Refusal):
                raise ModelUnavailable(reservation.reason)
        answer: ToolAnswer | None = None
        try:
            answer = await self._call(client, system, prompt, tool)
            return answer
        finally:  # what the answer cost (a failed call: nothing) replaces the hold
            if reservation is not None:
                await self.ledger.settle(reservation, to_micro(answer.usage.dollars) if answer else 0)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self.ledger is not None and hasattr(self.ledger, "close"):
            await self.ledger.close()

    async def _call(self, client: anthropic.AsyncAnthropic, system: str, prompt: str,
                    tool: Mapping[str, Any]) -> ToolAnswer:
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
