"""The heartbeat TTL as agents write it and the health monitor reads it (``Nats-TTL``:
integer seconds or a Go duration, at least one second)."""

from __future__ import annotations

import pytest

from actors.health import MIN_TTL, format_ttl, heartbeat_ttl, parse_ttl


@pytest.mark.parametrize(("value", "seconds"), [
    ("4s", 4.0), ("1.5s", 1.5), ("1500ms", 1.5), ("1m30s", 90.0), ("2h", 7200.0), ("30", 30.0),
    ("250us", 0.00025), (" 3s ", 3.0),
])
def test_a_ttl_header_is_read_as_seconds(value, seconds) -> None:
    assert parse_ttl(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "never", "0", "0s", "4 s", "4x", "s", "-1s", "1s2"])
def test_a_missing_endless_or_unreadable_ttl_is_none(value) -> None:
    assert parse_ttl(value) is None


@pytest.mark.parametrize("seconds", [1.0, 1.5, 4.0, 2.25, 60.0])
def test_format_and_parse_round_trip(seconds) -> None:
    assert parse_ttl(format_ttl(seconds)) == pytest.approx(seconds)


def test_a_ttl_under_the_servers_minimum_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="nats-server's minimum"):
        format_ttl(0.5)


def test_an_agents_ttl_is_two_intervals_and_never_under_a_second() -> None:
    assert heartbeat_ttl(2.0) == 4.0  # `ccc up`'s default interval: one late heartbeat is no gap
    assert heartbeat_ttl(0.3) == MIN_TTL == 1.0
    assert heartbeat_ttl(10.0) == 20.0
    with pytest.raises(ValueError, match="interval"):
        heartbeat_ttl(0)
