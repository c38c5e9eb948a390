"""Test fixtures. One real nats-server per session (random port, temp store dir);
each test gets its own namespace, so streams, subjects and buckets never collide."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from events.store import EventStore
from events.subjects import Namespace
from infra.adapters.nats.connection import connect
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.provisioning import provision


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory) -> EmbeddedServer:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"), sync_interval="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server) -> str:
    return nats_server.url


@pytest_asyncio.fixture(scope="session")
async def nc(nats_url):
    conn = await connect(nats_url, name="ccc-tests")
    yield conn
    await conn.close()


@pytest.fixture
def ns() -> Namespace:
    return Namespace("t" + uuid.uuid4().hex[:10])


@pytest_asyncio.fixture
async def store(nc, ns) -> EventStore:
    await provision(nc, ns)
    return EventStore(nc, ns)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll a condition instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


FIXTURES = Path(__file__).parent / "fixtures"
