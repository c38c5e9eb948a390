"""The one HTTP server (``infra.adapters.http.service``): an idle keep-alive connection
outlasts a client that polls every few seconds.

With uvicorn's default of 5 s, the hour-long ``ccc soak`` (which reads the status API
every 5 s) had 3 of its 720 ``/health`` reads fail with "server disconnected without
sending a response": it sent on the connection just as the server closed it."""

from __future__ import annotations

import asyncio

import pytest

from infra.adapters.http.service import KEEP_ALIVE, HttpService

pytestmark = pytest.mark.timeout(30)

UVICORN_DEFAULT_KEEP_ALIVE = 5.0


async def hello(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = (await receive())["type"]
            await send({"type": f"{message}.complete"})  # lifespan.startup / lifespan.shutdown
            if message == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.readexactly(2), 5)
    return head.split(b"\r\n", 1)[0] + b" " + body


async def test_an_idle_connection_is_kept_past_a_five_second_poll() -> None:
    assert KEEP_ALIVE > 60  # beyond pollers and the usual load balancer idle timeout
    service = HttpService("127.0.0.1", 0, name="keep-alive-test")
    port = await service.start(hello)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await ask(reader, writer) == b"HTTP/1.1 200 OK ok"
        await asyncio.sleep(UVICORN_DEFAULT_KEEP_ALIVE + 1.0)  # idle past uvicorn's default
        assert await ask(reader, writer) == b"HTTP/1.1 200 OK ok"  # the same connection still answers
    finally:
        writer.close()
        await service.stop()


async def test_stopping_does_not_wait_for_idle_keep_alive_connections() -> None:
    service = HttpService("127.0.0.1", 0, name="keep-alive-stop")
    port = await service.start(hello)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await ask(reader, writer) == b"HTTP/1.1 200 OK ok"
    loop = asyncio.get_running_loop()
    t = loop.time()
    await service.stop()
    assert loop.time() - t < 3.0  # the idle connection is closed, not waited for
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the client sees it closed
    writer.close()
