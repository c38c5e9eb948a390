"""The cluster's shared settings: values every process must see the same, in the KV
bucket ``<ns>_config`` (:func:`~infra.adapters.nats.provisioning.config_bucket`).

``budget`` holds the spend caps (:class:`events.spend.Caps`), set by ``ccc up``'s flags
and changed while the cluster runs with ``ccc budget set``; ``fairness`` holds the
coordinator's admission policy (:class:`projections.fairness.FairnessPolicy`), so that
``ccc tasks`` run anywhere explains waits with the policy the scheduler applies.

Values are JSON (``nats kv get <ns>_config budget`` reads them). A value that does not
decode is a :class:`~events.errors.ConfigError` naming the key — never silently a
default, which for a cap would mean "no cap".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace
from infra.adapters.nats.provisioning import config_bucket

BUDGET = "budget"
FAIRNESS = "fairness"
_CAS_ATTEMPTS = 20
T = TypeVar("T", bound=msgspec.Struct)


def decode_setting(key: str, data: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
        raise ConfigError(f"cluster setting {key!r} is not valid: {e}") from None


async def _kv(nc: Client, ns: Namespace, timeout: float):
    try:
        return await nc.jetstream(timeout=timeout).key_value(config_bucket(ns))
    except nats.js.errors.BucketNotFoundError:
        raise ConfigError(f"bucket {config_bucket(ns)} is missing: provisioning is an admin step "
                          "(`ccc server`, `ccc up`)") from None


async def read_setting(nc: Client, ns: Namespace, key: str, type_: type[T], *, timeout: float = 5.0) -> T | None:
    """The setting, or None when it was never set (also when the bucket does not exist
    yet: a cluster provisioned before it had settings has none)."""
    try:
        kv = await nc.jetstream(timeout=timeout).key_value(config_bucket(ns))
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return None
    except (nats.errors.Error, TimeoutError) as e:
        raise StoreUnavailable(f"reading cluster setting {key!r}: {type(e).__name__}: {e}") from None
    if not entry.value:
        return None
    return decode_setting(key, entry.value, type_)


async def update_setting(nc: Client, ns: Namespace, key: str, type_: type[T],
                         change: Callable[[T | None], T], *, timeout: float = 5.0) -> T:
    """Read, change, write with compare-and-set (retried when someone wrote meanwhile);
    the value written."""
    try:
        kv = await _kv(nc, ns, timeout)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            current = decode_setting(key, entry.value, type_) if entry is not None and entry.value else None
            value = change(current)
            data = msgspec.json.encode(value)
            try:
                if entry is None:
                    await kv.create(key, data)
                else:
                    await kv.update(key, data, last=entry.revision)
                return value
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                continue
    except (nats.errors.Error, TimeoutError) as e:
        raise StoreUnavailable(f"writing cluster setting {key!r}: {type(e).__name__}: {e}") from None
    raise StoreUnavailable(f"writing cluster setting {key!r}: {_CAS_ATTEMPTS} concurrent writers in a row")


async def write_setting(nc: Client, ns: Namespace, key: str, value: msgspec.Struct, *, timeout: float = 5.0) -> None:
    """Replace the setting."""
    type_ = type(value)
    await update_setting(nc, ns, key, type_, lambda _old: value, timeout=timeout)
