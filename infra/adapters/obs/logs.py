"""Logging: structlog for everything, one masking processor every line passes through
(the process's :class:`~infra.adapters.obs.masking.Masker`).

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
  time, plus :func:`~infra.adapters.obs.masking.add_secrets`), the ``secrets`` passed
  in, and everything else :mod:`infra.adapters.obs.masking` knows to mask.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from infra.adapters.obs import masking

# Libraries that install their own handlers or disable loggers (uvicorn's dictConfig,
# Litestar's default LoggingConfig): taken back to propagate to our root handler on configure.
ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "nats", "asyncio")


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
    masking.reset_process_masker(secrets, environ)

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
        lib.disabled = False
    # a dictConfig with disable_existing_loggers (its default) silences every logger that
    # existed then, children included (``nats.aio.client``): take those back too
    children = tuple(f"{name}." for name in ROUTED_LOGGERS)
    for name, lib in list(logging.root.manager.loggerDict.items()):
        if isinstance(lib, logging.Logger) and name.startswith(children):
            lib.disabled = False

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
    # the process's masker as it is now: also after a reconfigure or add_secrets.
    # (``timestamp`` is TimeStamper's own: not masked.)
    masker = masking.process_masker()
    return {k: v if k == "timestamp" else masking.MASK if masking.secret_key(k, v) else masker.value(v)
            for k, v in event_dict.items()}


get_logger = structlog.get_logger

__all__ = ["ROUTED_LOGGERS", "add_trace_ids", "bind", "configure_logging", "get_logger"]
