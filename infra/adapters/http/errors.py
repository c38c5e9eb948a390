"""The JSON error every HTTP surface of the project answers with, sent from plain ASGI.

Litestar's exception handlers shape the errors a route raises; the gates in front of
the routes (the rate limit, the Host allow-list, the bearer-token check) answer before
any route runs, so they send the same body themselves: ``{"error": <slug>, "detail":
...}``, where the slug is the HTTP reason phrase (``too_many_requests``,
``unauthorized``, ``forbidden``): the status API's :class:`~projections.status_views.ErrorBody`
and the webhook's error body are that shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec

from projections.status_views import ErrorBody

_encoder = msgspec.json.Encoder()


def error_slug(status: int) -> str:
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


async def send_json_error(send: Any, status: int, detail: str, *,
                          headers: Mapping[str, str] | None = None) -> None:
    """Answer an HTTP request with ``status`` and the project's error body."""
    body = _encoder.encode(ErrorBody(error=error_slug(status), detail=detail))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


__all__ = ["error_slug", "send_json_error"]
