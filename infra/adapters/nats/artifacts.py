"""Artifacts in the JetStream object store: the diffs, test logs and transcripts an
agent's reports refer to, kept out of the events themselves.

A put returns the artifact's reference, ``"<bucket> <name>"``: the two arguments of
``nats object get`` (:mod:`events.refs` says why that format); the name is checked
before anything is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client

from events.errors import StoreUnavailable
from events.refs import artifact_ref
from events.retry import backoff

from infra.adapters.obs.masking import mask_secrets


class ObjectStoreArtifacts:
    """A put is retried with short timeouts, so a leader election costs seconds, not a
    30 s stall. Everything is masked before it is stored (the one masker,
    :mod:`events.secrets`): artifacts are kept, and shown to whoever reads the task.
    Bytes are masked as the text they are (diffs, logs): read as UTF-8, any bytes that
    are not UTF-8 kept as they are, so nothing but a secret changes."""

    def __init__(self, nc: Client, bucket: str, *, timeout: float = 5.0, tries: int = 4,
                 mask: Callable[[str], str] = mask_secrets) -> None:
        self.js = nc.jetstream(timeout=timeout)
        self.bucket = bucket
        self.tries = tries
        self.mask = mask
        self._obs = None

    async def put(self, name: str, data: bytes) -> str:
        text = data.decode("utf-8", "surrogateescape")
        masked = self.mask(text)
        if masked != text:
            data = masked.encode("utf-8", "surrogateescape")
        return await self._put(name, data)

    async def _put(self, name: str, data: bytes) -> str:
        ref = artifact_ref(self.bucket, name)  # a name the reference cannot carry: refused first
        for attempt in range(1, self.tries + 1):
            try:
                if self._obs is None:
                    self._obs = await self.js.object_store(self.bucket)
                await self._obs.put(name, data)
                return ref
            except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
                self._obs = None
                if attempt == self.tries:
                    raise StoreUnavailable(f"object store {self.bucket}: {type(e).__name__}: {e}") from None
                await asyncio.sleep(backoff(attempt, 0.4, 5.0))  # 0.4, 0.8, 1.6 s, …
        raise AssertionError("unreachable")

    async def put_text(self, name: str, text: str) -> str:
        return await self._put(name, self.mask(text).encode())
