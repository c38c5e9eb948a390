"""Secrets never reach the log or the artifacts: the event store masks every event at
its boundary (every string field, at any depth), the artifact store every object; read
back raw from a real nats-server."""

from __future__ import annotations

from datetime import datetime, timezone

import msgspec
import pytest

from events.agent import AgentImplementationProduced
from events.codec import decode_event
from events.refs import split_ref
from events.secrets import add_secrets, forget_added_secrets
from events.task import IssueRef, Usage
from events.task_state import CreateTask, decide
from events.work import CodeRequest
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from tests.fakes.anthropic_api import fake_anthropic  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
GH = "ghp_" + "Zq9" * 12
KNOWN = "agent-known-secret-7f3a"


@pytest.fixture(autouse=True)
def _known_secret():
    forget_added_secrets()
    add_secrets(KNOWN)
    yield
    forget_added_secrets()


async def _raw(nc, ns, seq: int) -> tuple[str, bytes]:
    msg = await nc.jetstream().get_msg(ns.events_stream, seq)
    return msg.subject, msg.data


def _report(agent: str, task: str, version: int) -> AgentImplementationProduced:
    return AgentImplementationProduced(
        event_id=f"{agent}:{version}", agent_id=agent, version=version, occurred_at=NOW, correlation_id=task,
        actor=agent, task_id=task, attempt=1, coder="scripted", summary=f"used {GH} to log in",
        files_changed=("app.py", f"{KNOWN}.txt"), diff_stat="1 file changed", diff_ref="x/y",
        usage=Usage(model=f"m-{KNOWN}"))


async def test_an_event_with_secrets_in_nested_fields_is_stored_masked(nc, ns, store):
    issue = IssueRef(source="local", repo="acme/app", number=1, title=f"Rotate {KNOWN}",
                     body=f"the token is {GH}\nand the key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n"
                          "-----END RSA PRIVATE KEY-----", labels=("bug", KNOWN))
    [created] = decide(None, CreateTask(at=NOW, actor="intake", task_id="acme_app-1", issue=issue))
    [seq] = await store.append([created], expected_last_seq=0)
    subject, data = await _raw(nc, ns, seq)
    for secret in (GH, KNOWN, "MIIEow"):
        assert secret.encode() not in data
    stored = decode_event(subject.split(".", 1)[1], data)  # filed under its own subject, readable
    assert stored.issue.title == "Rotate ***" and stored.issue.labels == ("bug", "***")
    assert stored.issue.body.startswith("the token is ***\nand the key:\n-----BEGIN RSA PRIVATE KEY-----***")
    # the same JSON shape: the same keys at every level, only string values differ
    plain = msgspec.json.decode(msgspec.json.encode(created))
    assert plain.keys() == msgspec.json.decode(data).keys()
    assert plain["issue"].keys() == msgspec.json.decode(data)["issue"].keys()
    state, _ = await store.load_task("acme_app-1")
    assert state.issue.body.startswith("the token is ***")


async def test_batches_and_pipelined_appends_are_masked_too(nc, ns, store):
    batch = [_report("agent-1", "acme_app-2", 1), _report("agent-1", "acme_app-2", 2)]
    seqs = await store.append(batch, expected_last_seq=None)  # one atomic batch
    piped = await store.append_many([(_report("agent-2", "acme_app-3", 1), None)])
    for seq in [*seqs, *piped]:
        subject, data = await _raw(nc, ns, seq)
        assert GH.encode() not in data and KNOWN.encode() not in data
        event = decode_event(subject.split(".", 1)[1], data)
        assert event.summary == "used *** to log in" and event.files_changed == ("app.py", "***.txt")
        assert event.usage.model == "m-***" and event.agent_id in ("agent-1", "agent-2")


async def test_every_artifact_is_masked(nc, ns, store):
    artifacts = ObjectStoreArtifacts(nc, ns.artifacts_bucket)
    diff = f"+TOKEN = '{GH}'\n+SEED = '{KNOWN}'\n+binary \xff\n".encode("utf-8") + b"\xfe\xfd not utf-8\n"
    ref_bytes = await artifacts.put("diffs/a.diff", diff)
    ref_text = await artifacts.put_text("logs/a.log", f"login with {KNOWN} ok")
    obs = await nc.jetstream().object_store(ns.artifacts_bucket)
    stored = (await obs.get(split_ref(ref_bytes).name)).data
    # the secrets masked, the rest byte for byte (also what is not UTF-8)
    assert stored == b"+TOKEN = '***'\n+SEED = '***'\n+binary \xc3\xbf\n\xfe\xfd not utf-8\n"
    assert (await obs.get(split_ref(ref_text).name)).data == b"login with *** ok"


# -- prompts ---------------------------------------------------------------------------------
def _request(repo_dir) -> CodeRequest:
    return CodeRequest(task_id="acme_app-1", attempt=1, title=f"Rotate {KNOWN}", body=f"the old token was {GH}",
                       guidance=f"and also {KNOWN}", specialty="backend", labels=("bug",), repo="acme/app",
                       repo_dir=str(repo_dir), issue_number=1, instructions=f"Deploy with {GH}.")


async def test_the_coders_prompts_are_masked(tmp_path, fake_anthropic):  # noqa: F811
    """What the issue, the feedback and the repository's instructions carry is masked in
    what a model is sent (the Anthropic API through its real client; the Claude Code CLI's
    argv), like everything else the agent writes where others read it."""
    import anthropic

    from infra.adapters.coders.anthropic_coder import AnthropicCoder
    from infra.adapters.coders.claude_cli import ClaudeCodeCoder
    from infra.adapters.git import gitops
    from infra.adapters.git.workspace import Workspace
    from tests.fakes.anthropic_api import tool_call

    fake = fake_anthropic[0]
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "a.txt").write_text("a\n")
    gitops.run_git(origin, "init", "-q")
    gitops.commit_all(origin, "initial", "t", "t@example.com")
    ws = Workspace.create(tmp_path / "ws", "agent-1", "acme_app-1", {})
    gitops.clone(str(origin), ws.repo_dir)
    fake.add(tool_call("finish", {"summary": "nothing to change"}))
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake.base_url, max_retries=0)
    await AnthropicCoder(default_model="claude-sonnet-4-6", client=client).implement(_request(ws.repo_dir), ws)
    sent = msgspec.json.encode(fake.requests[0].body)
    assert GH.encode() not in sent and KNOWN.encode() not in sent
    assert b"the old token was ***" in sent and b"Deploy with ***." in sent

    argv = ClaudeCodeCoder(api_key="test-key").command(_request(ws.repo_dir))
    assert not any(GH in a or KNOWN in a for a in argv)
    assert any("the old token was ***" in a for a in argv) and any("Deploy with ***." in a for a in argv)
