"""What model calls cost: the price table, long-prompt tiers, and unknown models priced conservatively."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from infra.adapters.coders import prices


def test_prices() -> None:
    assert prices.cost("claude-sonnet-4-5-20250929", input_tokens=1_000_000, output_tokens=1_000_000) == 18.0
    assert prices.cost("claude-opus-4-6", cache_write_tokens=1_000_000, cache_read_tokens=1_000_000) == 6.75
    assert prices.cost("claude-haiku-4-5", input_tokens=2_000_000) == 2.0
    # Haiku 5.5 bills a long prompt at its higher tier
    assert prices.cost("claude-haiku-5-5", input_tokens=100_000) == pytest.approx(0.01)
    assert prices.cost("claude-haiku-5-5", input_tokens=100_001) == pytest.approx(0.0500005)
    with capture_logs() as logs:
        price, known = prices.price_for("claude-unknown-9")
        prices.price_for("claude-unknown-9")
    assert not known and price == prices.CONSERVATIVE
    assert [entry["event"] for entry in logs] == ["prices.unknown_model"]  # warned once
    assert all(p.input <= prices.CONSERVATIVE.input and p.output <= prices.CONSERVATIVE.output
               for p in prices.PRICES.values())
