"""The README's ``nats pub`` examples work as written: every one of them is extracted from
README.md, tokenised as a POSIX shell would, and published exactly as written (subject,
``-H`` headers, body) the way ``nats pub`` does (a core NATS publish), as the ``cli`` role,
to a real nats-server with the generated security and a real coordinator in namespace
``ccc`` (the examples' prefix: the server is this module's own). Each must be accepted by
the intake — stored, acknowledged by its durable consumer, no dead letter — and do what
the README says it does, as the read model and the task log show.

The agent the examples' pull requests belong to is played by the test, with the agent's
own credentials, appending exactly what a real agent appends: before a fact about a pull
request, it opens one with the branch, head commit and number the example names, as the
README's text says the agent did. The README cannot drift from what the cluster accepts."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats.js.errors
import pytest
from jsonschema import Draft202012Validator

from actors.coordinator import Coordinator, CoordinatorConfig
from events.contract import committed
from events.issue import IssueEvent
from events.store import EventStore
from events.subjects import Namespace, repo_token, task_id_for
from events.task import (
    SPECIALTIES,
    TaskApproved,
    TaskCancellationRequested,
    TaskCancelled,
    TaskChecksFailed,
    TaskChecksPassed,
    TaskChecksRerun,
    TaskCompleted,
    TaskCreated,
    TaskFailed,
)
from events.task_state import PR_OPEN, TaskState
from events.work_reports import ImplementationProduced, PullRequestOpened
from infra.adapters.nats.connection import connect
from infra.adapters.nats.permissions import inbox_prefix
from infra.adapters.nats.provisioning import provision
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.server import EmbeddedServer
from projections.kv_writer import VIEWS_CHECKPOINT, checkpoints_bucket
from tests.conftest import eventually
from tests.integration.test_coordinator import FakeAgent

pytestmark = pytest.mark.timeout(180)

README = Path(__file__).resolve().parents[2] / "README.md"
NS = Namespace("ccc")
AGENT = "agent-1"
INTAKE = "coordinator-intake"  # the coordinator's durable consumer on the issue stream


# -- reading the README as a shell would ------------------------------------------------------
def code_blocks(markdown: str) -> list[str]:
    """The shell code blocks of a Markdown text (```bash / ```sh / ```shell)."""
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def shell_commands(text: str) -> list[list[str]]:
    """``text`` as a POSIX shell splits it into commands and words, for what the README
    uses: '…' and "…" quoting, backslash escapes and line continuations, ``#`` comments
    (at the start of a word only), newlines and ``;`` between commands. Unbalanced quotes
    are an error (a README line the shell could not run either)."""
    commands: list[list[str]] = []
    words: list[str] = []
    word: list[str] = []
    in_word = False
    i = 0

    def end_word() -> None:
        nonlocal word, in_word
        if in_word:
            words.append("".join(word))
        word, in_word = [], False

    def end_command() -> None:
        nonlocal words
        end_word()
        if words:
            commands.append(words)
        words = []

    while i < len(text):
        c = text[i]
        if c == "'":
            j = text.find("'", i + 1)
            assert j >= 0, f"unbalanced ' in {text[i:i + 80]!r}"
            word.append(text[i + 1:j])
            in_word, i = True, j + 1
        elif c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and text[j + 1:j + 2] in ('"', "\\", "$", "`"):
                    j += 1
                word.append(text[j])
                j += 1
            assert j < len(text), f'unbalanced " in {text[i:i + 80]!r}'
            in_word, i = True, j + 1
        elif c == "\\":
            if text[i + 1:i + 2] != "\n":  # (a backslash-newline continues the line)
                word.append(text[i + 1:i + 2])
                in_word = True
            i += 2
        elif c == "#" and not in_word:
            j = text.find("\n", i)
            i = len(text) if j < 0 else j
        elif c in " \t":
            end_word()
            i += 1
        elif c in "\n;":
            end_command()
            i += 1
        else:
            word.append(c)
            in_word, i = True, i + 1
    end_command()
    return commands


class Pub(NamedTuple):
    """One ``nats pub`` as the CLI would send it."""

    subject: str
    headers: dict[str, str]
    body: str

    @property
    def fact(self) -> dict[str, Any]:
        return json.loads(self.body)


def nats_pub(words: list[str]) -> Pub | None:
    """``nats pub [-H K:V]... SUBJECT BODY`` (flags anywhere, as the CLI takes them)."""
    if words[:2] != ["nats", "pub"]:
        return None
    headers: dict[str, str] = {}
    positional: list[str] = []
    rest = iter(words[2:])
    for w in rest:
        if w in ("-H", "--header"):
            value = next(rest)
        elif w.startswith("--header="):
            value = w.split("=", 1)[1]
        elif w.startswith("-H"):
            value = w[2:]
        else:
            assert not w.startswith("-"), f"a `nats pub` flag this test does not know: {w} in {words}"
            positional.append(w)
            continue
        # the CLI's K:V: split at the first colon, both sides trimmed
        key, sep, val = value.partition(":")
        assert sep, f"a header the CLI refuses (no K:V): {value!r}"
        headers[key.strip()] = val.strip()
    assert len(positional) == 2, f"`nats pub` takes a subject and a body: {words}"
    subject, body = positional
    # the CLI expands Go templates in bodies and header values: the examples must hold none
    assert "{{" not in body and not any("{{" in v for v in headers.values()), body
    return Pub(subject, headers, body)


def readme_examples() -> list[Pub]:
    pubs = [p for block in code_blocks(README.read_text()) for words in shell_commands(block)
            if (p := nats_pub(words)) is not None]
    assert pubs, "no `nats pub` example in README.md"
    return pubs


def test_the_readme_is_read_as_a_shell_reads_it():
    assert shell_commands("nats pub a.b -H 'K:v#1' \\\n  '{\"x\":\n 1}' # note\nnats sub 'c.>'; echo \"q\\\"t\"") == [
        ["nats", "pub", "a.b", "-H", "K:v#1", '{"x":\n 1}'], ["nats", "sub", "c.>"], ["echo", 'q"t']]
    assert nats_pub(["nats", "pub", "-H", "Nats-Msg-Id: local:acme/app#7:opened ", "s", "{}"]) == Pub(
        "s", {"Nats-Msg-Id": "local:acme/app#7:opened"}, "{}")


def test_every_local_issue_fact_has_an_example():
    kinds = {p.fact["type"] for p in readme_examples()}
    assert kinds == {t.__struct_config__.tag for t in typing.get_args(IssueEvent)}
    assert all(p.subject.startswith("ccc.issue.local.") for p in readme_examples())


def test_every_example_fits_the_committed_schema_of_its_type():
    """What `ccc schema <type>` prints is what the examples are (the contract's files)."""
    contract = committed()
    for pub in readme_examples():
        schema = contract.schemas[pub.fact["type"]]
        errors = [e.message for e in Draft202012Validator(schema).iter_errors(pub.fact)]
        assert not errors, (pub.subject, errors)
        assert schema["x-subject"].startswith("ccc.issue.{source}.{repo}.{number}.")


# -- the cluster ---------------------------------------------------------------------------------
class World(NamedTuple):
    admin: Any
    cli: Any
    coordinator: Coordinator
    agent: FakeAgent
    store: EventStore  # the admin's view of the log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own (the examples say ``ccc``), secure as ``ccc up`` makes it."""
    root = tmp_path_factory.mktemp("readme")
    secure = SecureDir.of(root)
    secure.init(NS)
    secure.add_agent(NS, AGENT)
    server = EmbeddedServer(root, secure=secure, js_key=secure.js_key())
    server.start()
    yield server, secure
    server.stop()


async def as_role(url: str, secure: SecureDir, role: str, agent_id: str | None = None):
    kit = secure.kit(role, None if role == "admin" else NS, agent_id)
    return await connect(url, name=f"readme-{role}", kit=kit, inbox_prefix=inbox_prefix(role, agent_id),
                         reconnect=False)


@pytest.fixture
async def world(server):
    srv, secure = server
    admin = await as_role(srv.url, secure, "admin")
    await provision(admin, NS)
    conns = [admin]
    try:
        conns += [await as_role(srv.url, secure, r, AGENT if r == "agent" else None)
                  for r in ("cli", "coordinator", "agent")]
        _, cli, coord_nc, agent_nc = conns
        # the coordinator as `ccc up` runs it: its own credentials, KV views materialised
        coordinator = Coordinator(coord_nc, NS, CoordinatorConfig(
            heartbeat_timeout=3600, retry_base=0.05, retry_max=0.2, materialize_kv=True))
        await coordinator.start()
        try:
            agent = FakeAgent(EventStore(agent_nc, NS), AGENT, specialties=SPECIALTIES, capacity=3,
                              clearance="restricted")
            await agent.register()
            yield World(admin, cli, coordinator, agent, EventStore(admin, NS))
        finally:
            await coordinator.stop()
    finally:
        for nc in conns:
            await nc.close()


# -- what each fact does, as the README says --------------------------------------------------
def task_of(fact: dict[str, Any]) -> str:
    return task_id_for(fact["repo"], fact.get("number", 0), fact.get("source", "local"))


async def caused_by(w: World, task_id: str, event_id: str) -> list:
    """The task events the fact caused (the intake's commands carry its event id)."""
    loaded = await w.store.load(NS.task_filter(task_id))
    return [e.event for e in loaded.events if e.event.causation_id == event_id]


def did_what_the_readme_says(kind: str, fact: dict, before: TaskState | None, after: TaskState | None,
                             caused: list) -> bool:
    def has(cls, **fields) -> bool:
        return any(isinstance(e, cls) and all(getattr(e, k) == v for k, v in fields.items()) for e in caused)

    match kind:
        case "opened":  # one task per issue, created once
            return after is not None and after.issue.title == fact["title"] and (has(TaskCreated) or before is not None)
        case "edited" | "labeled" | "reopened" | "checks_started" | "base_moved":  # noted
            return not caused
        case "commented":  # a failed task is retried with the request as guidance; otherwise noted
            return after.attempt == before.attempt + 1 if before.can_retry else not caused
        case "checks_completed":
            runs = tuple((c["name"], c["conclusion"]) for c in fact["checks"])
            return ((has(TaskChecksPassed, head_sha=fact["head_sha"]) or has(TaskChecksFailed, head_sha=fact["head_sha"]))
                    and tuple((c.name, c.conclusion) for c in after.checks) == runs)
        case "retry_requested":  # the checks again (needs a human), or the next attempt (failed)
            return (has(TaskChecksRerun) and after.status == "checking") or after.attempt == before.attempt + 1
        case "changes_requested":  # the attempt fails with the review as its reason; the next one starts
            return (any(isinstance(e, TaskFailed) and e.phase == "review" and fact["body"] in e.reason for e in caused)
                    and after.attempt == before.attempt + 1 and fact["body"] in after.guidance)
        case "pr_approved":
            return has(TaskApproved, by=fact["author"]) and after.approved
        case "pr_merged":
            return has(TaskCompleted) and after.status == "completed"
        case "pr_closed":  # the attempt fails; it is retried
            return has(TaskFailed, phase="review", reason=fact["reason"]) and after.attempt == before.attempt + 1
        case "cancel_requested" | "closed":  # cancelled, or asked of the agent holding it
            return ((has(TaskCancelled) or has(TaskCancellationRequested))
                    and (after.status == "cancelled" or after.cancel_requested))
    raise AssertionError(f"the README shows a fact this test does not know: {kind}")


NEEDS_PULL_REQUEST = ("checks_started", "checks_completed", "pr_approved", "pr_merged", "pr_closed",
                      "changes_requested")


async def the_agent_opens_the_pull_request(w: World, fact: dict) -> None:
    """What the README's text says happened before a fact about a pull request: the
    task's agent pushed the branch and opened the pull request the example names."""
    model, task_id = w.coordinator.model, task_of(fact)
    branch = fact.get("branch") or f"ccc/task-{task_id}"
    head = fact.get("head_sha") or hashlib.sha1(fact["event_id"].encode()).hexdigest()  # a commit of its own
    state = model.tasks[task_id]
    if state.status in PR_OPEN and state.branch == branch and fact.get("head_sha", state.head_sha) == state.head_sha:
        return

    def status(wanted: str):
        return lambda: (t := model.tasks.get(task_id)) is not None and t.status == wanted

    await eventually(lambda: status("assigned")() and model.tasks[task_id].agent_id == AGENT, timeout=15)
    attempt = model.tasks[task_id].attempt
    await w.agent.start(task_id, attempt=attempt)
    await eventually(status("in_progress"))
    await w.agent.report(task_id, ImplementationProduced(coder="scripted", files_changed=("app/views.py",),
                                                         diff_stat="1 file changed"), attempt=attempt)
    await eventually(status("testing"))
    await w.agent.report(task_id, PullRequestOpened(
        branch=branch, pr_number=fact.get("pr_number"), head_sha=head, base_branch="main", tests_passed=3,
        pr_url=f"http://forge.local/{fact['repo']}/pull/{fact.get('pr_number') or 0}"), attempt=attempt)
    await eventually(status("checking"))
    await w.agent.release(task_id, attempt=attempt)


async def publish_as_written(w: World, pub: Pub) -> int:
    """``nats pub``: a core publish with the headers; the stream sequence it got."""
    await w.cli.publish(pub.subject, pub.body.encode(), headers=pub.headers or None)
    await w.cli.flush()
    stored: list = []

    async def in_the_stream() -> bool:  # (a core publish is stored by the server asynchronously)
        try:
            msg = await w.admin.jetstream().get_last_msg(NS.issues_stream, pub.subject)
        except nats.js.errors.NotFoundError:
            return False
        stored[:] = [msg]
        return msg.data == pub.body.encode()

    try:
        await eventually(in_the_stream, timeout=5)
    except AssertionError:
        raise AssertionError(f"not stored (may the cli role publish {pub.subject}?)") from None
    return stored[0].seq


async def parked(w: World, seq: int) -> list[dict]:
    js = w.admin.jetstream()
    state = (await js.stream_info(NS.dlq_stream)).state
    letters = [json.loads((await js.get_msg(NS.dlq_stream, s)).data) for s in
               range(state.first_seq or 1, state.last_seq + 1)] if state.messages else []
    return [d for d in letters if d["stream"] == NS.issues_stream and d["seq"] == seq]


async def test_every_nats_pub_of_the_readme_is_accepted_and_does_what_it_says(world):
    w = world
    js = w.admin.jetstream()
    for pub in readme_examples():
        fact = pub.fact
        kind = fact["type"].removeprefix("issue.")
        assert pub.subject == f"ccc.issue.{fact.get('source', 'local')}.{repo_token(fact['repo'])}." \
                              f"{fact.get('number', 0)}.{kind}", "the example's subject is not its own"
        assert pub.headers.get("Nats-Msg-Id") == fact["event_id"], f"{pub.subject}: Nats-Msg-Id is the event id"
        task_id = task_of(fact) if kind != "base_moved" else None
        if kind in NEEDS_PULL_REQUEST:
            await the_agent_opens_the_pull_request(w, fact)
        if task_id is not None:
            await w.coordinator.live.catch_up()
        before = w.coordinator.model.tasks.get(task_id) if task_id else None

        seq = await publish_as_written(w, pub)

        async def acknowledged(seq: int = seq) -> bool:
            info = await js.consumer_info(NS.issues_stream, INTAKE)
            return info.ack_floor.stream_seq >= seq and not info.num_ack_pending

        await eventually(acknowledged, timeout=15)
        assert await parked(w, seq) == [], f"{pub.subject}: parked as a dead letter"
        if task_id is None:
            continue

        async def done(task_id: str = task_id, kind: str = kind, fact: dict = fact,
                       before: TaskState | None = before) -> bool:
            await w.coordinator.live.catch_up()
            after = w.coordinator.model.tasks.get(task_id)
            caused = await caused_by(w, task_id, fact["event_id"])
            return did_what_the_readme_says(kind, fact, before, after, caused)

        try:
            await eventually(done, timeout=10)
        except AssertionError:
            after = w.coordinator.model.tasks.get(task_id)
            raise AssertionError(f"{pub.subject} did not do what the README says: {before and before.status} -> "
                                 f"{after and after.status}, caused "
                                 f"{[type(e).__name__ for e in await caused_by(w, task_id, fact['event_id'])]}")

    # nothing the intake had to refuse; and the KV buckets hold only what their names say
    assert (await js.stream_info(NS.dlq_stream)).state.messages == 0
    model = w.coordinator.model

    async def views_written() -> bool:
        entry = await (await js.key_value(checkpoints_bucket(NS))).get(VIEWS_CHECKPOINT)
        return msgspec.json.decode(entry.value)["applied_seq"] >= model.last_seq

    await eventually(views_written)
    assert set(await (await js.key_value(NS.tasks_bucket)).keys()) == set(model.tasks)
    assert set(await (await js.key_value(NS.agents_bucket)).keys()) == set(model.agents)
