"""Artifact references and digests: one format each, the object store's own.

Events never carry a large output (a diff, a test log, a model transcript): the output
goes to the JetStream object store and the event carries a *reference* to it, and for
the diff a *digest* of the bytes stored.

**A reference is the two arguments of ``nats object get``**: ``"<bucket> <name>"``, the
object store bucket, one space, the object's name. So a reference copied out of an event
(``nats stream view``, ``nats kv get <ns>_tasks``, ``ccc events --json``) is fetched as
written::

    nats object get ccc_artifacts_agent_1 diffs/acme_app-7/1.diff     # -> ./1.diff
    nats object info ccc_artifacts_agent_1 diffs/acme_app-7/1.diff    # size, digest
    nats object get $(jq -r .diff_ref <<<"$TASK_JSON")                # unquoted: two words

A space, because no separator inside one word can be handed to the CLI as written (it
takes the bucket and the name as two arguments), and neither part can contain one:
bucket names are ``[A-Za-z0-9_-]`` only, and the names the cluster gives its objects
(``diffs/<task>/<attempt>.diff``, ``logs/...``, ``transcripts/...``, ``ci/...``) are
paths without whitespace (:func:`artifact_ref` refuses any other).

**A digest is the object store's**: ``"SHA-256=<base64url of the 32 bytes>"``, exactly
what the object store records for the object (its ``ObjectInfo.digest``, in every
client, and the ``digest`` of its meta message, which ``nats stream view OBJ_<bucket>``
shows), so a reader compares the two strings. ``nats object info`` prints the same
digest as ``SHA-256 <hex>`` (the same bytes, hex-encoded): :func:`digest_hex` gives that.

**Older events** (before this format): references were ``"<bucket>/<name>"`` (the bucket
is everything before the first ``/``: bucket names have none) and digests
``"sha256:<hex>"``. :func:`upcast_artifacts` rewrites them to the current formats when
an old event is read (:mod:`events.codec`), so every reader sees one format;
:func:`split_ref` reads both, for a reference that reached a reader some other way.
"""

from __future__ import annotations

import base64
import hashlib
import re
import typing
from typing import Any, NamedTuple

import msgspec

from events.errors import ConfigError

DIGEST_ALGORITHM = "SHA-256"
"""The object store's digest algorithm and the prefix of its digests (``SHA-256=``)."""

REF_FIELDS: tuple[str, ...] = ("diff_ref", "log_ref", "transcript_ref")
"""Every field of an event (or of a :class:`~events.checks.CheckRun` in it) that holds an
artifact reference. (``queue_ref`` is a git ref of the merge queue, not an artifact.)"""

DIGEST_FIELDS: tuple[str, ...] = ("diff_digest",)
"""Every field that holds an artifact's digest."""

_BUCKET = re.compile(r"[A-Za-z0-9_-]{1,255}")  # the object store's bucket names
_NAME = re.compile(r"[^\s/]\S{0,1023}")  # a path without whitespace, not absolute
_LEGACY_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
# (JSON as anyone may write it: whitespace around the colon, "/" escaped as "\/")
_LEGACY_BYTES = re.compile(rb'"(?:diff_ref|log_ref|transcript_ref)"\s*:\s*"[A-Za-z0-9_-]+\\?/|"diff_digest"\s*:\s*"sha256:')


class ObjectRef(NamedTuple):
    """Where an artifact is: what ``nats object get`` takes, in its order."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"{self.bucket} {self.name}"

    @property
    def command(self) -> str:
        """The ``nats`` command that fetches it (into ``./<base name>``)."""
        return f"nats object get {self.bucket} {self.name}"


# -- references --------------------------------------------------------------------------
def artifact_ref(bucket: str, name: str) -> str:
    """The reference of object ``name`` in ``bucket``; :class:`ConfigError` for a bucket
    or a name the format cannot carry (whitespace, an absolute or empty name)."""
    if not _BUCKET.fullmatch(bucket or ""):
        raise ConfigError(f"invalid object store bucket {bucket!r}: letters, digits, '_', '-'")
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"invalid artifact name {name!r}: a relative path without whitespace")
    return f"{bucket} {name}"


def split_ref(ref: str) -> ObjectRef:
    """A reference, current (``"<bucket> <name>"``) or older (``"<bucket>/<name>"``), as
    its bucket and name; :class:`ConfigError` if it is neither."""
    ref = (ref or "").strip()
    bucket, sep, name = ref.partition(" ")
    if not sep:
        bucket, sep, name = ref.partition("/")
    if not sep or not _BUCKET.fullmatch(bucket) or not _NAME.fullmatch(name):
        raise ConfigError(f"invalid artifact reference {ref!r}: expected '<bucket> <name>'")
    return ObjectRef(bucket, name)


def upgrade_ref(ref: str) -> str:
    """``ref`` in the current format: an older ``"<bucket>/<name>"`` rewritten, anything
    else (current, empty, not a reference at all) as it is. Never raises: it runs on read,
    and a value it does not understand is left for the reader to judge."""
    if not ref or " " in ref:
        return ref
    try:
        return str(split_ref(ref))
    except ConfigError:
        return ref


# -- digests -----------------------------------------------------------------------------
def object_digest(data: bytes) -> str:
    """The digest the object store records for ``data`` (``ObjectInfo.digest``)."""
    raw = hashlib.sha256(data).digest()
    return f"{DIGEST_ALGORITHM}={base64.urlsafe_b64encode(raw).decode()}"


def upgrade_digest(digest: str) -> str:
    """``digest`` in the object store's format: an older ``"sha256:<hex>"`` rewritten
    (the same 32 bytes), anything else as it is (never raises: see :func:`upgrade_ref`)."""
    m = _LEGACY_DIGEST.fullmatch(digest or "")
    if m is None:
        return digest
    return f"{DIGEST_ALGORITHM}={base64.urlsafe_b64encode(bytes.fromhex(m.group(1))).decode()}"


def digest_hex(digest: str) -> str:
    """How ``nats object info`` prints ``digest``: ``SHA-256 <hex>``; :class:`ConfigError`
    for a value that is no object store digest."""
    algorithm, sep, encoded = (digest or "").partition("=")
    try:
        raw = base64.urlsafe_b64decode(encoded) if sep and algorithm == DIGEST_ALGORITHM else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"invalid object store digest {digest!r}: expected 'SHA-256=<base64url>'")
    return f"{DIGEST_ALGORITHM} {raw.hex()}"


# -- older events ----------------------------------------------------------------------
def _holds_artifacts(tp: Any, seen: set) -> bool:
    """Whether values of type ``tp`` may hold a reference or a digest, at any depth."""
    if tp in seen:
        return False
    seen.add(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return any(f.name in REF_FIELDS or f.name in DIGEST_FIELDS or _holds_artifacts(f.type, seen)
                   for f in msgspec.structs.fields(tp))
    return any(_holds_artifacts(arg, seen) for arg in typing.get_args(tp))


def artifact_tags(*unions: Any) -> list[str]:
    """The ``type`` tags of the event types (members of ``unions``) that carry a reference
    or a digest, directly or in their checks: the types whose older payloads
    :func:`upcast_artifacts` brings up to date."""
    tags: list[str] = []
    for union in unions:
        for member in typing.get_args(union) or (union,):
            tag = member.__struct_config__.tag
            if isinstance(tag, str) and tag not in tags and _holds_artifacts(member, set()):
                tags.append(tag)
    return tags


def has_legacy_artifacts(data: bytes) -> bool:
    """Whether an encoded event may hold a reference or a digest in an older format (a
    cheap byte search: the codec upcasts only the events it finds)."""
    return _LEGACY_BYTES.search(data) is not None


def upcast_artifacts(payload: dict[str, Any]) -> dict[str, Any]:
    """An event's JSON object (decoded, not yet typed) with its references and digests
    in the current formats, its checks' log references included. Pure: returns a new
    object, changes nothing else, and leaves a current event as it is."""
    out = dict(payload)
    for field in REF_FIELDS:
        if isinstance(out.get(field), str):
            out[field] = upgrade_ref(out[field])
    for field in DIGEST_FIELDS:
        if isinstance(out.get(field), str):
            out[field] = upgrade_digest(out[field])
    checks = out.get("checks")
    if isinstance(checks, list):
        out["checks"] = [upcast_artifacts(c) if isinstance(c, dict) else c for c in checks]
    return out


__all__ = ["DIGEST_ALGORITHM", "DIGEST_FIELDS", "REF_FIELDS", "ObjectRef", "artifact_ref", "artifact_tags", "digest_hex",
           "has_legacy_artifacts", "object_digest", "split_ref", "upcast_artifacts", "upgrade_digest",
           "upgrade_ref"]
