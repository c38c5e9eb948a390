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
from infra.adapters.nats.secure import KitFiles, SecureDir
from infra.adapters.nats.server import EmbeddedServer
from tests.support.session import KITS
from infra.adapters.nats.provisioning import provision


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory) -> EmbeddedServer:
    """Secure, as every embedded server is by default: mutual TLS, nkey users, an
    encrypted store. Tests connect as admin (they provision their own namespaces);
    tests/integration/test_security.py checks the other roles' permissions."""
    root = tmp_path_factory.mktemp("nats")
    secure = SecureDir.of(root)
    secure.init(Namespace())
    server = EmbeddedServer(root, sync_interval="always", secure=secure, js_key=secure.js_key())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server) -> str:
    KITS[nats_server.url] = str(SecureDir.of(nats_server.data_dir).kit_dir("admin"))
    return nats_server.url


@pytest.fixture(scope="session")
def admin_kit(nats_server) -> KitFiles:
    return SecureDir.of(nats_server.data_dir).kit("admin")


@pytest.fixture(scope="session")
def nats_creds(nats_url) -> str:
    """The admin kit's directory, for ``ccc --creds`` / ``CCC_CREDS`` in CLI tests."""
    return KITS[nats_url]


@pytest_asyncio.fixture(scope="session")
async def nc(nats_url, admin_kit):
    conn = await connect(nats_url, name="ccc-tests", kit=admin_kit)
    yield conn
    await conn.close()


@pytest.fixture
def ns() -> Namespace:
    return Namespace("t" + uuid.uuid4().hex[:10])


@pytest_asyncio.fixture
async def store(nc, ns) -> EventStore:
    await provision(nc, ns)
    return EventStore(nc, ns)


@pytest_asyncio.fixture
async def live(store):
    """The live read model following the test's namespace (started, stopped after)."""
    from projections.live import LiveReadModel

    model = LiveReadModel(store)
    await model.start()
    yield model
    await model.stop()


@pytest.fixture
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No user git identity or config; the process's known secrets start empty (and are
    forgotten after)."""
    from events.secrets import forget_added_secrets

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    forget_added_secrets()
    yield
    forget_added_secrets()


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
