"""The one secret masker, and the registry of the secrets this process knows.

Everything kept or shown goes through it before it is written: every string field of
every event (the event store masks at its boundary, :meth:`Masker.struct`), every
artifact (diffs, test logs, transcripts), the prompts a model is sent, every log line
(:mod:`infra.adapters.obs.logs`) and the error texts that reach any of those.

    masker = process_masker()
    masker.text(transcript)            # a text
    masker.struct(event)               # every string in a msgspec Struct, recursively
    masker.findings(diff)              # what secrets a text holds: refuse to push it
    add_secrets(installation_token)    # a secret obtained at run time

Two kinds of rule, and why they differ:

* **what is certainly a secret**, and is refused wherever it would leave (a change with
  one is not pushed, :meth:`Masker.findings`): the values the process knows (those of
  secret-named environment variables, ``ANTHROPIC_API_KEY``, ``GITHUB_TOKEN``,
  ``CCC_API_TOKEN``..., read when logging is configured; and what the process reads or
  mints at run time: the NATS seed, the forge token, an App's installation tokens,
  registered by whoever gets them with :func:`add_secrets`), and credential *formats*
  that ordinary text never matches by accident: Anthropic keys (``sk-ant-``), GitHub tokens (``ghp_``, ``gho_``,
  ``ghu_``, ``ghs_``, ``ghr_``, ``github_pat_``), AWS access key ids, Slack tokens,
  JWTs, NATS nkey seeds, PEM private-key blocks;
* **what is probably a secret, by its context**: an ``Authorization`` header's value, a
  password in a URL, a token as a NATS URL's user, ``?access_token=``-style parameters,
  ``Bearer <x>``. Masked, never a reason to refuse: source code is full of
  ``password=password`` and ``Bearer {token}`` that are not secrets.

This module is pure (no I/O; the environment is read only when a caller asks, at
construction); it sits in ``events`` because the event store, the bottom layer, masks
with it. The process's masker is the one global here: it is what "the secrets this
process knows" means, and a store, an artifact writer or a log processor built anywhere
must see the same values without being handed them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import msgspec

MASK = "***"
# Names whose values are secrets although they do not end in _TOKEN/_KEY/_SECRET/...
SECRET_ENV_NAMES = frozenset({
    "ANTHROPIC_API_KEY", "GITHUB_TOKEN", "GH_TOKEN", "CCC_WEBHOOK_SECRET",
    "NATS_TOKEN", "NATS_PASSWORD", "NATS_NKEY", "NATS_NKEY_SEED", "NATS_JWT", "NATS_USER_JWT",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "GITHUB_APP_PRIVATE_KEY",
})
_SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD", "_CREDENTIALS")
MIN_ENV_SECRET_LEN = 8  # shorter env values ("1", "true") would mangle ordinary text

# -- certain: credential formats -------------------------------------------------------
# (kind, pattern, replacement). Each kind is named in a refusal ("the change contains a
# GitHub token"), so an operator knows what to look for without seeing it.
_PEM = re.compile(r"(-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----)"
                  # up to its END line; a block cut short (a clipped log) is masked to the end
                  r"(?:[\s\S]*?(-----END \2-----)|[\s\S]*)")
TOKEN_FORMATS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("a private key (PEM)", _PEM, r"\1" + MASK + r"\3"),
    ("an Anthropic API key", re.compile(r"sk-ant-[A-Za-z0-9_-]{8,}"), MASK),
    # no word boundary: tokens glued to other text ("token:ghp_...", "\nghp_...") too
    ("a GitHub token", re.compile(r"gh[pousr]_[A-Za-z0-9_]{20,}|github_pat_[A-Za-z0-9_]{20,}"), MASK),
    ("an AWS access key id", re.compile(r"\bAKIA[0-9A-Z]{16}\b"), MASK),
    ("a Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
    # header.payload.signature, both JSON objects: a NATS user JWT, an App's JWT, any bearer JWT
    ("a JWT", re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MASK),
    # S + the key type (User, Account, Operator, server (N), Cluster, curve (X)) + base32:
    # the private half of NATS credentials
    ("a NATS nkey seed", re.compile(r"S[UAONCXP][A-Z2-7]{56}"), MASK),
)
# -- probable: by context ------------------------------------------------------------------
CONTEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(?<=authorization: )(bearer|token|basic) [^\s'\"]+"), MASK),
    # a password in a URL: https://user:s3cr3t@host (up to the last "@" before the host,
    # so a password with an "@" in it goes whole)
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s]+(?=@)"), MASK),
    # a token as the user part of a NATS URL: nats://s3cr3t@host:4222
    (re.compile(r"(?i)\b((?:nats|tls|wss?)://)[^/\s@]+@"), r"\1" + MASK + "@"),
    # token-ish query/form parameters: ?access_token=..., &password=...; a bare "key=" only
    # as a URL parameter (``sorted(x, key=len)`` is code, not a credential)
    (re.compile(r"(?i)((?:\b(?:access_|refresh_|api_|auth_|client_)?(?:token|secret|password|passwd)"
                r"|\b(?:api_?|auth_|access_|secret_)key|[?&]key)=)[^&\s\"'#]+"), r"\1" + MASK),
    # a bearer credential without its header name ("Bearer abc...")
    (re.compile(r"\b((?i:bearer)\s+)[^\s'\",;]{8,}"), r"\1" + MASK),
)
# A cheap test whether any rule *could* match (on text, or on the JSON of an event): the
# literal anchors of the rules above, looked for in the lowercased text, loosened (no
# word boundaries: JSON escapes such as "\n" glue letters together). Substring searches,
# grouped so that a typical event costs about a dozen of them (~5 us for 500 bytes; one
# regex alternation of the same anchors costs ~50 us). A false positive only costs a
# full pass.
_ANCHORS = ("-----begin", "sk-ant-", "akia", "xox", "eyj", "authorization", "bearer")
_PARAM_ANCHORS = ("token=", "key=", "secret=", "passw")  # only looked for when there is a "="
_GITHUB_ANCHOR = re.compile(r"g(?:h[pousr]_|ithub_pat_)")  # a literal prefix: one fast scan
_SEED_ANCHOR = re.compile(r"S[UAONCXP][A-Z2-7]{56}")  # (on the text as it is: case matters)
_BYTES = {"anchors": tuple(a.encode() for a in _ANCHORS),
          "params": tuple(a.encode() for a in _PARAM_ANCHORS),
          "github": re.compile(_GITHUB_ANCHOR.pattern.encode()),
          "seed": re.compile(_SEED_ANCHOR.pattern.encode())}
# dict keys whose string values are secrets whatever they look like
_SECRET_KEYS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "password",
                          "passwd", "secret", "token", "api_key", "apikey", "x-api-key", "private_key"})
# Envelope fields an event's subject and dedup id are made of: masking them would file the
# event under another subject (unreadable) while the subject itself still carried the
# text. Ids are validated tokens (``events.subjects.check_id``), never free text.
IDENTITY_FIELDS = frozenset({"event_id", "task_id", "agent_id", "correlation_id", "causation_id",
                             "source", "repo"})  # (an issue fact's subject: source, repo, number)
_PRIMITIVE = (int, float, bool, type(None))
_CACHED_LEN, _CACHE_SIZE = 200, 4096


def secret_env_name(name: str) -> bool:
    """Names whose *values* are secrets (masked everywhere, and never passed to a
    workspace command)."""
    upper = name.upper()
    return upper.endswith(_SECRET_SUFFIXES) or upper in SECRET_ENV_NAMES


def secret_key(key: Any, value: Any) -> bool:
    """A mapping entry whose value is a secret by its key's name (``password``, ...)."""
    return (isinstance(value, str) and bool(value) and isinstance(key, str)
            and (key.lower() in _SECRET_KEYS or secret_env_name(key)))


class Finding(NamedTuple):
    """A secret found in a text: what kind, and the line it is on, masked (fit to show)."""

    kind: str
    line: str


class Masker:
    """The secrets to mask and how: the values of secret-looking variables of
    ``environ`` (``os.environ`` when None) as they are at construction, plus
    ``secrets``, plus :meth:`add`; and the rules above."""

    def __init__(self, secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        values = {v for k, v in env.items() if secret_env_name(k) and len(v) >= MIN_ENV_SECRET_LEN}
        values.update(s for s in secrets if s)  # chosen explicitly by the caller: any length
        self._values: tuple[str, ...] = ()
        self.add(*values)

    def add(self, *secrets: str) -> None:
        values = tuple(sorted(set(self._values) | {s for s in secrets if s}, key=len, reverse=True))
        # for the precheck: every known value also as JSON spells it (an event is checked
        # in its encoded form). Assigned before the values and the emptied cache: a call on
        # another thread (a token minted in a worker thread) never sees a value it cannot
        # find yet.
        spelled = {v for s in values for v in (s, msgspec.json.encode(s).decode()[1:-1])}
        self._spelled_bytes = tuple(v.encode() for v in spelled)
        self._spelled = tuple(spelled)
        self._values = values  # longest first: no partial leftovers
        self._cache: dict[str, str] = {}

    # -- text ------------------------------------------------------------------------
    def may_hold(self, text: str | bytes) -> bool:
        """False when no rule and no known value can match ``text`` (a str, or the
        UTF-8 bytes of an encoded event): the fast path that keeps masking every event
        cheap."""
        if isinstance(text, bytes):
            anchors, params = _BYTES["anchors"], _BYTES["params"]
            github, seed = _BYTES["github"], _BYTES["seed"]
            values, equals, scheme, at = self._spelled_bytes, b"=", b"://", b"@"
        else:
            anchors, params, github, seed = _ANCHORS, _PARAM_ANCHORS, _GITHUB_ANCHOR, _SEED_ANCHOR
            values, equals, scheme, at = self._spelled, "=", "://", "@"
        low = text.lower()
        for anchor in anchors:
            if anchor in low:
                return True
        if equals in low:
            for anchor in params:
                if anchor in low:
                    return True
        if at in low and scheme in low:  # credentials in a URL
            return True
        for value in values:
            if value in text:
                return True
        return github.search(low) is not None or seed.search(text) is not None

    def text(self, text: str) -> str:
        """``text`` with every secret in it replaced by ``***``."""
        # log lines repeat most of their strings (event names, actors, subjects): remember
        # short ones; the cache is dropped whenever the secrets change
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        masked = text
        if self.may_hold(text):
            for value in self._values:
                masked = masked.replace(value, MASK)
            for _kind, pattern, repl in TOKEN_FORMATS:
                masked = pattern.sub(repl, masked)
            for pattern, repl in CONTEXT_RULES:
                masked = pattern.sub(repl, masked)
        if len(text) <= _CACHED_LEN:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[text] = masked
        return masked

    __call__ = text

    def findings(self, text: str) -> list[Finding]:
        """The certain secrets in ``text`` (known values and credential formats, not the
        context rules), one per kind and line, each with its line masked."""
        if not self.may_hold(text):
            return []
        found: list[Finding] = []
        seen: set[tuple[str, int]] = set()

        def record(kind: str, start: int) -> None:
            line_start = text.rfind("\n", 0, start) + 1
            if (kind, line_start) in seen:
                return
            seen.add((kind, line_start))
            end = text.find("\n", start)
            line = text[line_start:None if end < 0 else end]
            found.append(Finding(kind, self.text(line).strip()[:160]))

        for value in self._values:
            start = text.find(value)
            while start >= 0:
                record("a secret this process holds", start)
                start = text.find(value, start + len(value))
        for kind, pattern, _repl in TOKEN_FORMATS:
            for m in pattern.finditer(text):
                record(kind, m.start())
        return found

    # -- values ----------------------------------------------------------------------
    def value(self, value: Any) -> Any:
        """Mask recursively (as a log line's values are); objects are kept as they are
        unless their repr holds a secret."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, _PRIMITIVE):
            return value
        if isinstance(value, dict):
            return {k: MASK if secret_key(k, v) else self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v) for v in value]
        if isinstance(value, msgspec.Struct):
            return self.struct(value)
        if isinstance(value, BaseException):
            shown = f"{type(value).__name__}: {value}"
            masked = self.text(shown)
            return masked if masked != shown else value
        shown = repr(value)
        masked = self.text(shown)
        return masked if masked != shown else value

    def struct(self, obj: msgspec.Struct, *, keep: frozenset[str] = IDENTITY_FIELDS) -> msgspec.Struct:
        """``obj`` with every string in it masked: its fields, and those of the Structs,
        tuples, lists and dicts (keys too) it holds, at any depth. Types and the JSON
        shape are unchanged; ``obj`` itself is returned when nothing needed masking (the
        common case costs no allocation). The top level's ``keep`` fields (the identity
        an event is filed under) are left as they are."""
        changes = {}
        for name in obj.__struct_fields__:
            if name in keep:
                continue
            current = getattr(obj, name)
            masked = self._walk(current)
            if masked is not current:
                changes[name] = masked
        return msgspec.structs.replace(obj, **changes) if changes else obj

    def _walk(self, v: Any) -> Any:
        if isinstance(v, str):
            masked = self.text(v)
            return v if masked == v else masked
        if isinstance(v, _PRIMITIVE):
            return v
        if isinstance(v, msgspec.Struct):
            return self.struct(v, keep=frozenset())
        if isinstance(v, (tuple, list)):
            items = [self._walk(x) for x in v]
            return v if all(a is b for a, b in zip(items, v)) else type(v)(items)
        if isinstance(v, dict):
            pairs = [(self._walk(k), self._walk(x)) for k, x in v.items()]
            same = all(k is k0 and x is x0 for (k, x), (k0, x0) in zip(pairs, v.items()))
            return v if same else dict(pairs)
        return v  # datetimes, numbers: nothing to mask


_encoder = msgspec.json.Encoder()


def masked_json(obj: msgspec.Struct, masker: Masker | None = None) -> bytes:
    """``obj`` as JSON, every secret in its strings masked (:meth:`Masker.struct`), by
    ``masker`` or the process's: what every writer to the log stores. When the encoded
    bytes cannot hold a secret (:meth:`Masker.may_hold`, one cheap pass), they are the
    answer as they are."""
    masker = masker or _process_masker
    data = _encoder.encode(obj)
    if masker.may_hold(data):
        masked = masker.struct(obj)
        if masked is not obj:
            data = _encoder.encode(masked)
    return data


def mask_secrets(text: str, extra: Iterable[str] = (), *, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with its secrets replaced by ``***``: those of ``environ`` (``os.environ``
    when None) as it is now, the ``extra`` values, and those the process knows."""
    masked = Masker(extra, environ).text(text)
    return _process_masker.text(masked)


# -- the process's masker: what the store, the artifacts, the prompts and the logs use -----
_added: set[str] = set()  # what add_secrets registered: kept across a reset
_process_masker = Masker(environ={})


def process_masker() -> Masker:
    return _process_masker


def reset_process_masker(secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> Masker:
    """Start over from ``environ`` (``os.environ`` when None) and ``secrets``
    (``configure_logging`` does, once the environment is known). Values added at run
    time (:func:`add_secrets`) are kept: a reconfiguration must not forget a token."""
    global _process_masker
    _process_masker = Masker([*secrets, *_added], environ)
    return _process_masker


def add_secrets(*values: str) -> None:
    """Mask these values from now on, everywhere in this process (a token obtained at
    run time, a seed read from a file, ...)."""
    fresh = {v for v in values if v} - _added
    if fresh:
        _added.update(fresh)
        _process_masker.add(*fresh)


def forget_added_secrets() -> None:
    """Drop the values :func:`add_secrets` registered (tests isolate themselves with it)."""
    global _process_masker
    _added.clear()
    _process_masker = Masker(environ={})


__all__ = ["CONTEXT_RULES", "IDENTITY_FIELDS", "MASK", "MIN_ENV_SECRET_LEN", "SECRET_ENV_NAMES",
           "TOKEN_FORMATS", "Finding", "Masker", "add_secrets", "forget_added_secrets", "mask_secrets",
           "masked_json", "process_masker", "reset_process_masker", "secret_env_name", "secret_key"]
