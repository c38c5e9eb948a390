"""The AsyncAPI document, served by a real status API (uvicorn, a free port) over a real
nats-server, next to its OpenAPI document and behind the same gate."""

from __future__ import annotations

import httpx
import pytest

from events.contract import CONTRACT_VERSION, committed, wire_types
from infra.adapters.http.auth import API_TOKENS_FILE, ApiAccess, create_api_tokens, load_api_tokens
from infra.adapters.http.ratelimit import RateLimit
from infra.adapters.http.status_server import ApiServer

pytestmark = pytest.mark.timeout(60)


async def test_the_status_api_serves_the_asyncapi_document_beside_openapi(store) -> None:
    server = ApiServer(store, "127.0.0.1", 0, materialize=False)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            r = await http.get("/asyncapi.json")
            openapi = (await http.get("/schema/openapi.json")).json()
    finally:
        await server.stop()
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == f"{CONTRACT_VERSION}.0.0"
    contract = committed()
    for t in wire_types():
        entry = contract.entry(t.name)
        assert doc["channels"][t.name]["address"] == entry["subject"] == f"ccc.{t.subject}", t.name
        assert doc["components"]["messages"][t.name]["payload"] == {"$ref": f"#/components/schemas/{t.name}"}
        assert doc["operations"][f"send.{t.name}"]["channel"] == {"$ref": f"#/channels/{t.name}"}
    assert doc["operations"]["send.task.assigned"]["tags"] == [{"name": "coordinator"}]
    assert "/asyncapi.json" in openapi["info"]["description"]  # a document beside it, not one of its paths


async def test_the_document_is_behind_the_gate_like_openapi(store, tmp_path) -> None:
    plain = create_api_tokens(tmp_path)  # made at run time, as `ccc secure init` does
    access = ApiAccess(tokens=load_api_tokens(tmp_path / API_TOKENS_FILE), require_token=True,
                       rate_limit=RateLimit(rate=0, burst=1))
    server = ApiServer(store, "127.0.0.1", 0, materialize=False, access=access)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            read = {"Authorization": f"Bearer {plain['read']}"}
            for path in ("/asyncapi.json", "/schema/openapi.json"):
                assert (await http.get(path)).status_code == 401, path
                assert (await http.get(path, headers=read)).status_code == 200, path
    finally:
        await server.stop()
