"""The one secret masker: every log line, event text, transcript, artifact and error
message that may carry a secret goes through :class:`Masker` before it is written,
because events and logs are kept forever.

    mask_secrets(transcript, [api_key])   # a text, with the environment as it is now
    mask({"cfg": {...}})                  # a value, as the log processor masks it
    add_secrets(installation_token)       # a secret obtained at run time

What is masked: the values of secret-looking environment variables
(:func:`secret_env_name`: ``*_TOKEN``, ``*_KEY``, ``*_SECRET``, ... plus
:data:`SECRET_ENV_NAMES`), the values a caller names, well-known token shapes
(``sk-ant-``, ``ghp_``, ``github_pat_``, AWS and Slack keys, JWTs, NATS nkey seeds),
``Authorization`` values, ``token=``-style query parameters and credentials in URLs;
in nested values, also the values under secret-looking keys (``password``,
``authorization``, ``github_token``, ...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# Names whose values are secrets although they do not end in _TOKEN/_KEY/_SECRET/...
SECRET_ENV_NAMES = frozenset({
    "ANTHROPIC_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "CCC_WEBHOOK_SECRET",
    "NATS_TOKEN", "NATS_PASSWORD", "NATS_NKEY", "NATS_NKEY_SEED", "NATS_JWT", "NATS_USER_JWT",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
})
_SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD", "_CREDENTIALS")
MIN_ENV_SECRET_LEN = 8  # shorter env values ("1", "true") would mangle ordinary text
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"sk-ant-[A-Za-z0-9_-]{8,}"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), MASK),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"), MASK),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
    (re.compile(r"(?i)(?<=authorization: )(bearer|token|basic) [^\s'\"]+"), MASK),
    # a password in a URL: https://user:s3cr3t@host (up to the last "@" before the host,
    # so a password with an "@" in it goes whole)
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s]+(?=@)"), MASK),
    # token shapes also when glued to other text (the ones above want a word boundary)
    (re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-ant-[A-Za-z0-9_-]{8,}"), MASK),
    # a NATS user JWT / any JWT: header.payload.signature, both JSON objects
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MASK),
    # an nkey seed (S + key type + base32), the private half of NATS creds
    (re.compile(r"S[UAONCXP][A-Z2-7]{56}"), MASK),
    # a token as the user part of a NATS URL: nats://s3cr3t@host:4222
    (re.compile(r"(?i)\b((?:nats|tls|wss?)://)[^/\s@]+@"), r"\1" + MASK + "@"),
    # token-ish query/form parameters: ?access_token=..., &password=...
    (re.compile(r"(?i)\b((?:access_|refresh_|api_|auth_)?(?:token|key|secret|password|passwd)=)"
                r"[^&\s\"'#]+"), r"\1" + MASK),
    # a bearer credential without its header name ("Bearer abc...")
    (re.compile(r"\b((?i:bearer)\s+)[^\s'\",;]{8,}"), r"\1" + MASK),
)
# dict keys whose string values are secrets whatever they look like
_SECRET_KEYS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "password",
                          "passwd", "secret", "token", "api_key", "apikey", "x-api-key", "private_key"})
_PRIMITIVE = (int, float, bool, type(None))
_CACHED_LEN, _CACHE_SIZE = 200, 4096


def secret_env_name(name: str) -> bool:
    """Names whose *values* are secrets (masked in transcripts and logs, and never
    passed to a workspace command)."""
    upper = name.upper()
    return upper.endswith(_SECRET_SUFFIXES) or upper in SECRET_ENV_NAMES


def _secret_key(key: Any, value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and isinstance(key, str)
            and (key.lower() in _SECRET_KEYS or secret_env_name(key)))


class Masker:
    """The secrets to mask and how: the values of secret-looking variables of
    ``environ`` (``os.environ`` when None) as they are at construction, plus
    ``secrets``, plus :meth:`add`."""

    def __init__(self, secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        values = {v for k, v in env.items() if secret_env_name(k) and len(v) >= MIN_ENV_SECRET_LEN}
        values.update(s for s in secrets if s)  # chosen explicitly by the caller: any length
        self._values: tuple[str, ...] = ()
        self.add(*values)

    def add(self, *secrets: str) -> None:
        values = set(self._values) | {s for s in secrets if s}
        self._values = tuple(sorted(values, key=len, reverse=True))  # longest first: no partial leftovers
        self._cache: dict[str, str] = {}

    def text(self, text: str) -> str:
        # log lines repeat most of their strings (event names, actors, subjects): remember
        # short ones; the cache is dropped whenever the secrets change
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        masked = text
        for value in self._values:
            masked = masked.replace(value, MASK)
        for pattern, repl in _PATTERNS:
            masked = pattern.sub(repl, masked)
        if len(text) <= _CACHED_LEN:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[text] = masked
        return masked

    def value(self, value: Any) -> Any:
        """Mask recursively; objects are kept as they are unless their repr holds a secret."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, _PRIMITIVE):
            return value
        if isinstance(value, dict):
            return {k: MASK if _secret_key(k, v) else self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v) for v in value]
        if isinstance(value, BaseException):
            shown = f"{type(value).__name__}: {value}"
            masked = self.text(shown)
            return masked if masked != shown else value
        shown = repr(value)
        masked = self.text(shown)
        return masked if masked != shown else value

    def __call__(self, _logger: Any, _method: str, event_dict: dict) -> dict:
        """As a structlog processor. (``timestamp`` is TimeStamper's own: not masked.)"""
        return {k: v if k == "timestamp" else MASK if _secret_key(k, v) else self.value(v)
                for k, v in event_dict.items()}


def mask_secrets(text: str, extra: Iterable[str] = (), *, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with its secrets replaced by ``***``: those of ``environ`` (``os.environ``
    when None) as it is now, and the ``extra`` values."""
    return Masker(extra, environ).text(text)


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


# -- the process's masker: the log processor's, and what add_secrets extends --------------
_process_masker = Masker(environ={})


def process_masker() -> Masker:
    return _process_masker


def reset_process_masker(secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> Masker:
    """Start over from ``environ`` (``os.environ`` when None) and ``secrets``
    (``configure_logging`` does, once the environment is known)."""
    global _process_masker
    _process_masker = Masker(secrets, environ)
    return _process_masker


def add_secrets(*values: str) -> None:
    """Mask these values from now on (e.g. a token obtained at run time)."""
    _process_masker.add(*values)


def mask(value: Any) -> Any:
    """Mask a string (or a nested structure) as the log processor would."""
    return _process_masker.value(value)


__all__ = ["MASK", "MIN_ENV_SECRET_LEN", "SECRET_ENV_NAMES", "Masker", "add_secrets", "mask", "mask_secrets",
           "process_masker", "redact_url", "reset_process_masker", "secret_env_name"]
