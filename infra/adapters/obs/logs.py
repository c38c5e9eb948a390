"""Logging: structlog for everything, one masking processor every line passes through.

    configure_logging("info")                       # JSON lines unless stderr is a terminal
    configure_logging("debug", json=False)          # pretty, even when piped
    with bind(task_id="acme_app-7", correlation_id="acme_app-7"):
        log.info("pipeline.phase_done", phase="testing")   # carries both ids

Design:

* structlog renders through the standard library (``structlog.stdlib.ProcessorFormatter``
  on one handler on the root logger), so the lines of ``nats``, ``uvicorn``, ``litestar``,
  ``asyncio``... get the same timestamp, level, ids, masking and renderer as ours.
  Libraries that configure logging themselves must be told not to: ``Litestar(...,
  logging_config=None)`` (its default config *replaces the root handlers*) and
  ``uvicorn.Config(..., log_config=None)``.
* Ids come from ``structlog.contextvars`` (task-local under asyncio), plus the current
  OpenTelemetry span's ``trace_id``/``span_id`` when one is recording.
* Exceptions are formatted to text *before* masking (never by the renderer afterwards),
  so a secret in an exception message or traceback is masked like any other string.
* The masking processor walks the finished event dict: every string in it, in nested
  dicts/lists/tuples, and the ``repr`` of any other object it would be rendered with.
  It masks the values of secret-looking environment variables (as read at configure
  time, plus :func:`add_secrets`), the ``secrets`` passed in, token shapes (``sk-ant-``,
  ``ghp_``, ``github_pat_``, JWTs, NATS nkey seeds), ``Authorization`` values,
  ``token=``-style query parameters and credentials in URLs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from infra.adapters.coders.base import MASK, mask_secrets
from infra.adapters.git.workspace import secret_env_name

# Names whose values are secrets although they do not end in _TOKEN/_KEY/_SECRET/...
# (those are caught by ``secret_env_name``).
SECRET_ENV_NAMES = frozenset({
    "ANTHROPIC_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "CCC_WEBHOOK_SECRET",
    "NATS_TOKEN", "NATS_PASSWORD", "NATS_NKEY", "NATS_NKEY_SEED", "NATS_JWT", "NATS_USER_JWT",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
})
# Libraries that install their own handlers (uvicorn's dictConfig, Litestar's default
# LoggingConfig): taken back to propagate to our root handler on configure.
ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "nats", "asyncio")
MIN_ENV_SECRET_LEN = 8  # shorter env values ("1", "true") would mangle ordinary text
_EXTRA_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # token shapes also when glued to other text (base.mask_secrets wants a word boundary)
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


def _secret_key(key: Any, value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and isinstance(key, str)
            and (key.lower() in _SECRET_KEYS or secret_env_name(key)))


class Masker:
    """The secrets to mask and how. One instance serves the whole process."""

    def __init__(self, secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        values = {v for k, v in env.items()
                  if (secret_env_name(k) or k.upper() in SECRET_ENV_NAMES) and len(v) >= MIN_ENV_SECRET_LEN}
        values.update(s for s in secrets if s)
        self._values: tuple[str, ...] = ()
        self.add(*values)

    def add(self, *secrets: str) -> None:
        values = set(self._values) | {s for s in secrets if s}
        self._values = tuple(sorted(values, key=len, reverse=True))
        self._cache: dict[str, str] = {}

    def text(self, text: str) -> str:
        # log lines repeat most of their strings (event names, actors, subjects): remember
        # short ones; the cache is dropped whenever the secrets change
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        masked = mask_secrets(text, self._values, environ={})  # values, token shapes, URL passwords
        for pattern, repl in _EXTRA_PATTERNS:
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
        """The structlog processor. (``timestamp`` is TimeStamper's own: not masked.)"""
        return {k: v if k == "timestamp" else MASK if _secret_key(k, v) else self.value(v)
                for k, v in event_dict.items()}


_masker = Masker(environ={})


def add_secrets(*values: str) -> None:
    """Mask these values from now on (e.g. a token obtained at run time)."""
    _masker.add(*values)


def mask(value: Any) -> Any:
    """Mask a string (or a nested structure) as the log processor would."""
    return _masker.value(value)


def add_trace_ids(_logger: Any, _method: str, event_dict: dict) -> dict:
    """``trace_id``/``span_id`` of the current OpenTelemetry span, if one is valid."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


@contextlib.contextmanager
def bind(**ids: Any) -> Iterator[None]:
    """Bind ids (``task_id``, ``agent_id``, ``correlation_id``...) to every log line
    written in this context (and in tasks started from it). ``None`` values are skipped."""
    tokens = structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


class _Handler(logging.StreamHandler):
    """A stream handler; with no stream, ``sys.stderr`` as it is at each write (so a
    swapped stderr, e.g. click's test runner, still gets the lines)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._fixed = stream
        super().__init__(stream)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._fixed = value


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelNamesMapping().get(level.upper())
    if value is None:
        raise ValueError(f"unknown log level {level!r}")
    return value


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str | int = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
    colors: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Configure structlog and the standard library's root logger. Idempotent: a second
    call replaces the first configuration (and its handler).

    ``json``: JSON lines (``None``: when ``stream`` is not a terminal). ``stream``:
    where lines go (``None``: ``sys.stderr``, looked up at each write). ``secrets``:
    extra values to mask (env values are read now, from ``environ`` or ``os.environ``).
    """
    lvl = _level(level)
    current = stream if stream is not None else sys.stderr
    tty = _isatty(current)
    as_json = (not tty) if json is None else json
    global _masker
    _masker = Masker(secrets, environ)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        structlog.processors.StackInfoRenderer(),
    ]
    renderers: list[Any]
    if as_json:
        renderers = [_lead_keys, structlog.processors.JSONRenderer()]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=tty if colors is None else colors)]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,  # text first, so that it is masked too
            _mask_processor,  # the one masking step: nothing is rendered past it
            *renderers,
        ],
    )
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    handler._ccc = True  # type: ignore[attr-defined]  # ours: replaced on reconfigure

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ccc", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in ROUTED_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=False,
    )


_LEAD = ("timestamp", "level", "logger", "event")


def _lead_keys(_logger: Any, _method: str, event_dict: dict) -> dict:
    """JSON lines start with timestamp, level, logger, event: easier to read raw."""
    out = {k: event_dict[k] for k in _LEAD if k in event_dict}
    out.update(event_dict)
    return out


def _mask_processor(logger: Any, method: str, event_dict: dict) -> dict:
    return _masker(logger, method, event_dict)  # the current masker, also after add_secrets


get_logger = structlog.get_logger

__all__ = [
    "MASK",
    "SECRET_ENV_NAMES",
    "Masker",
    "add_secrets",
    "add_trace_ids",
    "bind",
    "configure_logging",
    "get_logger",
    "mask",
]
