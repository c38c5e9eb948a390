"""What a model call costs, in dollars, from the usage the Messages API reports.

Prices are USD per million tokens (MTok): base input, output, 5-minute cache write,
cache read (hits and refreshes), from Anthropic's published price list
(platform.claude.com/docs/en/about-claude/pricing). Keep this table the one place
that changes when prices do; budgets (``Budget.max_dollars``) are enforced from it.

An unknown model is priced at :data:`CONSERVATIVE` (the most expensive row in the
table) and logged once: a budget computed from a guess should run out early, never late.
"""

from __future__ import annotations

import re

import msgspec
import structlog

from events.task import Usage

log = structlog.get_logger("ccc.coders.prices")


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """$/MTok. ``long_prompt`` applies to every token of a request whose prompt
    (input + cache reads + cache writes) exceeds ``long_threshold`` tokens."""

    input: float
    output: float
    cache_write: float
    cache_read: float
    long_prompt: Price | None = None
    long_threshold: int = 0


def _p(inp: float, out: float, write: float, read: float) -> Price:
    return Price(input=inp, output=out, cache_write=write, cache_read=read)


_OPUS_4 = _p(15.0, 75.0, 18.75, 1.50)  # Opus 4 / 4.1 (and Opus 3)
_OPUS_45 = _p(5.0, 25.0, 6.25, 0.50)  # Opus 4.5 .. 5
_SONNET_4 = _p(3.0, 15.0, 3.75, 0.30)  # Sonnet 3.7 .. 4.6
_FABLE_5 = _p(10.0, 50.0, 12.50, 1.0)

PRICES: dict[str, Price] = {
    "claude-fable-5-1": _p(10.0, 50.0, 12.50, 0.25),
    "claude-mythos-5-1": _p(10.0, 50.0, 12.50, 0.25),
    "claude-fable-5": _FABLE_5,
    "claude-mythos-5": _FABLE_5,
    "claude-mythos-preview": _FABLE_5,
    "claude-opus-5-5": _p(4.0, 20.0, 5.0, 0.20),
    "claude-opus-5": _OPUS_45,
    "claude-opus-4-8": _OPUS_45,
    "claude-opus-4-7": _OPUS_45,
    "claude-opus-4-6": _OPUS_45,
    "claude-opus-4-5": _OPUS_45,
    "claude-opus-4-1": _OPUS_4,
    "claude-opus-4": _OPUS_4,
    "claude-opus-4-0": _OPUS_4,
    "claude-3-opus": _OPUS_4,
    "claude-sonnet-5-5": _p(2.0, 10.0, 2.50, 0.10),  # cache reads cut to $0.10 on 2026-10-07
    "claude-sonnet-5": _p(2.0, 10.0, 2.50, 0.20),
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4": _SONNET_4,
    "claude-sonnet-4-0": _SONNET_4,
    "claude-3-7-sonnet": _SONNET_4,
    "claude-haiku-5-5": Price(input=0.10, output=0.50, cache_write=0.125, cache_read=0.01,
                              long_prompt=_p(0.50, 2.50, 0.625, 0.05), long_threshold=100_000),
    "claude-haiku-4-5": _p(1.0, 5.0, 1.25, 0.10),
    "claude-3-5-haiku": _p(0.80, 4.0, 1.0, 0.08),
    "claude-3-haiku": _p(0.25, 1.25, 0.30, 0.03),
}
CONSERVATIVE = _OPUS_4

_DATED = re.compile(r"-(?:\d{8}|latest)$")  # claude-sonnet-4-5-20250929, claude-3-5-haiku-latest
_warned: set[str] = set()


def normalise(model: str) -> str:
    """The table key of a model id: no provider prefix (``anthropic.``, ``anthropic/``),
    no ``[1m]`` context suffix, no Bedrock ``-v1:0`` or Vertex ``@date`` version, no
    date snapshot suffix."""
    name = model.strip().lower()
    for prefix in ("anthropic/", "anthropic."):
        name = name.removeprefix(prefix)
    name = name.split("[", 1)[0].split("@", 1)[0]
    name = re.sub(r"-v\d+(?::\d+)?$", "", name)
    return _DATED.sub("", name)


def price_for(model: str) -> tuple[Price, bool]:
    """``(price, known)``; an unknown model gets :data:`CONSERVATIVE` and a warning
    (once per model per process)."""
    price = PRICES.get(normalise(model))
    if price is not None:
        return price, True
    if model not in _warned:
        _warned.add(model)
        log.warning("prices.unknown_model", model=model,
                    assumed=f"${CONSERVATIVE.input}/${CONSERVATIVE.output} per MTok")
    return CONSERVATIVE, False


def cost(model: str, *, input_tokens: int = 0, output_tokens: int = 0,
         cache_write_tokens: int = 0, cache_read_tokens: int = 0) -> float:
    """Dollars for one request's usage (the long-prompt tier is per request, so
    call this per response, not on accumulated totals)."""
    price, _ = price_for(model)
    prompt = input_tokens + cache_write_tokens + cache_read_tokens
    if price.long_prompt is not None and prompt > price.long_threshold:
        price = price.long_prompt
    return (input_tokens * price.input + output_tokens * price.output
            + cache_write_tokens * price.cache_write + cache_read_tokens * price.cache_read) / 1_000_000


def usage_of(model: str, api_usage: object) -> Usage:
    """An ``events.task.Usage`` (with dollars) from a Messages API ``usage`` object
    (``input_tokens`` excludes cached tokens; cache writes and reads are reported
    separately and may be missing or null)."""
    inp = int(getattr(api_usage, "input_tokens", 0) or 0)
    out = int(getattr(api_usage, "output_tokens", 0) or 0)
    write = int(getattr(api_usage, "cache_creation_input_tokens", 0) or 0)
    read = int(getattr(api_usage, "cache_read_input_tokens", 0) or 0)
    dollars = cost(model, input_tokens=inp, output_tokens=out, cache_write_tokens=write, cache_read_tokens=read)
    return Usage(model=model, input_tokens=inp, output_tokens=out, cache_write_tokens=write,
                 cache_read_tokens=read, dollars=dollars)


def add_usage(total: Usage, more: Usage) -> Usage:
    return Usage(
        model=total.model or more.model,
        input_tokens=total.input_tokens + more.input_tokens,
        output_tokens=total.output_tokens + more.output_tokens,
        cache_read_tokens=total.cache_read_tokens + more.cache_read_tokens,
        cache_write_tokens=total.cache_write_tokens + more.cache_write_tokens,
        dollars=total.dollars + more.dollars,
    )


def max_call_cost(model: str, prompt_tokens: int, max_tokens: int) -> float:
    """The most one request can cost: every prompt token at the dearest input rate (a
    cache write), every allowed output token, the long-prompt tier if the prompt may
    reach it. What the spend ledger reserves before the call (:mod:`events.spend`);
    ``prompt_tokens`` must be an upper bound (see :func:`prompt_bound`)."""
    price, _ = price_for(model)
    if price.long_prompt is not None and prompt_tokens > price.long_threshold:
        price = price.long_prompt
    dearest = max(price.input, price.cache_write, price.cache_read)
    return (max(prompt_tokens, 0) * dearest + max(max_tokens, 0) * price.output) / 1_000_000


def prompt_bound(*parts: object) -> int:
    """An upper bound of the tokens of a request made of ``parts`` (JSON-able): its UTF-8
    bytes. A token covers at least one byte of text in Claude's tokenizer, so bytes never
    undercount; the bound is loose (about 3-4x for English and code), which only makes a
    reservation larger than the call, never smaller."""
    import json

    return sum(len(json.dumps(p, ensure_ascii=False, default=str).encode()) for p in parts)
