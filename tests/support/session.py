"""The session nats-server's credentials, for CLI tests that name it by URL.

The session server (tests/conftest.py) is secure, so a ``ccc --nats-url <url>`` run
against it needs a credentials kit too: ``creds_of(url)`` is the admin kit's directory
(tests provision their own namespaces)."""

from __future__ import annotations

KITS: dict[str, str] = {}


def creds_of(url: str) -> str:
    return KITS[url]


def nats_args(url: str) -> list[str]:
    """``--nats-url URL --creds KIT``: the global options of a ``ccc`` run against ``url``."""
    return ["--nats-url", url, "--creds", creds_of(url)]
