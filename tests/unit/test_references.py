"""Artifact references and digests: one format each (:mod:`events.refs`). A reference is
the two arguments of ``nats object get``; a digest is the object store's own
(``SHA-256=<base64url>``); older events (``<bucket>/<name>``, ``sha256:<hex>``) are
upcast on read, every field that holds either included, so every reader sees one format."""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import typing

import msgspec
import pytest
from nats.js.object_store import OBJ_DIGEST_TEMPLATE

from events.checks import CheckRun
from events.codec import Event, decode_event, decode_issue, encode
from events.errors import ConfigError
from events.issue import IssueEvent
from events.refs import (
    DIGEST_FIELDS,
    REF_FIELDS,
    ObjectRef,
    artifact_ref,
    artifact_tags,
    digest_hex,
    has_legacy_artifacts,
    object_digest,
    split_ref,
    upcast_artifacts,
    upgrade_digest,
    upgrade_ref,
)
from tests.support.make_golden import FIXTURES, POISON

DIFF = b"--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-old\n+new\n"


# -- references ----------------------------------------------------------------------------
def test_a_reference_is_the_two_arguments_of_nats_object_get():
    ref = artifact_ref("ccc_artifacts_agent_1", "diffs/acme_app-7/1.diff")
    assert ref == "ccc_artifacts_agent_1 diffs/acme_app-7/1.diff"
    # what a shell makes of `nats object get $REF`: exactly the bucket and the name
    assert shlex.split(f"nats object get {ref}") == ["nats", "object", "get", "ccc_artifacts_agent_1",
                                                     "diffs/acme_app-7/1.diff"]
    assert split_ref(ref) == ObjectRef("ccc_artifacts_agent_1", "diffs/acme_app-7/1.diff")
    assert split_ref(ref).command == f"nats object get {ref}" and str(split_ref(ref)) == ref


@pytest.mark.parametrize(("bucket", "name"), [
    ("ccc artifacts", "diffs/x.diff"), ("ccc.artifacts", "x"), ("", "x"),  # not a bucket
    ("ccc_artifacts", ""), ("ccc_artifacts", "logs/my tests.log"), ("ccc_artifacts", "/etc/passwd"),
    ("ccc_artifacts", "a\tb"), ("ccc_artifacts", "x\n"),
])
def test_what_the_format_cannot_carry_is_refused_before_anything_is_stored(bucket, name):
    with pytest.raises(ConfigError):
        artifact_ref(bucket, name)


def test_older_references_are_still_read_and_upgraded():
    assert split_ref("ccc_artifacts/logs/acme_app-7/1/tests.log") == ObjectRef("ccc_artifacts",
                                                                               "logs/acme_app-7/1/tests.log")
    assert upgrade_ref("ccc_artifacts/diffs/demo_shop-2/1.diff") == "ccc_artifacts diffs/demo_shop-2/1.diff"
    current = "ccc_artifacts diffs/demo_shop-2/1.diff"
    assert upgrade_ref(current) == current  # idempotent
    for odd in ("", "obj:7", "no-slash-at-all", "bad bucket!/x"):  # left for the reader to judge
        assert upgrade_ref(odd) == odd
    for bad in ("", "obj:7", "x/", "/x", "bucket/with space/x"):
        with pytest.raises(ConfigError):
            split_ref(bad)


# -- digests -------------------------------------------------------------------------------
def nats_py_digest(data: bytes) -> str:
    """How nats-py's object store writes ``ObjectInfo.digest`` (nats/js/object_store.py)."""
    return OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode())


@pytest.mark.parametrize("data", [b"", DIFF, bytes(range(256)) * 300])
def test_a_digest_is_the_object_stores_own(data):
    assert object_digest(data) == nats_py_digest(data)
    # `nats object info` prints the same bytes in hex ("SHA-256 <hex>")
    assert digest_hex(object_digest(data)) == f"SHA-256 {hashlib.sha256(data).hexdigest()}"


def test_older_digests_become_the_same_bytes_in_the_object_stores_format():
    old = "sha256:" + hashlib.sha256(DIFF).hexdigest()
    assert upgrade_digest(old) == object_digest(DIFF)
    assert upgrade_digest(object_digest(DIFF)) == object_digest(DIFF)
    for odd in ("", "sha256:00", "md5:abc"):
        assert upgrade_digest(odd) == odd
    for bad in ("", "sha256:" + "ab" * 32, "SHA-256=short", "SHA-512=" + object_digest(DIFF)[8:]):
        with pytest.raises(ConfigError):
            digest_hex(bad)


# -- every field, every type ------------------------------------------------------------------
def struct_types(tp, seen=None):
    seen = set() if seen is None else seen
    if tp in seen:
        return
    seen.add(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        yield tp
        for f in msgspec.structs.fields(tp):
            yield from struct_types(f.type, seen)
    for arg in typing.get_args(tp):
        yield from struct_types(arg, seen)


def test_every_reference_and_digest_field_is_known():
    """A new ``*_ref`` or ``*_digest`` field must be named in events.refs, or its old
    values would not be upcast (``queue_ref`` is a git ref of the merge queue)."""
    fields = {f.name for t in struct_types(Event | IssueEvent) for f in msgspec.structs.fields(t)}
    assert {f for f in fields if f.endswith("_ref")} - {"queue_ref"} == set(REF_FIELDS)
    assert {f for f in fields if f.endswith("_digest")} == set(DIGEST_FIELDS)


def test_the_types_that_carry_artifacts():
    assert set(artifact_tags(Event, IssueEvent)) == {
        "agent.implementation_produced", "agent.tests_run", "agent.work_failed", "task.testing", "task.failed",
        "task.checks_passed", "task.checks_failed", "task.merge_dequeued", "issue.checks_completed"}


# -- upcasting on read -------------------------------------------------------------------------
OLD_IMPLEMENTATION = {
    "type": "agent.implementation_produced", "task_id": "demo_shop-2", "attempt": 1, "coder": "scripted",
    "files_changed": ["web/style.css"], "diff_ref": "ccc_artifacts/diffs/demo_shop-2/1.diff",
    "diff_digest": "sha256:" + hashlib.sha256(DIFF).hexdigest(), "turns": 1,
    "transcript_ref": "ccc_artifacts/transcripts/demo_shop-2/1.txt", "event_id": "agent-2:5", "agent_id": "agent-2",
    "version": 5, "occurred_at": "2026-11-27T06:58:16.808886Z", "correlation_id": "agent-2", "actor": "agent-2",
}


def test_an_old_event_is_read_in_the_current_formats():
    data = json.dumps(OLD_IMPLEMENTATION).encode()
    assert has_legacy_artifacts(data)
    event = decode_event("agent.agent-2.implementation_produced", data)
    assert event.diff_ref == "ccc_artifacts diffs/demo_shop-2/1.diff"
    assert event.transcript_ref == "ccc_artifacts transcripts/demo_shop-2/1.txt"
    assert event.diff_digest == object_digest(DIFF)
    # written again, it is what the current code writes: no trace of the old format
    again = encode(event)
    assert not has_legacy_artifacts(again) and b"schema_version" not in again
    assert decode_event("agent.agent-2.implementation_produced", again) == event


def test_json_as_anyone_may_write_it_is_recognised():
    data = json.dumps(OLD_IMPLEMENTATION, indent=2).replace("/", "\\/").encode()
    assert b'"ccc_artifacts\\/diffs' in data and has_legacy_artifacts(data)
    event = decode_event("agent.agent-2.implementation_produced", data)
    assert event.diff_ref == "ccc_artifacts diffs/demo_shop-2/1.diff" and event.diff_digest == object_digest(DIFF)


def test_a_current_event_is_left_as_it_is():
    current = upcast_artifacts(OLD_IMPLEMENTATION)
    data = json.dumps(current).encode()
    assert not has_legacy_artifacts(data)
    assert upcast_artifacts(current) == current
    event = decode_event("agent.agent-2.implementation_produced", data)
    assert (event.diff_ref, event.diff_digest) == (current["diff_ref"], current["diff_digest"])


def test_the_checks_log_references_of_an_old_fact_are_upcast_too():
    old = {"type": "issue.checks_completed", "event_id": "ci:1", "repo": "acme/app", "number": 7,
           "occurred_at": "2026-01-01T00:00:00Z", "head_sha": "a" * 40,
           "checks": [{"name": "ci/test", "conclusion": "failure", "log_ref": "ccc_artifacts/ci/acme_app-7/a/x.log"},
                      {"name": "lint", "conclusion": "success"}]}
    fact = decode_issue("issue.local.acme_app.7.checks_completed", json.dumps(old).encode())
    assert fact.checks == (CheckRun(name="ci/test", conclusion="failure", log_ref="ccc_artifacts ci/acme_app-7/a/x.log"),
                           CheckRun(name="lint", conclusion="success"))


def test_a_git_ref_is_no_artifact_reference():
    payload = {"type": "task.merge_testing", "queue_ref": "ccc-queue/acme_app-7", "diff_ref": "b/x"}
    assert upcast_artifacts(payload)["queue_ref"] == "ccc-queue/acme_app-7"
    assert not has_legacy_artifacts(b'{"type":"task.merge_testing","queue_ref":"ccc-queue/acme_app-7"}')


def test_the_golden_log_reads_in_one_format():
    """Whatever format the stored golden log was written in, every reference and digest
    read from it is in the current one."""
    lines = [json.loads(line) for line in (FIXTURES / "golden_events.jsonl").read_text().splitlines()]
    refs = digests = 0
    for line in lines[: -len(POISON)]:
        event = decode_event(line["subject"].split(".", 1)[1], line["data"].encode())
        for name in REF_FIELDS:
            value = getattr(event, name, "")
            if value:
                refs += 1
                assert " " in value and split_ref(value).bucket.startswith("ccc_artifacts"), value
        for name in DIGEST_FIELDS:
            value = getattr(event, name, "")
            if value:
                digests += 1
                assert digest_hex(value).startswith("SHA-256 "), value
    assert refs and digests
