"""The event contract: every message type on the bus as a JSON Schema, the subject it
travels on, who writes and who reads it, and the AsyncAPI document built from them.

The system's public interface is its subjects and their payloads (users publish issue
facts with ``nats pub``, read the log with ``nats stream view``), so it is written down
as files, generated from the msgspec types themselves (:func:`msgspec.json.schema_components`)
and committed under ``events/schemas/v<N>/`` (package data: a wheel carries them):

* ``<type>.json``: one JSON Schema (2020-12) per message type, named by its ``type`` tag
  (``task.assigned.json``) or, for the two untagged messages, by their contract name
  (``heartbeat``, ``dead_letter``): ``$id``, title, the struct's docstring as the
  description, ``x-subject`` (the pattern it travels on, parameters in braces), ``x-stream``,
  ``x-kind`` and ``x-format-version`` (see below);
* ``index.json``: every type with its subject, stream, schema file, and the roles that may
  write it (publish) and read it, *derived* from the roles' NATS permissions
  (:func:`writers`, :func:`readers`; the permission table is the adapters', so the shell
  hands it in) — never written by hand.

``tests/unit/test_contract.py`` regenerates everything and compares it with the committed
files, so a change to an event type without ``ccc schema --write`` fails.

**Versions.** ``CONTRACT_VERSION`` names the directory. Changes that keep every old
payload valid and every old field (a new optional field, a new type, a wider enum) are
regenerated into the current version in place: the schema diff shows in review. A change
of a type's *format* — old payloads have to be upcast to be read (``events.codec``'s
upcasters, keyed by type tag and format version; a type's ``x-format-version`` is 1 plus
its steps) — bumps ``CONTRACT_VERSION``: the previous directory stays as it was, the
baseline the evolution check (:func:`evolution_problems`) compares the types with, and
``ccc schema --write`` refuses to write such a change into a released version. Never
allowed, upcaster or not: removing a field or a type, moving a type to another subject,
reusing a tag. A new required field or a changed field type is allowed only where
upcasters bring the old payloads up to date.

The AsyncAPI 3.0 document (:func:`asyncapi_document`) is built from the same files: one
channel per subject pattern, a ``send`` operation tagged with the roles that write it and
a ``receive`` operation with those that read it, the payload schemas, and the NATS
headers. The status API serves the committed one (``/asyncapi.json``); ``ccc schema
--asyncapi`` prints it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from functools import cache
from itertools import product
from pathlib import Path
from typing import Any, Protocol, get_args

import msgspec

from events.agent import AgentEvent, AgentEventBase, Heartbeat
from events.cluster import ClusterEvent, ClusterEventBase, cluster_stream
from events.codec import SCHEMA_VERSION, UPCASTERS, Event, Upcasters
from events.dead_letter import DeadLetter
from events.issue import IssueEvent, IssueEventBase
from events.store import EXPECTED_SEQ, EXPECTED_SEQ_SUBJECT, MSG_ID
from events.subjects import DEFAULT_NS, SOURCE_PREFIXES, Namespace, agent_subject, task_subject
from events.task import TaskEventBase

CONTRACT_VERSION = 2
"""The version of the contract the code speaks: ``events/schemas/v<CONTRACT_VERSION>/``."""

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:claude-code-cluster:events"
ASYNCAPI_VERSION = "3.0.0"
TRACEPARENT = "traceparent"


# -- the kinds of message and their types ----------------------------------------------
class Kind(msgspec.Struct, frozen=True, kw_only=True):
    about: str
    stream: Callable[[Namespace], str]


KINDS: dict[str, Kind] = {
    "issue fact": Kind(
        about="A fact about an issue, its pull request or its repository, from outside the cluster "
              "(the GitHub webhook, the CLI, the local forge's CI, or `nats pub`): an observation, not "
              "an aggregate of ours. `event_id` is its deduplication id; the payload's `source`, `repo`, "
              "`number` and `type` must be the subject's tokens.",
        stream=lambda ns: ns.issues_stream),
    "task event": Kind(
        about="An event of the task aggregate: appended with optimistic concurrency on the task's "
              "subjects, so two writers can never both decide the task's next step.",
        stream=lambda ns: ns.events_stream),
    "agent event": Kind(
        about="An event of the agent aggregate: its state changes and the report of each phase of "
              "the work it does on a task.",
        stream=lambda ns: ns.events_stream),
    "heartbeat": Kind(
        about="An agent's liveness signal, not a state transition: the stream keeps the last one per "
              "agent. It carries no `type` field.",
        stream=lambda ns: ns.heartbeats_stream),
    "cluster event": Kind(
        about="A decision of the autoscaler (the fleet grew or shrank, and why), kept in a stream of "
              "its own: no task or agent state depends on it.",
        stream=cluster_stream),
    "dead letter": Kind(
        about="A message an actor could not process (poison, given up after its redeliveries, or "
              "refused by policy), parked with the reason; the original stays in its stream. It "
              "carries no `type` field.",
        stream=lambda ns: ns.dlq_stream),
}


class WireType(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the ``type`` tag; for an untagged message, its contract name
    cls: type
    kind: str
    subject: str  # relative to the namespace, parameters in braces

    @property
    def tagged(self) -> bool:
        return self.cls.__struct_config__.tag is not None


SUBJECT_OVERRIDES: dict[str, str] = {
    "task.assigned": task_subject("{task_id}", "assigned", "{agent_id}"),
}
"""The types whose subject is not their aggregate's ``<id>.<event>`` (their
``rel_subject`` says so; :func:`wire_types` refuses one that is not listed here)."""

_BASES: dict[str, tuple[type, Callable[[str], str]]] = {
    "issue fact": (IssueEventBase,
                   lambda tag: f"issue.{{source}}.{{repo}}.{{number}}.{tag.split('.', 1)[1]}"),
    "task event": (TaskEventBase, lambda tag: task_subject("{task_id}", tag.removeprefix("task."))),
    "agent event": (AgentEventBase, lambda tag: agent_subject("{agent_id}", tag.removeprefix("agent."))),
    "cluster event": (ClusterEventBase, lambda tag: f"cluster.{tag.removeprefix('cluster.')}"),
}


def _tagged(kind: str, classes: tuple[type, ...]) -> list[WireType]:
    base, subject_of = _BASES[kind]
    out = []
    for cls in classes:
        tag = cls.__struct_config__.tag
        if cls.rel_subject is not base.rel_subject and tag not in SUBJECT_OVERRIDES:
            raise TypeError(f"{cls.__name__} has a subject of its own: add {tag!r} to "
                            "events.contract.SUBJECT_OVERRIDES")
        out.append(WireType(name=tag, cls=cls, kind=kind, subject=SUBJECT_OVERRIDES.get(tag) or subject_of(tag)))
    return out


@cache
def wire_types() -> tuple[WireType, ...]:
    """Every message type that travels on the cluster's subjects, in contract order: the
    members of the unions the codecs decode, the heartbeat and the dead letter."""
    rel = DEFAULT_NS.rel
    events = get_args(Event)
    return (
        *_tagged("issue fact", get_args(IssueEvent)),
        *_tagged("task event", tuple(t for t in events if issubclass(t, TaskEventBase))),
        *_tagged("agent event", get_args(AgentEvent)),
        WireType(name="heartbeat", cls=Heartbeat, kind="heartbeat",
                 subject=rel(DEFAULT_NS.heartbeat_subject("{agent_id}"))),
        *_tagged("cluster event", get_args(ClusterEvent)),
        WireType(name="dead_letter", cls=DeadLetter, kind="dead letter",
                 subject=rel(DEFAULT_NS.dlq_subject("{consumer}"))),
    )


# -- subject parameters ------------------------------------------------------------------
SAMPLE_AGENT = "agent-1"
"""The agent id the agent role's permissions are derived for (an agent writes under its own)."""


class Parameter(msgspec.Struct, frozen=True, kw_only=True):
    description: str
    samples: tuple[str, ...]  # values the writers are derived over; more than one: named in "only"
    enum: tuple[str, ...] = ()  # every value there is (none: any token)


PARAMETERS: dict[str, Parameter] = {
    "source": Parameter(
        description="Where the issue lives: `local` (the local forge: the CLI, its CI, `nats pub`) or "
                    "`github` (the webhook receiver).",
        samples=tuple(SOURCE_PREFIXES), enum=tuple(SOURCE_PREFIXES)),
    "repo": Parameter(
        description="The repository as one token: `owner_name` (`acme/app` is `acme_app`; owners "
                    "have no `_`, so the first `_` splits them; other characters become `=`).",
        samples=("demo_shop",)),
    "number": Parameter(
        description="The issue number; 0 for a fact about the repository itself (`base_moved`).",
        samples=("1",)),
    "task_id": Parameter(
        description="The task's id, derived from its issue: `<repo>-<number>` for the local forge, "
                    "`gh-<repo>-<number>` for GitHub.",
        samples=("demo_shop-1",)),
    "agent_id": Parameter(
        description="The agent's id: letters, digits, `_`, `-`, `=` (at most 128).",
        samples=(SAMPLE_AGENT,)),
    "consumer": Parameter(
        description="The durable consumer that parked the message.",
        samples=("coordinator-intake",)),
}


def placeholders(pattern: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\{(\w+)\}", pattern))


# -- who may write and read a subject: derived from the roles' permissions --------------------
class Grants(Protocol):
    """A role's NATS permissions (``infra.adapters.nats.permissions.Permissions``)."""

    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    subscribe_deny: tuple[str, ...]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or token not in ("*", sub[i]):
            return False
    return len(pat) == len(sub)


def permitted(allow: tuple[str, ...], deny: tuple[str, ...], subject: str) -> bool:
    """What nats-server decides: allowed by a pattern, and denied by none (a deny wins)."""
    return any(subject_matches(p, subject) for p in allow) and not any(subject_matches(p, subject) for p in deny)


def superusers(grants: Mapping[str, Grants]) -> list[str]:
    """Roles that may publish anything (``>``): operators, left out of every writer list."""
    return [role for role, g in grants.items() if ">" in g.publish_allow]


def _combos(pattern: str, samples: Mapping[str, tuple[str, ...]]) -> list[dict[str, str]]:
    params = placeholders(pattern)
    return [dict(zip(params, values)) for values in product(*(samples[p] for p in params))]


def writers(pattern: str, grants: Mapping[str, Grants], samples: Mapping[str, tuple[str, ...]]) -> list[dict]:
    """The roles whose permissions let them publish on ``pattern`` (absolute, parameters in
    braces), tried with every combination of the parameters' sample values (an agent's with
    its own id). A role allowed only some values of a parameter is listed with ``only``:
    ``{"role": "webhook", "only": {"source": ["github"]}}``."""
    combos, supers, out = _combos(pattern, samples), superusers(grants), []
    for role, g in grants.items():
        if role in supers:
            continue
        ok = [c for c in combos if permitted(g.publish_allow, g.publish_deny, pattern.format(**c))]
        if not ok:
            continue
        entry: dict[str, Any] = {"role": role}
        if len(ok) < len(combos):
            entry["only"] = {p: sorted({c[p] for c in ok}) for p in placeholders(pattern) if len(samples[p]) > 1}
        out.append(entry)
    return out


def readers(pattern: str, stream: str, grants: Mapping[str, Grants],
            samples: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The roles that may read ``pattern``: from its stream (an ordered consumer: the
    ``$JS.API.CONSUMER.CREATE.<stream>`` request) or live (a subscription)."""
    combos, supers = _combos(pattern, samples), superusers(grants)
    return [role for role, g in grants.items() if role not in supers and (
        permitted(g.publish_allow, g.publish_deny, f"$JS.API.CONSUMER.CREATE.{stream}")
        or all(permitted(g.subscribe_allow, g.subscribe_deny, pattern.format(**c)) for c in combos))]


def writer_label(entry: Mapping[str, Any]) -> str:
    """``cli (source=local)``: a writer entry of the index, as one reads it."""
    only = entry.get("only") or {}
    return entry["role"] + (" (" + ", ".join(f"{p}={'|'.join(v)}" for p, v in only.items()) + ")" if only else "")


# -- the schema documents ------------------------------------------------------------------
class Contract(msgspec.Struct, frozen=True):
    """The index and the schema documents of one version (committed or generated)."""

    index: dict[str, Any]
    schemas: dict[str, dict[str, Any]]

    @property
    def version(self) -> int:
        return int(self.index["contract_version"])

    def entry(self, name: str) -> dict[str, Any]:
        for t in self.index["types"]:
            if t["type"] == name:
                return t
        raise KeyError(name)

    def files(self) -> dict[str, str]:
        """The files of its directory, as they are committed."""
        return {"index.json": render(self.index),
                **{t["schema"]: render(self.schemas[t["type"]]) for t in self.index["types"]}}


def render(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def schema_id(name: str, version: int = CONTRACT_VERSION) -> str:
    return f"{ID_PREFIX}:v{version}:{name}"


def format_marker(cls: type) -> int | None:
    """The format version a type's new payloads say they are in (its ``schema_version``
    field's default), or None: it writes none (format 1, or upcasters that leave a current
    payload as it is)."""
    for f in msgspec.structs.fields(cls):
        if f.name == SCHEMA_VERSION:
            if f.default_factory is not msgspec.NODEFAULT:
                return int(f.default_factory())
            return None if f.default is msgspec.NODEFAULT else int(f.default)
    return None


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _closure(node: Any, components: Mapping[str, Any]) -> dict[str, Any]:
    seen: set[str] = set()
    todo = _refs(node)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= _refs(components[name]) - seen
    return {name: components[name] for name in sorted(seen)}


def schema_documents(ns: Namespace = DEFAULT_NS, version: int = CONTRACT_VERSION,
                     upcasters: Upcasters = UPCASTERS) -> dict[str, dict[str, Any]]:
    """One JSON Schema per wire type, keyed by its name: msgspec's schema of the struct
    with the contract's metadata around it, and the definitions it refers to."""
    types = wire_types()
    refs, components = msgspec.json.schema_components([t.cls for t in types], ref_template="#/$defs/{name}")
    docs = {}
    for t, ref in zip(types, refs):
        body = dict(components[ref["$ref"].rsplit("/", 1)[1]])
        title = body.pop("title", t.cls.__name__)
        description = body.pop("description", None) or KINDS[t.kind].about
        doc = {
            "$schema": JSON_SCHEMA,
            "$id": schema_id(t.name, version),
            "title": title,
            "description": description,
            "x-type": t.name,
            "x-kind": t.kind,
            "x-subject": ns.subject(t.subject),
            "x-stream": KINDS[t.kind].stream(ns),
            "x-format-version": upcasters.format_version(t.name) if t.tagged else 1,
            **body,
        }
        defs = _closure(body, components)
        if defs:
            doc["$defs"] = defs
        docs[t.name] = doc
    return docs


def index_document(schemas: Mapping[str, Mapping[str, Any]], grants: Mapping[str, Grants], *,
                   ns: Namespace = DEFAULT_NS, version: int = CONTRACT_VERSION,
                   samples: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The index of a version: every type with its subject, stream, file, format version,
    and the roles that write and read it (derived from ``grants``, role -> permissions;
    ``samples`` adds parameter values to derive them over)."""
    values = {p: tuple(dict.fromkeys((*spec.samples, *(samples or {}).get(p, ()))))
              for p, spec in PARAMETERS.items()}
    types = []
    for t in wire_types():
        doc = schemas[t.name]
        subject, stream = doc["x-subject"], doc["x-stream"]
        types.append({
            "type": t.name,
            "title": doc["title"],
            "kind": t.kind,
            "subject": subject,
            "stream": stream,
            "format_version": doc["x-format-version"],
            "schema": f"{t.name}.json",
            "$id": doc["$id"],
            "writers": writers(subject, grants, values),
            "readers": readers(subject, stream, grants, values),
        })
    return {
        "contract_version": version,
        "namespace": ns.prefix,
        "format_version_field": SCHEMA_VERSION,
        "superusers": superusers(grants),
        "kinds": {name: kind.about for name, kind in KINDS.items()},
        "parameters": {name: {"description": p.description, **({"enum": list(p.enum)} if p.enum else {}),
                              "examples": list(values[name])} for name, p in PARAMETERS.items()},
        "types": types,
    }


def generate(grants: Mapping[str, Grants], *, ns: Namespace = DEFAULT_NS, version: int = CONTRACT_VERSION,
             samples: Mapping[str, tuple[str, ...]] | None = None, upcasters: Upcasters = UPCASTERS) -> Contract:
    """The contract as the code states it now (as JSON values: what its files load as)."""
    schemas = schema_documents(ns, version, upcasters)
    contract = Contract(index_document(schemas, grants, ns=ns, version=version, samples=samples), schemas)
    return msgspec.json.decode(msgspec.json.encode(contract), type=Contract)


# -- the committed versions ------------------------------------------------------------------
def committed_versions(root: Path = SCHEMAS_DIR) -> list[int]:
    """The versions committed under ``root`` (directories ``v<N>`` with an index), oldest first."""
    found = (re.fullmatch(r"v([1-9][0-9]*)", d.name) for d in root.iterdir()
             if d.is_dir() and (d / "index.json").is_file()) if root.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def read_files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.glob("*.json"))}


def load(files: Mapping[str, str]) -> Contract:
    """A contract from the files of its directory; :class:`ValueError` if they are not one."""
    try:
        index = json.loads(files["index.json"])
        return Contract(index, {t["type"]: json.loads(files[t["schema"]]) for t in index["types"]})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an event contract: {type(e).__name__} {e}") from None


def committed(version: int = CONTRACT_VERSION, root: Path = SCHEMAS_DIR) -> Contract:
    directory = root / f"v{version}"
    if not (directory / "index.json").is_file():
        raise FileNotFoundError(f"no committed event contract v{version} in {root} (`ccc schema --write` "
                                "writes it)")
    try:
        return load(read_files(directory))
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


@cache
def committed_asyncapi() -> dict[str, Any]:
    """The AsyncAPI document of the committed current version (what the status API serves)."""
    return asyncapi_document(committed())


# -- evolution: what may change between versions -------------------------------------------------
class Violation(msgspec.Struct, frozen=True):
    type: str
    rule: str  # "removed" | "retyped" | "required" | "subject" | "type removed"
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.rule} {self.where}" + (f" ({self.detail})" if self.detail else "")


_ANNOTATIONS = {"title", "description", "default", "examples", "$comment"}


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    seen = set()
    while isinstance(schema.get("$ref"), str) and schema["$ref"] not in seen:
        seen.add(schema["$ref"])
        schema = root.get("$defs", {}).get(schema["$ref"].rsplit("/", 1)[1], {})
    return schema


def _types(schema: Mapping[str, Any]) -> set[str]:
    t = schema.get("type")
    return set(t) if isinstance(t, list) else {t} if t else set()


def _json_type(value: Any) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                     (list, "array"), (dict, "object")):
        if isinstance(value, py):
            return name
    return "null"


def _here(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _compare(old: Mapping[str, Any], new: Mapping[str, Any], old_root: Mapping[str, Any],
             new_root: Mapping[str, Any], where: str, out: list[tuple[str, str, str]], depth: int = 0) -> None:
    """What a payload valid under ``old`` might not be under ``new``, and which of its
    fields ``new`` no longer has: appended to ``out`` as (rule, where, detail)."""
    old, new = _resolve(old, old_root), _resolve(new, new_root)
    if depth > 32 or old == new and old_root.get("$defs") == new_root.get("$defs"):
        return
    if "anyOf" in old or "anyOf" in new:  # every old alternative must fit a new one
        for option in old.get("anyOf", [old]):
            tries = []
            for candidate in new.get("anyOf", [new]):
                found: list[tuple[str, str, str]] = []
                _compare(option, candidate, old_root, new_root, where, found, depth + 1)
                tries.append(found)
            if all(tries):
                out.extend(min(tries, key=len))
        return
    old_types, new_types = _types(old), _types(new)
    if not old_types and "enum" in old:
        old_types = {_json_type(v) for v in old["enum"]}
    accepted = new_types | ({"integer"} if "number" in new_types else set())
    if new_types and not (old_types and old_types <= accepted):
        out.append(("retyped", where, f"{'/'.join(sorted(old_types)) or 'any'} -> {'/'.join(sorted(new_types))}"))
        return
    if "enum" in new:
        lost = [v for v in old["enum"] if v not in new["enum"]] if "enum" in old else "any other value"
        if lost:
            out.append(("retyped", where, f"no longer accepted: {lost}"))
    if "const" in new and old.get("const", new["const"]) != new["const"] or "const" in new and "const" not in old:
        out.append(("retyped", where, f"now only {new['const']!r}"))
    structural = {"type", "enum", "const", "properties", "required", "items", "additionalProperties", "anyOf", "$ref"}
    for key in sorted(k for k in set(new) - _ANNOTATIONS - structural if not k.startswith(("$", "x-"))):
        if old.get(key) != new[key]:  # a constraint added or changed: format, pattern, bounds, ...
            out.append(("retyped", where, f"{key}: {old.get(key)!r} -> {new[key]!r}"))
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, schema in old_props.items():
        if name not in new_props:
            out.append(("removed", _here(where, name), ""))
        else:
            _compare(schema, new_props[name], old_root, new_root, _here(where, name), out, depth + 1)
    for name in sorted(set(new.get("required", ())) - set(old.get("required", ()))):
        out.append(("required", _here(where, name), "old payloads may lack it"))
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            _compare(old[key], new[key], old_root, new_root, f"{where}{suffix}", out, depth + 1)
        elif new.get(key) is False and old.get(key) is not False:
            out.append(("retyped", f"{where}{suffix}", "no longer allowed"))


def breaking_changes(old: Contract, new: Contract) -> list[Violation]:
    """Where ``new`` breaks the evolution rules against ``old``: a type or a field
    removed, a subject moved, a field retyped (an old payload no longer valid) or newly
    required. Descriptions, titles, defaults, new optional fields and new types are free."""
    out = []
    for entry in old.index["types"]:
        name = entry["type"]
        if name not in new.schemas:
            out.append(Violation(name, "type removed", "", "types are never removed"))
            continue
        if new.entry(name)["subject"] != entry["subject"]:
            out.append(Violation(name, "subject", entry["subject"], f"now {new.entry(name)['subject']}"))
        found: list[tuple[str, str, str]] = []
        _compare(old.schemas[name], new.schemas[name], old.schemas[name], new.schemas[name], "", found)
        out.extend(Violation(name, rule, where or "(payload)", detail) for rule, where, detail in dict.fromkeys(found))
    return out


UPCAST_EXEMPT = frozenset({"retyped", "required"})
"""What upcasters make acceptable: the old payloads are brought up to date on read."""


def evolution_problems(generated: Contract, versions: Mapping[int, Contract], *,
                       upcasters: Upcasters = UPCASTERS) -> list[str]:
    """Why ``generated`` may not be (re)written as ``generated.version`` next to the
    committed ``versions``; empty when it may. Against every committed version: no rule
    broken (a retyped or newly required field only where that type's old format is
    upcast). Against its own version, if committed: no format changed (that is a new
    version: the old one stays as the baseline)."""
    problems = []
    latest = max(versions, default=0)
    if generated.version < latest:
        problems.append(f"CONTRACT_VERSION {generated.version} is older than the committed v{latest}")
    for version, old in sorted(versions.items()):
        for v in breaking_changes(old, generated):
            upcast = (v.type, int(old.entry(v.type).get("format_version", 1))) in upcasters.steps
            if not (v.rule in UPCAST_EXEMPT and upcast):
                problems.append(f"against v{version}: {v}")
    same = versions.get(generated.version)
    if same is not None:
        for entry in same.index["types"]:
            name = entry["type"]
            now = generated.entry(name)["format_version"] if name in generated.schemas else None
            if now is not None and now != entry["format_version"]:
                problems.append(
                    f"{name}: format {entry['format_version']} -> {now} (an upcaster): a new format is a new "
                    f"contract version; set CONTRACT_VERSION = {generated.version + 1} in events/contract.py "
                    f"(v{generated.version} stays as it is, the baseline)")
    return problems


# -- the AsyncAPI document --------------------------------------------------------------------
HEADERS: dict[str, dict[str, str]] = {
    MSG_ID: {
        "type": "string",
        "description": "The deduplication id: JetStream stores a message whose id it has already seen "
                       "within the stream's duplicate window only once, so a retried or repeated publish "
                       "is a no-op. Events and issue facts: their `event_id` (derived from what caused "
                       "them: a GitHub delivery id, `<task>:<transition>:<attempt>`, ...); dead letters: "
                       "`dlq:<stream>:<seq>:<consumer>`.",
    },
    EXPECTED_SEQ: {
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "Optimistic concurrency on an aggregate: the stream sequence of the last message the "
                       "writer saw on the aggregate's subjects; the server refuses the append if another "
                       "landed since (the writer reloads and decides again). Set on task and agent events.",
    },
    EXPECTED_SEQ_SUBJECT: {
        "type": "string",
        "description": f"The subjects {EXPECTED_SEQ} is about: the whole aggregate, "
                       "`<ns>.task.<task_id>.>` or `<ns>.agent.<agent_id>.>`.",
    },
    TRACEPARENT: {
        "type": "string",
        "description": "W3C trace context of the span that published it: one trace follows a task across "
                       "the coordinator and the agents.",
    },
}


def _components_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (v.replace("#/$defs/", "#/components/schemas/") if k == "$ref" and isinstance(v, str)
                    else _components_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_components_refs(v) for v in node]
    return node


def _summary(text: str) -> str:
    first = " ".join(text.split("\n\n", 1)[0].split())
    return first if len(first) <= 200 else first[:197].rstrip() + "..."


def asyncapi_document(contract: Contract) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``contract``: its subjects as channels, who sends and
    who receives on each, the payload schemas and the NATS headers."""
    index = contract.index
    schemas: dict[str, Any] = {"NatsHeaders": {"type": "object", "properties": HEADERS}}
    channels, operations, messages = {}, {}, {}
    for entry in index["types"]:
        name, doc = entry["type"], contract.schemas[entry["type"]]
        body = {k: v for k, v in doc.items() if not k.startswith(("$", "x-"))}
        schemas[name] = _components_refs(body)
        for def_name, definition in doc.get("$defs", {}).items():
            definition = _components_refs(definition)
            if schemas.setdefault(def_name, definition) != definition:
                raise ValueError(f"two definitions of {def_name} in contract v{contract.version}")
        messages[name] = {
            "name": name,
            "title": doc["title"],
            "summary": _summary(doc["description"]),
            "description": doc["description"],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/NatsHeaders"},
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }
        channels[name] = {
            "address": entry["subject"],
            "title": f"{entry['kind']} {name}",
            "description": f"{index['kinds'][entry['kind']]} Stream `{entry['stream']}`.",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            **({"parameters": {p: {"$ref": f"#/components/parameters/{p}"} for p in placeholders(entry["subject"])}}
               if placeholders(entry["subject"]) else {}),
        }
        roles = {"send": [writer_label(w) for w in entry["writers"]], "receive": entry["readers"]}
        for action, who in roles.items():
            if not who:
                continue
            operations[f"{action}.{name}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{name}"},
                "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
                "summary": f"{'Written' if action == 'send' else 'Read'} by: {', '.join(who)}",
                "tags": [{"name": role} for role in dict.fromkeys(w.split(" ", 1)[0] for w in who)],
            }
    parameters = {name: {k: v for k, v in p.items() if k in ("description", "enum", "examples")}
                  for name, p in index["parameters"].items()}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": f"{ID_PREFIX}:v{contract.version}",
        "info": {
            "title": "claude-code-cluster event contract",
            "version": f"{contract.version}.0.0",
            "description": (
                "The subjects of a claude-code-cluster on NATS JetStream and the JSON payloads on them. "
                f"Subjects start with the cluster's namespace (`{index['namespace']}` here; `--namespace` "
                "changes it). Roles are those of the cluster's NATS permissions: an operation's tags name "
                "the roles that may send or receive it (an agent only under its own id; "
                f"{', '.join(index['superusers']) or 'no role'} may do anything). A payload in a newer "
                f"format of its type than the first says so in `{index['format_version_field']}`; readers "
                "upcast older ones. Evolution: new fields are optional, fields are never removed or "
                "retyped, a new meaning is a new type."),
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "The cluster's NATS server (`ccc server` prints its URL). Secure by default: "
                               "mutual TLS and one nkey user per role.",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages, "parameters": parameters},
    }


__all__ = ["ASYNCAPI_VERSION", "CONTRACT_VERSION", "HEADERS", "KINDS", "PARAMETERS", "SAMPLE_AGENT", "SCHEMAS_DIR",
           "SUBJECT_OVERRIDES", "Contract", "Grants", "Violation", "WireType", "asyncapi_document",
           "breaking_changes", "committed", "committed_asyncapi", "committed_versions", "evolution_problems",
           "format_marker", "generate", "index_document", "load", "permitted", "placeholders", "read_files",
           "readers", "render", "schema_documents", "schema_id", "subject_matches", "superusers", "wire_types",
           "writer_label", "writers"]
