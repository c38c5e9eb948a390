"""The one loop every actor runs: a durable JetStream pull consumer, a handler per
message, ack only after the handler's events are appended.

Ack policy lives here and only here:

* handler returns                   -> ack
* DomainError (an illegal/no-op decision, e.g. a stale report) -> ack (logged)
* BadEventError (poison message)    -> parked in the dead-letter stream with the
                                       reason and original sequence, then term
* retryable InfrastructureError     -> nak with exponential backoff (redelivered)
* anything else                     -> nak with backoff; after ``max_deliver``
                                       attempts it is parked as a dead letter and termed

Concurrency is bounded by a semaphore (and by ``max_ack_pending`` on the server).
Shutdown: stop fetching, wait for in-flight handlers (up to ``grace``), cancel the
rest (their messages are not acked, so they are redelivered to whoever is next).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from events.codec import encode
from events.dead_letter import DeadLetter
from events.errors import BadEventError, CccError, DomainError

log = structlog.get_logger("ccc.actor")

Handler = Callable[[Msg], Awaitable[None]]


def redelivery_delay(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    return min(cap, base * (2 ** max(0, attempt - 1)))


class ConsumerLoop:
    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        durable: str,
        filter_subjects: list[str],
        handler: Handler,
        concurrency: int = 16,
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        deliver_policy: api.DeliverPolicy = api.DeliverPolicy.ALL,
        name: str | None = None,
        dlq_subject: str | None = None,
        inactive_threshold: float | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=10.0)
        self.stream = stream
        self.durable = durable
        self.filter_subjects = filter_subjects
        self.handler = handler
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.deliver_policy = deliver_policy
        self.inactive_threshold = inactive_threshold
        self.name = name or durable
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.handled = 0
        self.failed = 0
        self.dead_letters = 0
        self.dlq_subject = dlq_subject or f"{stream.split('_')[0].lower()}.dlq.{durable}"

    async def start(self) -> None:
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=max(self.concurrency * 4, 64),
            deliver_policy=self.deliver_policy,
            inactive_threshold=self.inactive_threshold,
        )
        if len(self.filter_subjects) == 1:
            config.filter_subject = self.filter_subjects[0]
        else:
            config.filter_subjects = self.filter_subjects
        self._psub = await self.js.pull_subscribe_bind(
            durable=self.durable, stream=self.stream,
        ) if await self._exists() else await self.js.pull_subscribe(
            self.filter_subjects[0] if len(self.filter_subjects) == 1 else "",
            durable=self.durable, stream=self.stream, config=config,
        )
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")

    async def _exists(self) -> bool:
        try:
            await self.js._jsm.consumer_info(self.stream, self.durable)
            return True
        except nats.js.errors.NotFoundError:
            return False

    async def _fetch(self) -> list[Msg]:
        try:
            msgs = await self._psub.fetch(1, timeout=1.0)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return []
        # then take whatever else is already waiting, without lingering
        free = self._slots._value  # noqa: SLF001 - a hint only; the semaphore still guards
        if free > 1:
            try:
                msgs += await self._psub.fetch(min(free - 1, 64), timeout=0.005)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                pass
        return msgs

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            self._slots.release()
            try:
                msgs = await self._fetch()
            except (nats.errors.Error, OSError) as e:
                if self._stopping.is_set():
                    break
                log.warning("actor.fetch_failed", actor=self.name, error=str(e))
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            delivered = msg.metadata.num_delivered
            seq = msg.metadata.sequence.stream
            try:
                await self.handler(msg)
            except DomainError as e:
                log.info("actor.decision_refused", actor=self.name, seq=seq, subject=msg.subject, reason=str(e))
            except BadEventError as e:
                log.warning("actor.poison_message", actor=self.name, seq=seq, subject=msg.subject, error=str(e))
                self.failed += 1
                await self._dead_letter(msg, "poison", str(e))
                await msg.term()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure is turned into a nak
                self.failed += 1
                retryable = isinstance(e, CccError) and e.retryable
                level = log.info if retryable else log.error
                level("actor.handler_failed", actor=self.name, seq=seq, subject=msg.subject,
                      attempt=delivered, error=f"{type(e).__name__}: {e}",
                      exc_info=not isinstance(e, CccError))
                if delivered >= self.max_deliver:
                    log.error("actor.gave_up", actor=self.name, seq=seq, subject=msg.subject)
                    await self._dead_letter(msg, "gave_up", f"{type(e).__name__}: {e}")
                    await msg.term()
                else:
                    await msg.nak(delay=redelivery_delay(delivered))
                return
            await msg.ack()
            self.handled += 1
        except (nats.errors.Error, OSError) as e:
            # the ack could not be sent: the message will be redelivered, and the
            # handler's appends are idempotent, so this is safe
            log.warning("actor.ack_failed", actor=self.name, error=str(e))
        finally:
            self._slots.release()

    async def _dead_letter(self, msg: Msg, reason: str, error: str) -> None:
        md = msg.metadata
        letter = DeadLetter(
            stream=md.stream, seq=md.sequence.stream, subject=msg.subject, consumer=self.durable,
            reason=reason, error=error[:2000], deliveries=md.num_delivered,
            at=datetime.now(timezone.utc), size=len(msg.data),
            preview=msg.data[:500].decode("utf-8", errors="replace"),
        )
        self.dead_letters += 1
        try:
            await self.js.publish(self.dlq_subject, encode(letter), headers={"Nats-Msg-Id": letter.dedup_id})
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
            # keep the message for redelivery rather than lose the reason
            log.error("actor.dead_letter_failed", actor=self.name, seq=letter.seq, error=str(e))
            raise

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._inflight:
            done, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
