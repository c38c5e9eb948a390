"""A fixture for tests that configure logging: the process's logging as it was before."""

from __future__ import annotations

import logging

import pytest
import structlog

from infra.adapters.obs.logs import ROUTED_LOGGERS


@pytest.fixture
def restore_logging():
    config = structlog.get_config()
    loggers = [logging.getLogger(), *map(logging.getLogger, ROUTED_LOGGERS)]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    structlog.configure(**config)
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    structlog.contextvars.clear_contextvars()
