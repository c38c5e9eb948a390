"""The demand board on JetStream (``actors.demand.DemandBoard``): the ``<NS>_DEMAND``
stream, one message per task needing an agent slot (waiting for one, or holding one) on
``<ns>.demand.<specialty>.<task_id>``.

* **put** publishes the task's message; the stream keeps one message per subject
  (``max_msgs_per_subject=1``), so a second put replaces the first and the count
  stays one.
* **remove** purges the task's subject (``$JS.API.STREAM.PURGE.<NS>_DEMAND`` with a
  ``filter``): the message is gone, and so is its weight in the ``demand-<specialty>``
  consumer's pending count. The coordinator's credentials may purge this stream and no
  other (``infra.adapters.nats.permissions``).
* **current** reads the stream's subjects (``$JS.API.STREAM.INFO`` with a
  ``subjects_filter``, paged), not the messages: the subjects are the board.

The consumers ``demand-<specialty>`` (made by provisioning, an admin step) are never
pulled: a pull consumer nobody pulls has every message of its filter pending, which is
what KEDA's ``nats-jetstream`` scaler reads (``num_pending + num_ack_pending`` of the
named consumer in ``/jsz?acc=<account>&consumers=true&config=true``).
"""

from __future__ import annotations

import json
import re

import nats.errors
from nats.aio.client import Client

from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace

# a literal subject token: never a wildcard, never empty, no whitespace (a purge filter
# with a wildcard would take down other tasks' entries)
_TOKEN = re.compile(r"^[A-Za-z0-9_=-]+$")
_REST = re.compile(r"^[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*$")  # a stray subject's tail, to purge it too


class NatsDemandBoard:
    def __init__(self, nc: Client, ns: Namespace, *, timeout: float = 5.0) -> None:
        self.nc, self.ns, self.timeout = nc, ns, timeout
        self.js = nc.jetstream(timeout=timeout)
        self.stream = ns.demand_stream

    def subject(self, specialty: str, task_id: str) -> str:
        if not _TOKEN.match(specialty or "") or not _REST.match(task_id or ""):
            raise ConfigError(f"demand: invalid specialty {specialty!r} or task id {task_id!r}")
        return self.ns.demand_subject(specialty, task_id)

    async def put(self, specialty: str, task_id: str, body: bytes) -> None:
        subject = self.subject(specialty, task_id)
        try:
            await self.js.publish(subject, body, stream=self.stream)
        except (TimeoutError, nats.errors.Error, OSError) as e:
            raise StoreUnavailable(f"demand put {subject}: {type(e).__name__}: {e}") from None

    async def remove(self, specialty: str, task_id: str) -> None:
        subject = self.subject(specialty, task_id)
        try:
            await self.js.purge_stream(self.stream, subject=subject)
        except (TimeoutError, nats.errors.Error, OSError) as e:
            raise StoreUnavailable(f"demand remove {subject}: {type(e).__name__}: {e}") from None

    async def current(self) -> set[tuple[str, str]]:
        prefix = f"{self.ns.prefix}.demand."
        return {tuple(s[len(prefix):].split(".", 1)) for s in await self.subjects()
                if s.startswith(prefix) and "." in s[len(prefix):]}

    async def subjects(self) -> list[str]:
        """Every subject of the stream holding a message, page by page (the server
        returns at most 100k subjects per request)."""
        out: list[str] = []
        while True:
            request = {"subjects_filter": f"{self.ns.prefix}.demand.>", "offset": len(out)}
            try:
                msg = await self.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", json.dumps(request).encode(),
                                            timeout=self.timeout)
            except (TimeoutError, nats.errors.Error, OSError) as e:
                raise StoreUnavailable(f"demand: stream {self.stream}: {type(e).__name__}: {e}") from None
            info = json.loads(msg.data)
            if "error" in info:
                error = info["error"]
                raise StoreUnavailable(f"demand: stream {self.stream}: {error.get('description', error)}")
            page = list((info.get("state") or {}).get("subjects") or {})
            out.extend(page)
            if not page or len(out) >= info.get("total", 0):
                return out


__all__ = ["NatsDemandBoard"]
