"""``ccc rejects``: one list of every message the cluster did not act on, the dead letters
an actor parked and the bad events the projections skip, each with where it is stored,
who rejected it and why, and the ``nats`` command that shows it. The old commands
(``ccc bad-events``, ``ccc dead-letters``) still show one side each. Against the
session's real nats-server with a real coordinator doing the parking."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from actors.coordinator import Coordinator, CoordinatorConfig
from events.codec import encode
from events.task import TaskStarted
from infra.shell.cli.main import cli
from tests.conftest import eventually
from tests.integration.test_coordinator import opened, publish_issue
from tests.integration.test_intake_trust import dead_letters
from tests.support.session import nats_args

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def ccc(nats_url: str, ns, *args: str):
    result = await asyncio.to_thread(CliRunner().invoke, cli, [*nats_args(nats_url), "--namespace", ns.prefix, *args])
    assert result.exit_code == 0, result.output
    return result


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
async def rejected(nc, ns, store):
    """Two dead letters (an untrusted fact the intake refused, a fact that is no JSON)
    and two bad events (garbage on a task subject, a transition of no task); returns
    their stream sequences by name."""
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    await c.start()
    js = nc.jetstream()
    try:
        untrusted = opened(31, "Print the environment", author_association="NONE")
        await publish_issue(nc, ns, untrusted)
        poison = await js.publish(ns.subject("issue.local.acme_app.32.opened"), b"{not json")

        async def parked() -> bool:
            return len(await dead_letters(nc, ns)) >= 2
        await eventually(parked, timeout=15)
    finally:
        await c.stop()
    letters = {d.subject: d for d in await dead_letters(nc, ns)}
    garbage = await js.publish(ns.subject("task.junk-1.created"), b"{not json")
    illegal = TaskStarted(event_id="acme_app-9:2", task_id="acme_app-9", version=2, occurred_at=T0,
                          correlation_id="acme_app-9", actor="agent-9", agent_id="agent-9")
    transition = await js.publish(ns.subject(illegal.rel_subject), encode(illegal))
    return {"untrusted": letters[ns.subject(untrusted.rel_subject)].seq, "poison": poison.seq,
            "garbage": garbage.seq, "transition": transition.seq}


async def test_one_list_says_where_each_reject_is_why_and_how_to_look(nats_url, ns, rejected):
    rows = json_lines((await ccc(nats_url, ns, "rejects", "--json")).stdout)
    by = {(r["stream"], r["seq"]): r for r in rows}
    issues, events = ns.issues_stream, ns.events_stream
    assert set(by) == {(issues, rejected["untrusted"]), (issues, rejected["poison"]),
                       (events, rejected["garbage"]), (events, rejected["transition"])}
    untrusted = by[(issues, rejected["untrusted"])]
    assert (untrusted["kind"], untrusted["by"], untrusted["reason"]) == ("dead_letter", "coordinator-intake",
                                                                         "refused")
    assert "untrusted author: tester is NONE" in untrusted["error"]
    assert untrusted["look"] == f"nats stream get {issues} {rejected['untrusted']}"
    assert isinstance(untrusted["parked_seq"], int) and untrusted["at"]
    poison = by[(issues, rejected["poison"])]
    assert (poison["kind"], poison["reason"], poison["preview"]) == ("dead_letter", "poison", "{not json")
    garbage = by[(events, rejected["garbage"])]
    assert (garbage["kind"], garbage["by"], garbage["reason"]) == ("bad_event", "projections", "skipped")
    assert garbage["subject"] == ns.subject("task.junk-1.created") and garbage["parked_seq"] is None
    assert garbage["look"] == f"nats stream get {events} {rejected['garbage']}"
    transition = by[(events, rejected["transition"])]
    assert transition["error"] == "IllegalTransition: task acme_app-9: cannot task.started while absent"
    # ordered by where the messages are: the issue stream's, then the log's
    assert [(r["stream"], r["seq"]) for r in rows] == sorted(by)

    table = (await ccc(nats_url, ns, "rejects")).stdout.splitlines()
    assert table[0].split() == ["KIND", "STREAM", "SEQ", "SUBJECT", "BY", "REASON", "ERROR", "LOOK"]
    assert any(line.startswith("bad_event") and line.rstrip().endswith(f"nats stream get {events} "
                                                                       f"{rejected['garbage']}") for line in table)
    assert table[-1] == (f"4 rejected: 2 dead letters (parked in {ns.dlq_stream} by an actor), "
                         "2 bad events (skipped by the projections)")


async def test_one_kind_at_a_time_and_the_old_commands_still_answer(nats_url, ns, rejected):
    letters = json_lines((await ccc(nats_url, ns, "rejects", "--kind", "dead_letter", "--json")).stdout)
    assert {r["kind"] for r in letters} == {"dead_letter"} and len(letters) == 2
    bad = json_lines((await ccc(nats_url, ns, "rejects", "--kind", "bad_event", "--json")).stdout)
    assert [r["seq"] for r in bad] == [rejected["garbage"], rejected["transition"]]

    old_bad = json_lines((await ccc(nats_url, ns, "bad-events", "--json")).stdout)
    assert [(o["seq"], o["bad"]) for o in old_bad] == [(rejected["garbage"], True), (rejected["transition"], True)]
    old_letters = json_lines((await ccc(nats_url, ns, "dead-letters", "--json")).stdout)
    assert sorted(o["seq"] for o in old_letters) == sorted([rejected["untrusted"], rejected["poison"]])


async def test_a_damaged_dead_letter_is_named_not_fatal(nats_url, nc, ns, store):
    await nc.jetstream().publish(ns.dlq_subject("somebody"), b"not a dead letter")
    result = await ccc(nats_url, ns, "rejects")
    assert f"unreadable dead letters: nats stream get {ns.dlq_stream} 1" in result.stdout.splitlines()
    assert json_lines((await ccc(nats_url, ns, "rejects", "--json")).stdout) == []


async def test_nothing_rejected_is_an_empty_list(nats_url, ns, store):
    result = await ccc(nats_url, ns, "rejects")
    assert result.stdout.splitlines()[-1] == (f"0 rejected: 0 dead letters (parked in {ns.dlq_stream} by an "
                                              "actor), 0 bad events (skipped by the projections)")
