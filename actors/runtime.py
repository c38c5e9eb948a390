"""The one loop every actor runs: a durable JetStream pull consumer, a handler per
message, ack only after the handler's events are appended.

Ack policy lives here and only here:

* handler returns                   -> ack
* DomainError (an illegal/no-op decision, e.g. a stale report) -> ack (logged)
* BadEventError (poison message)    -> parked in the dead-letter stream with the
                                       reason and original sequence, then term
* Refused (a policy says no, e.g. an -> parked the same way (reason "refused"), then
  untrusted author)                    term: never retried, but on record
* retryable InfrastructureError     -> nak with exponential backoff (redelivered)
* anything else                     -> nak with backoff; after ``max_deliver``
                                       attempts it is parked as a dead letter and termed

Concurrency is bounded by asking for no more messages than there are free handler
slots (and by ``max_ack_pending`` on the server).
Shutdown: stop fetching, wait for in-flight handlers (up to ``grace``), cancel the
rest (their messages are not acked, so they are redelivered to whoever is next).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from events.aio import cancel_and_wait
from events.dead_letter import DeadLetter
from events.errors import BadEventError, CccError, DomainError, Refused
from events.retry import backoff
from events.secrets import masked_json

from actors.ports import NO_TELEMETRY, Telemetry

log = structlog.get_logger("ccc.actor")

Handler = Callable[[Msg], Awaitable[None]]


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
        telemetry: Telemetry = NO_TELEMETRY,
        dead_letters: bool = True,
        pull_expires: float | None = None,
    ) -> None:
        """``dead_letters=False``: this actor may not write dead letters (an agent: its
        credentials forbid it). A message it cannot process is then logged and termed;
        it stays in its stream at its sequence (``ccc bad-events`` lists what cannot be
        decoded), so nothing is lost, and only the coordinator writes dead letters.

        ``pull_expires``: how long each pull request waits at the server (default
        :attr:`PULL_EXPIRES`). An idle loop costs a request and its expiry notice per
        period, so a process hosting thousands of mostly idle loops (agents) asks for
        longer ones; a request lost with a reconnect is renewed at once all the same, one
        lost otherwise (a consumer leader moving in a cluster) after the period."""
        self.nc = nc
        self.write_dead_letters = dead_letters
        self.telemetry = telemetry
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
        self.pull_expires = pull_expires or self.PULL_EXPIRES
        self._reconnects = nc.stats.get("reconnects", 0)
        self.name = name or durable
        self._inflight: set[asyncio.Task] = set()
        self._outstanding = 0  # messages asked for and not yet delivered
        self._asked_at = self._delivered_at = 0.0
        self._sub = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.handled = 0
        self.failed = 0
        self.dead_letters = 0
        self.refused = 0  # parked by policy (counted apart from failures: nothing broke)
        # streams are "<NS>_<KIND>" (the namespace may itself contain "_")
        self.dlq_subject = dlq_subject or f"{stream.rsplit('_', 1)[0].lower()}.dlq.{durable}"

    async def start(self) -> None:
        config = api.ConsumerConfig(
            # named as well as durable: nats-py then creates it on
            # $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>, the subject an agent's
            # permissions allow for its own assignments only (the server checks that the
            # filter in the subject is the one in the request)
            name=self.durable,
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
        jsm = self.js._jsm  # noqa: SLF001 - the manager nats-py builds for this context
        try:
            await jsm.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            await jsm.add_consumer(self.stream, config=config)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_delivery)
        self._task = asyncio.create_task(self._watchdog(), name=f"consumer-{self.name}")
        await self._pull()

    # -- continuous pull ---------------------------------------------------------------
    # Pull requests ask for as many messages as there are free handler slots; the
    # server delivers each one the moment it exists and the handler starts at once
    # (no waiting for a batch to fill, no client-side linger). Requests expire after
    # PULL_EXPIRES; the server then says how many it did not deliver (408), and we ask
    # again. A watchdog re-asks if a request was lost (e.g. across a reconnect).
    PULL_EXPIRES = 2.0
    STOP_TIMEOUT = 30.0  # after a stop's grace: how long cancelled handlers get to wind up

    async def _pull(self) -> None:
        if self._stopping.is_set():
            return
        free = self.concurrency - len(self._inflight) - self._outstanding
        if free <= 0 or (self._outstanding and free < max(1, self.concurrency // 2)):
            return  # enough is on its way; ask again when more slots are free
        self._outstanding += free
        self._asked_at = time.monotonic()
        request = {"batch": free, "expires": int(self.pull_expires * 1e9)}
        try:
            await self.nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        except (nats.errors.Error, OSError) as e:
            self._outstanding -= free
            log.warning("actor.pull_failed", actor=self.name, error=str(e))

    def _pull_soon(self, *_: object) -> None:
        if not self._stopping.is_set():
            asyncio.ensure_future(self._pull())

    async def _on_delivery(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            if status in ("408", "409"):  # request expired / ended: what was not delivered
                missing = msg.headers.get("Nats-Pending-Messages")
                self._outstanding = max(0, self._outstanding - int(missing)) if missing else 0
                await self._pull()
            return  # 100 = idle heartbeat
        self._outstanding = max(0, self._outstanding - 1)
        self._delivered_at = time.monotonic()
        task = asyncio.create_task(self._handle(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(self._pull_soon)

    async def _watchdog(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.PULL_EXPIRES + 0.5)
            quiet = time.monotonic() - max(self._asked_at, self._delivered_at)
            reconnects = self.nc.stats.get("reconnects", 0)
            if self._outstanding and (quiet > self.pull_expires + 0.5 or reconnects != self._reconnects):
                self._outstanding = 0  # the request's end never came, or went with the connection: ask afresh
            self._reconnects = reconnects
            await self._pull()

    async def _handle(self, msg: Msg) -> None:
        try:
            delivered = msg.metadata.num_delivered
            seq = msg.metadata.sequence.stream
            try:
                # a consumer span, child of the trace the message carries
                with self.telemetry.handling(f"{self.name} handle", msg, **{"ccc.consumer": self.durable,
                                                                            "ccc.delivery": delivered}):
                    await self.handler(msg)
            except DomainError as e:
                log.info("actor.decision_refused", actor=self.name, seq=seq, subject=msg.subject, reason=str(e))
            except BadEventError as e:
                log.warning("actor.poison_message", actor=self.name, seq=seq, subject=msg.subject, error=str(e))
                self.failed += 1
                await self._dead_letter(msg, "poison", str(e))
                await msg.term()
                return
            except Refused as e:
                log.warning("actor.refused", actor=self.name, seq=seq, subject=msg.subject, reason=str(e))
                self.refused += 1
                await self._dead_letter(msg, "refused", str(e))
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
                    await msg.nak(delay=backoff(delivered, 0.2, 10.0))  # 0.2, 0.4, 0.8, … 10 s
                return
            await msg.ack()
            self.handled += 1
        except (nats.errors.Error, OSError) as e:
            # the ack could not be sent: the message will be redelivered, and the
            # handler's appends are idempotent, so this is safe
            log.warning("actor.ack_failed", actor=self.name, error=str(e))

    async def _dead_letter(self, msg: Msg, reason: str, error: str) -> None:
        md = msg.metadata
        if not self.write_dead_letters:
            log.error("actor.message_dropped", actor=self.name, stream=md.stream, seq=md.sequence.stream,
                      subject=msg.subject, reason=reason, error=error[:500])
            return
        letter = DeadLetter(
            stream=md.stream, seq=md.sequence.stream, subject=msg.subject, consumer=self.durable,
            reason=reason, error=error[:2000], deliveries=md.num_delivered,
            at=datetime.now(timezone.utc), size=len(msg.data),
            preview=msg.data[:500].decode("utf-8", errors="replace"),
        )
        self.dead_letters += 1
        try:
            # masked like every event: its preview is the message's own text
            await self.js.publish(self.dlq_subject, masked_json(letter), headers={"Nats-Msg-Id": letter.dedup_id})
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
            # keep the message for redelivery rather than lose the reason
            log.error("actor.dead_letter_failed", actor=self.name, seq=letter.seq, error=str(e))
            raise

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        if self._sub is not None:  # stop taking work: no more deliveries to us
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await cancel_and_wait([self._task])
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            # cancelled once: a cancelled handler may still report (an agent hands its
            # task back), which a second cancel would cut short
            await cancel_and_wait(pending, timeout=self.STOP_TIMEOUT, recancel=None)
