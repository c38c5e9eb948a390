"""Embedded nats-server, provisioning and connecting."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest
from nats.js import api

from events.errors import StoreUnavailable
from infra.adapters.nats.connection import connect
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.provisioning import provision

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_server_random_port_and_sync_always(tmp_path):
    http = free_port()
    with EmbeddedServer(tmp_path, http_port=http) as server:
        assert server.url.startswith("nats://127.0.0.1:") and server.port > 0
        varz = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/varz", timeout=5))
        js = varz["jetstream"]["config"]
        assert js["store_dir"].startswith(str(tmp_path))
        assert js["sync_always"] is True
    assert not server.running


def test_embedded_server_sync_interval_configurable(tmp_path):
    http = free_port()
    with EmbeddedServer(tmp_path, http_port=http, sync_interval="1s"):
        varz = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/varz", timeout=5))
        assert varz["jetstream"]["config"].get("sync_always", False) is False
        assert varz["jetstream"]["config"]["sync_interval"] == 1_000_000_000


def test_embedded_server_fixed_port(tmp_path):
    port = free_port()
    with EmbeddedServer(tmp_path, port=port) as server:
        assert server.url == f"nats://127.0.0.1:{port}"


def test_embedded_server_port_in_use_is_a_clear_error(tmp_path):
    with EmbeddedServer(tmp_path / "a") as first:
        with pytest.raises(StoreUnavailable, match="exited"):
            EmbeddedServer(tmp_path / "b", port=first.port).start(timeout=5)


async def test_provisioning_is_idempotent_and_correct(nc, ns):
    await asyncio.gather(provision(nc, ns), provision(nc, ns))  # concurrently, twice
    await provision(nc, ns)
    jsm = nc.jsm()
    events = (await jsm.stream_info(ns.events_stream)).config
    assert events.retention == api.RetentionPolicy.LIMITS
    assert events.deny_delete and events.deny_purge and events.allow_direct
    assert events.duplicate_window >= 600
    assert events.storage == api.StorageType.FILE
    assert set(events.subjects) == {f"{ns.prefix}.task.>", f"{ns.prefix}.agent.>"}
    issues = (await jsm.stream_info(ns.issues_stream)).config
    assert issues.duplicate_window >= 600 and issues.subjects == [f"{ns.prefix}.issue.>"]
    hb = (await jsm.stream_info(ns.heartbeats_stream)).config
    assert hb.max_msgs_per_subject == 1
    js = nc.jetstream()
    await js.key_value(ns.tasks_bucket)
    await js.key_value(ns.agents_bucket)
    await js.object_store(ns.artifacts_bucket)


async def test_event_log_refuses_delete_and_purge(nc, ns, store):
    from tests.integration.test_store import created

    [seq] = await store.append(created("acme_app-1"), expected_last_seq=0)
    jsm = nc.jsm()
    with pytest.raises(Exception):
        await jsm.delete_msg(ns.events_stream, seq)
    with pytest.raises(Exception):
        await jsm.purge_stream(ns.events_stream)
    assert await store.last_seq() == seq


async def test_connect_to_nothing_is_store_unavailable():
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await connect(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5, reconnect=False)
