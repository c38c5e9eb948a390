"""The process's secret hygiene, as the infrastructure uses it: the one masker
(:mod:`events.secrets`, where the event store can reach it) and what only printing needs.

    mask_secrets(transcript, [api_key])   # a text, with the environment as it is now
    mask({"cfg": {...}})                  # a value, as the log processor masks it
    add_secrets(installation_token)       # a secret obtained at run time
    redact_url(nats_url)                  # a URL shown on purpose, without its credentials

What is masked, and which secrets refuse a push, is documented in :mod:`events.secrets`:
one set of rules, so a secret masked in a log line is masked in an event, an artifact
and a prompt too.
"""

from __future__ import annotations

import re
from typing import Any

from events.secrets import (
    MASK,
    MIN_ENV_SECRET_LEN,
    SECRET_ENV_NAMES,
    Masker,
    add_secrets,
    mask_secrets,
    process_masker,
    reset_process_masker,
    secret_env_name,
    secret_key,
)


# the user-info part of one URL: greedy up to the *last* "@" before the host, as URL
# parsers read it, so a password with an "@" in it is masked whole; the scheme is optional
# (nats-py takes "user:pass@host" as a server too)
_URL_USERINFO = re.compile(r"(?i)^(\s*(?:[a-z][a-z0-9+.-]*://)?)([^/\s]*)@")


def redact_url(url: str) -> str:
    """A URL, or several comma-separated (``NATS_URL``), fit to print: its credentials
    (``user:password@`` or a bare token, ``nats://s3cr3t@host``) become ``***@``, as the
    masker writes them in free text; scheme, host and port are kept.

    For the lines that show a URL on purpose (startup banners, connect errors). Exact on
    what a URL is (each part of the list on its own; a part without a scheme, which
    nats-py accepts, too), where the masker's patterns must guess within free text."""
    return ",".join(_URL_USERINFO.sub(rf"\1{MASK}@", part) for part in url.split(","))


def mask(value: Any) -> Any:
    """Mask a string (or a nested structure) as the log processor would."""
    return process_masker().value(value)


__all__ = ["MASK", "MIN_ENV_SECRET_LEN", "SECRET_ENV_NAMES", "Masker", "add_secrets", "mask", "mask_secrets",
           "process_masker", "redact_url", "reset_process_masker", "secret_env_name", "secret_key"]
