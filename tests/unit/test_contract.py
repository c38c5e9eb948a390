"""The event contract (:mod:`events.contract`): the committed JSON Schemas are what the
types say, every wire type has one, they evolve by the rules, upcasters bring old formats
up to date, the writers and readers are those of the NATS permissions, and the AsyncAPI
document holds together.

The AsyncAPI 3.0 meta-schema is not available offline (no installed package or PyPI
package data here ships it), so the document's structure is checked with explicit
assertions: every reference resolves, every channel has its parameters, every operation
points into its channel, and every payload schema is a valid JSON Schema that the golden
log's events satisfy."""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

import msgspec
import msgspec.inspect as mi
import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from events.agent import AgentEvent, Heartbeat
from events.cluster import ClusterEvent
from events.codec import UPCASTERS, Event, Upcasters, UpcastingDecoder, upcast
from events.contract import (
    CONTRACT_VERSION,
    SAMPLE_AGENT,
    SCHEMAS_DIR,
    Contract,
    asyncapi_document,
    breaking_changes,
    committed,
    committed_asyncapi,
    committed_versions,
    evolution_problems,
    format_marker,
    generate,
    placeholders,
    subject_matches,
    wire_types,
)
from events.dead_letter import DeadLetter
from events.issue import IssueEvent
from events.store import EXPECTED_SEQ, MSG_ID
from events.subjects import DEFAULT_NS
from infra.shell.cli.schema import EXTRA_SAMPLES, contract_grants, current_contract
from tests.support.make_golden import FIXTURES, POISON

REGENERATE = "run `ccc schema --write` and commit events/schemas/"


@pytest.fixture(scope="module")
def now() -> Contract:
    return current_contract()


@pytest.fixture(scope="module")
def versions() -> dict[int, Contract]:
    return {v: committed(v) for v in committed_versions()}


def v1_log() -> list[dict]:
    lines = (FIXTURES / "golden_events_v1.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][: -len(POISON)]


# -- payloads made from the types themselves ---------------------------------------------------
IDS = {"task_id": "demo_shop-1", "agent_id": SAMPLE_AGENT, "repo": "demo/shop", "source": "local"}


def sample_value(t: mi.Type, name: str = "") -> Any:
    """A value msgspec decodes into ``t``: the smallest one (required fields only)."""
    match t:
        case mi.StructType():
            out = {t.tag_field: t.tag} if t.tag_field else {}
            out.update({f.encode_name: sample_value(f.type, f.name) for f in t.fields if f.required})
            return out
        case mi.StrType():
            return IDS.get(name, "x")
        case mi.IntType():
            return 1
        case mi.FloatType():
            return 1.5
        case mi.BoolType():
            return False
        case mi.DateTimeType():
            return "2026-01-01T00:00:00Z"
        case mi.LiteralType():
            return t.values[0]
        case mi.UnionType():
            return sample_value(next(x for x in t.types if not isinstance(x, mi.NoneType)), name)
        case mi.ListType() | mi.VarTupleType() | mi.TupleType() | mi.SetType() | mi.FrozenSetType():
            return []
        case mi.DictType():
            return {}
    return None


def sample(cls: type) -> dict:
    return sample_value(mi.type_info(cls))


# -- every wire type, one schema each, committed as generated --------------------------------------
def test_every_wire_type_has_exactly_one_schema(now: Contract, versions: dict[int, Contract]) -> None:
    expected = {*get_args(IssueEvent), *get_args(Event), *get_args(ClusterEvent), Heartbeat, DeadLetter}
    types = wire_types()
    assert {t.cls for t in types} == expected
    assert len({t.name for t in types}) == len(types) == len(expected)
    for t in types:
        assert t.name == (t.cls.__struct_config__.tag or t.name)
        doc = now.schemas[t.name]
        assert doc["title"] and doc["description"] and doc["x-subject"] == DEFAULT_NS.subject(t.subject)
        assert doc["x-stream"] and doc["type"] == "object"
    assert {a for a in get_args(AgentEvent)} <= {t.cls for t in types}
    ids = [doc["$id"] for c in versions.values() for doc in c.schemas.values()]
    assert len(ids) == len(set(ids)), "every schema of every version has its own $id"
    for version, contract in versions.items():
        assert contract.version == version
        assert all(doc["$id"].endswith(f":v{version}:{name}") for name, doc in contract.schemas.items())


def test_a_docstring_is_the_description() -> None:
    doc = current_contract().schemas["task.pr_opened"]
    assert doc["description"].startswith("The change is pushed and its pull request open")
    assert doc["title"] == "TaskPullRequestOpened"


def test_the_committed_current_version_is_what_the_types_say(now: Contract) -> None:
    assert CONTRACT_VERSION in committed_versions(), f"no events/schemas/v{CONTRACT_VERSION}: {REGENERATE}"
    directory = SCHEMAS_DIR / f"v{CONTRACT_VERSION}"
    on_disk = {p.name: p.read_text() for p in directory.glob("*.json")}
    generated = now.files()
    changed = sorted(name for name in generated.keys() | on_disk.keys() if generated.get(name) != on_disk.get(name))
    assert not changed, (f"the event types and events/schemas/v{CONTRACT_VERSION} differ in {', '.join(changed)}: "
                         f"{REGENERATE}")


def test_the_types_keep_the_evolution_rules_against_every_committed_version(now, versions) -> None:
    assert 1 in versions, "v1 is the baseline: it is never deleted"
    assert evolution_problems(now, versions) == []


# -- the evolution check -----------------------------------------------------------------------
def mutated(contract: Contract, change) -> Contract:
    schemas = copy.deepcopy(contract.schemas)
    index = copy.deepcopy(contract.index)
    change(schemas, index)
    return Contract(index, schemas)


def rules(violations) -> set[tuple[str, str, str]]:
    return {(v.type, v.rule, v.where) for v in violations}


def test_removing_retyping_or_requiring_a_field_breaks_the_rules(now: Contract) -> None:
    def change(schemas, index):
        produced = schemas["agent.implementation_produced"]["properties"]
        del produced["diff_stat"]
        produced["turns"] = {"type": "string", "default": ""}
        schemas["agent.implementation_produced"]["required"].append("summary")
        schemas["task.created"]["$defs"]["IssueRef"]["properties"].pop("url")
        schemas["agent.offline"]["properties"]["reason"]["enum"].remove("crashed")
    found = rules(breaking_changes(now, mutated(now, change)))
    assert found == {
        ("agent.implementation_produced", "removed", "diff_stat"),
        ("agent.implementation_produced", "retyped", "turns"),
        ("agent.implementation_produced", "required", "summary"),
        ("task.created", "removed", "issue.url"),
        ("agent.offline", "retyped", "reason"),
    }


def test_optional_fields_wider_types_and_new_types_keep_them(now: Contract) -> None:
    def change(schemas, index):
        assigned = schemas["task.assigned"]["properties"]
        assigned["reviewer"] = {"type": "string", "default": ""}  # a new optional field
        assigned["attempt"] = {"type": "number"}  # integer -> number: every old value still fits
        schemas["agent.offline"]["properties"]["reason"]["enum"].append("evicted")
        schemas["task.created"]["$defs"]["IssueRef"]["properties"]["milestone"] = {"type": "string", "default": ""}
        schemas["task.failed"]["properties"]["reason"]["description"] = "why, in one line"
        schemas["task.teleported"] = schemas["task.cancelled"]
        index["types"].append({**index["types"][0], "type": "task.teleported"})
    assert breaking_changes(now, mutated(now, change)) == []


def test_moving_or_removing_a_type_breaks_the_rules(now: Contract) -> None:
    def change(schemas, index):
        del schemas["task.merged"]
        index["types"] = [t for t in index["types"] if t["type"] != "task.merged"]
        next(t for t in index["types"] if t["type"] == "heartbeat")["subject"] = "ccc.heartbeat.{agent_id}"
    assert rules(breaking_changes(now, mutated(now, change))) == {
        ("task.merged", "type removed", ""), ("heartbeat", "subject", "ccc.hb.{agent_id}")}


def test_a_new_format_is_a_new_contract_version_and_upcasters_cover_what_they_convert() -> None:
    grants = contract_grants()
    before = generate(grants, samples=EXTRA_SAMPLES, upcasters=Upcasters())
    upgraded = Upcasters()
    upgraded.register("task.assigned", 1, lambda p: {**p, "attempt": str(p["attempt"])})
    after = generate(grants, samples=EXTRA_SAMPLES, upcasters=upgraded)
    assert after.entry("task.assigned")["format_version"] == 2

    problems = evolution_problems(after, {CONTRACT_VERSION: before}, upcasters=upgraded)
    assert len(problems) == 1 and f"CONTRACT_VERSION = {CONTRACT_VERSION + 1}" in problems[0]
    bumped = generate(grants, version=CONTRACT_VERSION + 1, samples=EXTRA_SAMPLES, upcasters=upgraded)
    assert evolution_problems(bumped, {CONTRACT_VERSION: before}, upcasters=upgraded) == []

    def retype(schemas, index):  # what that upcaster converts: allowed for its type only
        schemas["task.assigned"]["properties"]["attempt"] = {"type": "string"}
        schemas["task.started"]["properties"]["agent_id"] = {"type": "integer"}
    retyped = mutated(bumped, retype)
    assert evolution_problems(retyped, {CONTRACT_VERSION: before}, upcasters=upgraded) == [
        f"against v{CONTRACT_VERSION}: task.started: retyped agent_id (string -> integer)"]
    older = evolution_problems(before, {CONTRACT_VERSION + 1: bumped}, upcasters=upgraded)
    assert older and "older than the committed" in older[0]


# -- upcasting ------------------------------------------------------------------------------------
class Probe(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="test.probe", omit_defaults=True):
    """A test-local type in its second format: format 1 said ``size_kb``, format 2 says
    ``size_bytes`` (the project's own types have no such history to borrow)."""

    name: str
    size_bytes: int
    schema_version: int = msgspec.field(default_factory=lambda: 2)


def kb_to_bytes(payload: dict) -> dict:
    calls.append(payload["name"])
    size = payload.pop("size_kb")
    if not isinstance(size, int):
        raise TypeError(f"size_kb is {size!r}")
    return {**payload, "size_bytes": size * 1024}


calls: list[str] = []


@pytest.fixture
def probes() -> Upcasters:
    calls.clear()
    registry = Upcasters()
    registry.register("test.probe", 1, kb_to_bytes)
    return registry


def test_an_old_format_is_upcast_before_the_typed_decode(probes: Upcasters) -> None:
    decoder = UpcastingDecoder(Probe, probes)
    old = b'{"type":"test.probe","name":"old","size_kb":3}'
    assert decoder.decode(old) == Probe(name="old", size_bytes=3072)
    assert calls == ["old"]
    new = msgspec.json.encode(Probe(name="new", size_bytes=5))
    assert b'"schema_version":2' in new  # new payloads say their format, defaults omitted or not
    assert decoder.decode(new) == Probe(name="new", size_bytes=5)
    assert calls == ["old"], "a current payload is not upcast"
    assert probes.format_version("test.probe") == format_marker(Probe) == 2
    assert probes.format_version("test.other") == 1


def test_an_upcaster_that_refuses_makes_a_decode_error(probes: Upcasters) -> None:
    with pytest.raises(msgspec.DecodeError, match=r"cannot upcast 'test.probe' from format 1: size_kb is 'big'"):
        UpcastingDecoder(Probe, probes).decode(b'{"type":"test.probe","name":"x","size_kb":"big"}')
    with pytest.raises(msgspec.DecodeError):  # not JSON: the decode's own error, untouched
        UpcastingDecoder(Probe, probes).decode(b"not json")


def test_steps_chain_and_are_registered_once(probes: Upcasters) -> None:
    probes.register("test.probe", 2, lambda p: {**p, "name": p["name"].upper()})
    assert probes.format_version("test.probe") == 3
    assert probes.upcast({"type": "test.probe", "name": "a", "size_kb": 1}) == {
        "type": "test.probe", "name": "A", "size_bytes": 1024, "schema_version": 3}
    assert probes.upcast({"type": "test.probe", "name": "b", "size_bytes": 1, "schema_version": 2}) == {
        "type": "test.probe", "name": "B", "size_bytes": 1, "schema_version": 3}
    with pytest.raises(ValueError, match="already has an upcaster from format 1"):
        probes.register("test.probe", 1, kb_to_bytes)
    with pytest.raises(ValueError, match="format version >= 1"):
        probes.register("test.probe", 0, kb_to_bytes)


def test_a_when_check_spares_the_second_decode() -> None:
    registry = Upcasters()
    registry.register("test.probe", 1, kb_to_bytes, when=lambda data: b'"size_kb"' in data)
    calls.clear()
    decoder = UpcastingDecoder(Probe, registry)
    assert decoder.decode(b'{"type":"test.probe","name":"cur","size_bytes":1}').size_bytes == 1
    assert decoder.decode(b'{"type":"test.probe","name":"old","size_kb":1}').size_bytes == 1024
    assert calls == ["old"]


def test_the_project_upcasters_keep_their_promise(now: Contract) -> None:
    """A type with upcasters either writes its current format version on new payloads
    (``schema_version``), or its upcasters leave a current payload as it is (else a new
    payload would be upcast again on every read)."""
    by_tag = {t.name: t.cls for t in wire_types() if t.tagged}
    for entry in now.index["types"]:
        assert entry["format_version"] == (UPCASTERS.format_version(entry["type"]) if entry["type"] in by_tag else 1)
    old = {}
    for line in v1_log():
        old.setdefault(json.loads(line["data"])["type"], []).append(json.loads(line["data"]))
    for tag in sorted(UPCASTERS.tags):
        cls = by_tag[tag]
        marker = format_marker(cls)
        if marker is not None:
            assert marker == UPCASTERS.format_version(tag), tag
            continue
        for payload in [*old.get(tag, []), sample(cls)]:
            once = upcast(payload)
            again = upcast({k: v for k, v in once.items() if k != "schema_version"})
            assert again == once, f"{tag}: its upcasters change a current payload again: {once} -> {again}"
            msgspec.json.decode(msgspec.json.encode(once), type=cls)


# -- the schemas describe what is on the wire ------------------------------------------------------
def test_every_subject_pattern_is_the_one_the_events_compute() -> None:
    values = {"task_id": "demo_shop-1", "agent_id": SAMPLE_AGENT, "source": "local", "repo": "demo_shop",
              "number": "1"}
    for t in wire_types():
        if not t.tagged:
            continue
        event = msgspec.json.decode(msgspec.json.encode(sample(t.cls)), type=t.cls)
        number = str(getattr(event, "number", 1))  # base_moved's is 0: the repository's
        assert event.rel_subject == t.subject.format(**{**values, "number": number}), t.name


def test_the_schemas_are_valid_and_the_logs_fit_them(now: Contract, versions: dict[int, Contract]) -> None:
    validators = {}
    for version, contract in {**versions, "now": now}.items():
        for name, doc in contract.schemas.items():
            Draft202012Validator.check_schema(doc)
            validators[version, name] = Draft202012Validator(doc)
    for line in v1_log():  # the log of v1 fits v1, and every version after it
        payload = json.loads(line["data"])
        for version in (*versions, "now"):
            errors = [e.message for e in validators[version, payload["type"]].iter_errors(payload)]
            assert not errors, (version, line["seq"], errors)
    for t in wire_types():  # the smallest payload the decoder takes fits the schema, and so does an encoded one
        for payload in (sample(t.cls), json.loads(msgspec.json.encode(
                msgspec.json.decode(msgspec.json.encode(sample(t.cls)), type=t.cls)))):
            assert not list(validators["now", t.name].iter_errors(payload)), t.name
        schema = now.schemas[t.name]
        text = next(k for k in schema["required"] if schema["properties"][k].get("type") == "string")
        assert list(validators["now", t.name].iter_errors({**sample(t.cls), text: 7})), t.name  # it does say no
        assert list(validators["now", t.name].iter_errors({})), t.name


# -- who writes and who reads: the permissions' answer ----------------------------------------------
def test_subject_matching_follows_nats() -> None:
    assert subject_matches("ccc.task.>", "ccc.task.a-1.assigned.agent-1")
    assert not subject_matches("ccc.task.>", "ccc.task")
    assert subject_matches("ccc.agent.*.offline", "ccc.agent.agent-1.offline")
    assert not subject_matches("ccc.agent.*.offline", "ccc.agent.agent-1.offline.x")
    assert not subject_matches("ccc.issue.local.>", "ccc.issue.github.a_b.1.opened")
    assert subject_matches(">", "anything.at.all")
    assert placeholders("ccc.task.{task_id}.assigned.{agent_id}") == ("task_id", "agent_id")


def test_writers_and_readers_come_from_the_permissions(now: Contract) -> None:
    def roles(name: str) -> dict[str, dict]:
        return {w["role"]: w.get("only", {}) for w in now.entry(name)["writers"]}

    assert now.index["superusers"] == ["admin"]
    for t in now.index["types"]:
        assert "admin" not in roles(t["type"]) and t["writers"], t["type"]
        if t["kind"] == "task event":
            assert roles(t["type"]) == {"coordinator": {}}
    assert roles("agent.registered") == {"agent": {}}
    assert roles("agent.offline") == {"coordinator": {}, "agent": {}}  # the coordinator: a missed heartbeat
    assert roles("heartbeat") == {"agent": {}}
    assert roles("issue.opened") == {"webhook": {"source": ["github"]}, "cli": {"source": ["local"]}}
    assert roles("issue.checks_completed")["ci"] == {"source": ["local"]}
    assert roles("dead_letter") == {"coordinator": {}, "ci": {"consumer": ["forge-ci"]}}
    assert roles("cluster.scaled_up") == {"coordinator": {}}
    assert set(now.entry("task.assigned")["readers"]) == {"coordinator", "agent", "cli", "status", "ci"}
    assert "agent" not in now.entry("issue.opened")["readers"]
    assert all("webhook" not in t["readers"] for t in now.index["types"])


# -- the AsyncAPI document ----------------------------------------------------------------------------
def resolve(doc: dict, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def refs_in(node: Any):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def test_the_asyncapi_document_holds_together(now: Contract) -> None:
    doc = asyncapi_document(now)
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == f"{CONTRACT_VERSION}.0.0"
    assert doc["servers"]["nats"]["protocol"] == "nats" and doc["servers"]["nats"]["host"]
    for ref in refs_in(doc):
        resolve(doc, ref)
    components = doc["components"]
    headers = components["schemas"]["NatsHeaders"]["properties"]
    assert {MSG_ID, EXPECTED_SEQ, "traceparent"} <= headers.keys()
    for entry in now.index["types"]:
        name = entry["type"]
        channel = doc["channels"][name]
        assert channel["address"] == entry["subject"]
        assert set(channel.get("parameters", {})) == set(placeholders(entry["subject"]))
        message = resolve(doc, channel["messages"][name]["$ref"])
        assert message["payload"] == {"$ref": f"#/components/schemas/{name}"}
        assert message["headers"] == {"$ref": "#/components/schemas/NatsHeaders"}
        send, receive = doc["operations"][f"send.{name}"], doc["operations"].get(f"receive.{name}")
        assert send["action"] == "send" and send["channel"] == {"$ref": f"#/channels/{name}"}
        assert {t["name"] for t in send["tags"]} == {w["role"] for w in entry["writers"]}
        assert receive["action"] == "receive" and {t["name"] for t in receive["tags"]} == set(entry["readers"])
        for op in (send, receive):
            assert all(m["$ref"].startswith(f"#/channels/{name}/messages/") for m in op["messages"])
    assert len(doc["channels"]) == len(now.index["types"])
    assert doc["components"]["parameters"]["source"]["enum"] == ["local", "github"]
    for schema in components["schemas"].values():  # AsyncAPI's schema format is a superset of draft 7
        Draft7Validator.check_schema(schema)
    for line in v1_log():  # the payload schemas, references resolved inside the document, fit the log
        payload = json.loads(line["data"])
        validator = Draft7Validator({"$ref": f"#/components/schemas/{payload['type']}", "components": components})
        assert not list(validator.iter_errors(payload)), line["seq"]


def test_the_served_document_is_the_committed_current_version() -> None:
    served = committed_asyncapi()
    assert served == asyncapi_document(committed(CONTRACT_VERSION))
    assert set(served["channels"]) == {t.name for t in wire_types()}
