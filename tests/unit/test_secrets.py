"""The one masker (events.secrets): each credential format, the known values, the
context rules (masked, never a reason to refuse), the fast precheck, and the walk over
every string field of an event."""

from __future__ import annotations

import base64

from datetime import datetime, timezone

import msgspec
import pytest

from events.agent import AgentCodebaseAnalysed, AgentImplementationProduced, AgentWorkFailed
from events.codec import decode_event, encode
from events.secrets import (
    IDENTITY_FIELDS,
    MASK,
    Masker,
    add_secrets,
    forget_added_secrets,
    mask_secrets,
    masked_json,
    process_masker,
    reset_process_masker,
)
from events.task import IssueRef, TaskCreated, Usage

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nq3Zx9kQ2mW7pL4vB8nR1tY6uE3oI5aS0dF\n"

# one example of every credential format, by the kind a refusal names
FORMATS = {
    "an Anthropic API key": ["sk-" "ant-api03-Zx9kQ2mW7pL4vB8nR1tY6uE3oI5aS0dF-abcdef",
                             "sk-" "ant-admin01-AAAAbbbbCCCC"],
    "a GitHub token": [f"{p}_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8" for p in ("ghp", "gho", "ghu", "ghs", "ghr")]
    + ["github" "_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"],
    "an AWS access key id": ["AKIA" "IOSFODNN7EXAMPLE"],
    "a Slack token": ["xox" "b-1234567890-abcdefghij"],
    "a JWT": [".".join(base64.urlsafe_b64encode(part).decode().rstrip("=") for part in
                       (b'{"typ":"JWT","alg":"ed25519-nkey"}', b'{"jti":"ABCDEFG"}', b"signature"))],
    "a NATS nkey seed": ["S" + kind + (B32 * 2)[:56] for kind in "UAONCX"],
    "a private key (PEM)": [f"-----BEGIN {k}PRIVATE KEY-----\n{PEM_BODY}-----END {k}PRIVATE KEY-----"
                            for k in ("", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED ")],
}
ALL_FORMATS = [(kind, s) for kind, samples in FORMATS.items() for s in samples]


@pytest.fixture(autouse=True)
def _isolated_process_masker():
    forget_added_secrets()
    yield
    forget_added_secrets()


@pytest.mark.parametrize(("kind", "secret"), ALL_FORMATS, ids=[s[:14] for _, s in ALL_FORMATS])
def test_every_credential_format_is_masked_and_found(kind, secret) -> None:
    m = Masker(environ={})
    for text in (secret, f"x = '{secret}'\n", f"token:{secret};", f"\n{secret}\n"):
        masked = m.text(text)
        assert secret not in masked and MASK in masked
        assert m.may_hold(text) and m.may_hold(text.encode())
        found = m.findings(f"line one\n{text}\nline three")
        assert [f.kind for f in found] == [kind]
        assert secret not in found[0].line  # a finding shows its line masked


def test_pem_keeps_its_frame_and_a_cut_block_is_masked_to_the_end() -> None:
    m = Masker(environ={})
    block = FORMATS["a private key (PEM)"][1]
    assert m.text(f"a\n{block}\nb") == "a\n-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----\nb"
    clipped = "log: -----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA"  # a log cut short
    assert m.text(clipped) == "log: -----BEGIN OPENSSH PRIVATE KEY-----***"
    public = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    assert m.text(public) == public and m.findings(public) == []


def test_known_values_from_the_environment_the_caller_and_at_run_time() -> None:
    environ = {"DEPLOY_PASSWORD": "correct horse battery", "GITHUB_APP_PRIVATE_KEY": "app-key-material-1",
               "SHORT_KEY": "1", "PATH": "/usr/bin"}
    m = Masker(["configured-value"], environ)
    text = "a correct horse battery b app-key-material-1 c configured-value d 1 e /usr/bin"
    assert m.text(text) == "a *** b *** c *** d 1 e /usr/bin"
    assert [f.kind for f in m.findings(text)] == ["a secret this process holds"]  # one per kind and line
    # the process's masker learns at run time, and a reset (logging reconfigured) keeps it
    add_secrets("installation-token-abc")
    assert process_masker().text("t=installation-token-abc") == "t=***"
    reset_process_masker(environ={})
    assert process_masker().text("installation-token-abc") == MASK
    assert mask_secrets("x installation-token-abc", environ={}) == "x ***"


def test_context_rules_mask_but_never_refuse() -> None:
    m = Masker(environ={})
    probable = {
        "curl -H 'Authorization: Bearer abcdefgh12345'": "curl -H 'Authorization: ***'",
        "https://deploy:pa55w0rd@git.example.com/a.git": "https://***@git.example.com/a.git",
        "nats://s3cr3t-tok@host:4222": "nats://***@host:4222",
        "GET /x?access_token=abc123&page=2": "GET /x?access_token=***&page=2",
        "GET /x?key=abc123": "GET /x?key=***",
        "api_key=abc123": "api_key=***",
    }
    for text, masked in probable.items():
        assert m.text(text) == masked
        assert m.findings(text) == []  # not certain: never a reason to refuse a push
    code = ["sorted(items, key=len)", "def f(key=None): ...", "input_tokens=1200 output_tokens=300",
            "Bearer of bad news", "https://github.com/acme/app/pull/3", "SELECT * FROM tasks",
            "ghost_town = 1", "the_github_page", "S" + "u" * 57]
    for text in code:
        assert m.text(text) == text and m.findings(text) == []


def test_the_precheck_never_misses_what_masking_would_change() -> None:
    """may_hold is only a fast path: whenever masking changes a text, it said True."""
    m = Masker(["a-known-value-with \"quotes\" and \\ backslash"], environ={})
    samples = [s for _, s in ALL_FORMATS] + [
        "Authorization: token abcdef", "https://u:p@h/x", "nats://tok@h", "?token=abc", "password=x",
        "passwd=abc", "client_secret=abc", "Bearer abcdefgh1234",
        "a-known-value-with \"quotes\" and \\ backslash"]
    for s in samples:
        for text in (s, f"prefix\n{s}\tsuffix", s.upper(), s.lower()):
            if m.text(text) != text:
                assert m.may_hold(text)
                # and in an event's JSON, where quotes, backslashes and newlines are escaped
                assert m.may_hold(msgspec.json.encode({"body": text}))
    assert not m.may_hold(b'{"type":"task.created","title":"Fix the add bug","url":"https://github.com/a/b"}')


def _nested_event(secret: str, known: str) -> AgentImplementationProduced:
    return AgentImplementationProduced(
        event_id="agent-1:7", agent_id="agent-1", version=7, occurred_at=NOW, correlation_id="acme_app-3",
        actor="agent-1", task_id="acme_app-3", attempt=1, coder="scripted",
        summary=f"done; used {secret}", files_changed=("app.py", f"leak-{known}.txt"),
        diff_stat="1 file changed", diff_ref="artifacts diffs/acme_app-3/1.diff", diff_digest="SHA-256=00",
        usage=Usage(model=f"model {known}", input_tokens=5), transcript_ref="")


def test_every_string_field_of_a_nested_event_is_masked_and_the_shape_kept() -> None:
    secret, known = FORMATS["a GitHub token"][0], "process-known-value-9"
    m = Masker([known], environ={})
    cases = [
        _nested_event(secret, known),
        TaskCreated(event_id="acme_app-3:1", task_id="acme_app-3", version=1, occurred_at=NOW,
                    correlation_id="acme_app-3", actor="intake",
                    issue=IssueRef(source="github", repo="acme/app", number=3, title=f"t {known}",
                                   body=f"please use {secret}", labels=("bug", known), author="eve")),
        AgentCodebaseAnalysed(event_id="agent-1:2", agent_id="agent-1", version=2, occurred_at=NOW,
                              correlation_id="acme_app-3", actor="agent-1", task_id="acme_app-3", attempt=1,
                              languages={"Python": 3, known: 1}, test_command=("sh", "-c", f"echo {secret}")),
        AgentWorkFailed(event_id="agent-1:9", agent_id="agent-1", version=9, occurred_at=NOW,
                        correlation_id="acme_app-3", actor="agent-1", task_id="acme_app-3", attempt=1,
                        phase="push", reason=f"git said https://x:{known}@host/"),
    ]
    for event in cases:
        raw = encode(event)
        assert m.may_hold(raw)
        masked = m.struct(event)
        assert type(masked) is type(event)
        data = encode(masked)
        assert secret.encode() not in data and known.encode() not in data and MASK.encode() in data
        before, after = msgspec.json.decode(raw), msgspec.json.decode(data)
        assert _shape(before) == _shape(after)  # the same keys and value types, at every depth
        assert decode_event(event.rel_subject, data) == masked  # filed under the same subject
        for name in IDENTITY_FIELDS & set(event.__struct_fields__):
            assert getattr(masked, name) == getattr(event, name)


def _shape(value):
    if isinstance(value, dict):
        return {(_shape(k) if not isinstance(k, str) else "k"): _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def test_an_event_without_secrets_is_returned_as_it_is() -> None:
    m = Masker(["process-known-value-9"], environ={})
    event = _nested_event("nothing", "plain")
    assert m.struct(event) is event
    assert not m.may_hold(encode(event))


def test_identity_fields_are_kept_even_when_they_look_like_a_secret() -> None:
    """An id is a validated token its subject is made of: masking it would file the event
    under another subject, while the subject still carried the text."""
    m = Masker(environ={})
    seed_like = "S" + "U" * 57
    event = _nested_event("x", "y")
    event = msgspec.structs.replace(event, correlation_id=seed_like, summary=seed_like)
    masked = m.struct(event)
    assert masked.correlation_id == seed_like and masked.summary == MASK


def test_masked_json_is_what_every_writer_stores() -> None:
    m = Masker(["process-known-value-9"], environ={})
    plain = _nested_event("nothing", "plain")
    assert masked_json(plain, m) == encode(plain)  # byte for byte: the fast path
    leaky = _nested_event(FORMATS["a JWT"][0], "process-known-value-9")
    data = masked_json(leaky, m)
    assert data == encode(m.struct(leaky)) and b"process-known-value-9" not in data and b"eyJ" not in data
    add_secrets("only-the-process-knows-this")  # without a masker: the process's
    assert b"only-the-process" not in masked_json(_nested_event("x", "only-the-process-knows-this"))
