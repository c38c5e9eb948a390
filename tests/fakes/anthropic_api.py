"""A scripted local Messages API server, so tests drive the real ``anthropic`` client.

Each test gives the server a script: the responses to ``POST /v1/messages`` in order.
An entry is a Messages API response dict (missing envelope fields are filled in), an
:class:`ApiError` (status, error type, message, headers, e.g. a 429 with ``retry-after``),
or a callable taking the request body and returning either. Every request is recorded
(headers and JSON body) so tests can assert what the model was sent: tool results,
``is_error`` flags, ``cache_control`` markers, the API key header.

A request beyond the end of the script gets a 400 with ``x-should-retry: false`` (so the
SDK does not retry it), which fails the session visibly instead of hanging.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

_ids = itertools.count(1)


@dataclass(frozen=True)
class ApiError:
    status: int
    type: str = "api_error"
    message: str = "error"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]

    @property
    def api_key(self) -> str | None:
        """The credential sent: ``x-api-key`` or a bearer ``authorization`` (SDK 2.x sends
        ``ANTHROPIC_API_KEY`` as ``Authorization: Bearer``)."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    def tool_results(self) -> list[dict[str, Any]]:
        """The tool_result blocks of the last user turn."""
        last = self.messages[-1] if self.messages else {}
        content = last.get("content") if last.get("role") == "user" else None
        return [b for b in content or [] if isinstance(b, dict) and b.get("type") == "tool_result"]


Entry = dict[str, Any] | ApiError | Callable[[dict[str, Any]], "dict[str, Any] | ApiError"]


def usage(input_tokens: int = 1000, output_tokens: int = 100, cache_write: int = 0, cache_read: int = 0) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read}


def tool_call(name: str, input: dict[str, Any], *, text: str | None = None, id: str | None = None,
              use: dict | None = None) -> dict[str, Any]:
    """A response asking for one tool call."""
    return tool_calls([(name, input)], text=text, ids=[id] if id else None, use=use)


def tool_calls(calls: list[tuple[str, dict[str, Any]]], *, text: str | None = None,
               ids: list[str] | None = None, use: dict | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for i, (name, args) in enumerate(calls):
        tid = ids[i] if ids else f"toolu_{next(_ids):06d}"
        content.append({"type": "tool_use", "id": tid, "name": name, "input": args})
    return {"content": content, "stop_reason": "tool_use", "usage": use or usage()}


def reply(text: str, stop_reason: str = "end_turn", use: dict | None = None) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}] if text else [], "stop_reason": stop_reason,
            "usage": use or usage()}


class FakeAnthropic:
    def __init__(self) -> None:
        self.script: list[Entry] = []
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                status, payload, headers = fake._respond(self.path, dict(self.headers.items()), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{next(_ids):06d}")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-anthropic", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # blocks forever on a server that never started
            self._thread.join(timeout=5)
        self._server.server_close()

    def add(self, *entries: Entry) -> FakeAnthropic:
        with self._lock:
            self.script.extend(entries)
        return self

    def _respond(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict, dict]:
        with self._lock:
            self.requests.append(Recorded(path=path, headers={k.lower(): v for k, v in headers.items()},
                                          body=body))
            if path.split("?", 1)[0] != "/v1/messages":
                return 404, _error("not_found_error", f"no route {path}"), {}
            entry: Entry | None = self.script.pop(0) if self.script else None
        if entry is None:
            return 400, _error("invalid_request_error", "fake_anthropic: script exhausted"), \
                {"x-should-retry": "false"}
        if callable(entry):
            entry = entry(body)
        if isinstance(entry, ApiError):
            return entry.status, _error(entry.type, entry.message), dict(entry.headers)
        message = {"id": f"msg_{next(_ids):06d}", "type": "message", "role": "assistant",
                   "model": body.get("model", "claude-test"), "stop_sequence": None, **entry}
        message.setdefault("usage", usage())
        return 200, message, {}


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


@pytest.fixture
def fake_anthropic() -> Iterator[tuple[FakeAnthropic, str]]:
    server = FakeAnthropic().start()
    try:
        yield server, server.base_url
    finally:
        server.stop()
