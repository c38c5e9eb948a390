"""The read side of ``ccc``: ``events``, ``replay``, ``tasks`` (and ``tasks show ID``),
``agents``, ``rejects`` (and ``bad-events``), and how an event and a state are shown as
text.

Bad messages end up in two places, for a reason: a message an *actor* could not process
(an issue fact that does not decode, one the trust policy refused, one that failed every
redelivery) is parked by the coordinator as a dead letter in ``<NS>_DLQ``, because the
actor must move on and the reason must outlive its consumer; a message on the event log
the *projections* cannot apply (not an event, or a transition the state machine refuses)
is skipped by every fold and kept in memory with its sequence, because the log is the
authority and cannot be changed. ``ccc rejects`` shows both in one list: where the
message is, why it was rejected, and the ``nats`` command that shows it as stored
(``ccc bad-events`` and ``ccc dead-letters`` show one side each, as before).

The task board explains waits with the admission policy the cluster's coordinator runs
with: ``ccc up`` publishes it to the cluster's settings (``<ns>_config``, key
``fairness``), and ``ccc tasks`` reads it from there wherever it runs (none published: no
fairness reasons; a value that does not decode: a ConfigError naming it).

The commands get their connection from ``ctx.obj`` (a :class:`~.context.CliState`):
``obj.ns``, ``obj.settings()``, ``obj.store(nc)`` and ``obj.run(fn)``, which connects,
provisions and awaits ``fn(nc)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple
from datetime import UTC, datetime

import click
import msgspec
import nats.errors
import nats.js.errors
import structlog

from events.agent import AgentEventBase
from events.agent_state import AGENT_STATUSES, AgentState
from events.agent_state import evolve as evolve_agent
from events.codec import BadMessage
from events.dead_letter import DeadLetter, dead_letter_decoder
from events.errors import ConfigError, DomainError, StoreUnavailable
from events.subjects import check_id
from events.task import SPECIALTIES, TaskCreated, TaskEventBase
from events.task_state import TASK_STATUSES, TaskState
from events.task_state import evolve as evolve_task
from projections.fairness import DEFAULT_POLICY, FairnessPolicy, explain
from projections.read_model import MAX_BAD_KEPT, ReadModel
from projections.waits import Holds, Waits

from infra.adapters.nats.cluster_config import FAIRNESS, read_setting
from infra.adapters.nats.spend_ledger import read_book
from infra.adapters.plugins.health import read_plugin_waits
from infra.shell.app.signals import until_signal
from infra.shell.cli.output import emit_json, fmt_time, print_line, print_table

log = structlog.get_logger("ccc.cli")

_ENVELOPE = frozenset({"type", "event_id", "version", "occurred_at", "correlation_id",
                       "causation_id", "actor"})


# -- events and states as text --------------------------------------------------------
def _fmt_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict) and "dollars" in value:  # Usage
        tokens = f"{value.get('input_tokens', 0)}in/{value.get('output_tokens', 0)}out"
        return f"${value.get('dollars', 0):.4f}/{tokens}"
    if isinstance(value, str) and (" " in value or not value):
        return repr(value)
    return str(value)


def event_details(event: TaskEventBase | AgentEventBase) -> str:
    """The payload of an event as ``key=value`` pairs (the envelope is shown apart)."""
    if isinstance(event, TaskCreated):
        i = event.issue
        return f"{i.source}:{i.repo}#{i.number} {i.title!r} max_attempts={event.max_attempts}"
    data = msgspec.to_builtins(event)
    own = "task_id" if isinstance(event, TaskEventBase) else "agent_id"
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in data.items() if k not in _ENVELOPE and k != own)


def event_type(event: object) -> str:
    return event.__struct_config__.tag  # type: ignore[attr-defined]


def task_summary(s: TaskState) -> str:
    parts = [f"task {s.task_id}", s.status, f"v{s.version}", f"attempt {s.attempt}/{s.max_attempts}",
             f"agent {s.agent_id or '-'}", f"specialty {s.specialty}", f"priority {s.priority}"]
    if s.not_before:
        parts.append(f"not before {fmt_time(s.not_before)}")
    if s.cancel_requested:
        parts.append("cancel requested")
    if s.status_reason:
        parts.append(f"reason {s.status_reason!r}")
    return "  ".join(parts)


def agent_summary(s: AgentState) -> str:
    parts = [f"agent {s.agent_id}", s.status, f"v{s.version}", f"load {len(s.active_tasks)}/{s.capacity}",
             f"tasks {','.join(s.active_tasks) or '-'}", f"specialties {','.join(s.specialties)}"]
    if s.reason:
        parts.append(f"reason {s.reason!r}")
    return "  ".join(parts)


# -- options ------------------------------------------------------------------------
def scope_filter(ns, task: str | None, agent: str | None) -> str | None:
    if task and agent:
        raise ConfigError("use --task or --agent, not both")
    if task:
        return ns.task_filter(check_id(task, "task id"))
    if agent:
        return ns.agent_filter(check_id(agent, "agent id"))
    return None


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
task_option = click.option("--task", "task_id", metavar="ID", help="Only this task's events.")
agent_option = click.option("--agent", "agent_id", metavar="ID", help="Only this agent's own events.")


# -- events ---------------------------------------------------------------------------
EVENT_COLUMNS = ("SEQ", "TIME", "SUBJECT", "TYPE", "V", "DETAILS")


def _event_row(ns, seq: int, item) -> tuple[tuple[str, ...], str | None]:
    if isinstance(item, BadMessage):
        return (str(seq), "-", item.subject, "BAD", "-", item.error), "red"
    return (str(seq), fmt_time(item.occurred_at), ns.subject(item.rel_subject), event_type(item),
            str(item.version), event_details(item)), None


def _line(cols: Sequence[str]) -> str:
    seq, at, subject, typ, v, details = cols
    return f"{seq:>7}  {at:<19}  {subject:<44}  {typ:<26}  {v:>3}  {details}".rstrip()


def event_json(ns, seq: int, item) -> dict:
    if isinstance(item, BadMessage):
        return {"seq": seq, "subject": item.subject, "bad": True,
                "error": item.error, "preview": item.preview}
    return {"seq": seq, "subject": ns.subject(item.rel_subject), "event": item}


@click.command("events")
@task_option
@agent_option
@click.option("--from-seq", type=click.IntRange(min=1), default=1, show_default=True,
              help="Start at this stream sequence.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@json_option
@click.pass_obj
def events_cmd(obj, task_id, agent_id, from_seq, follow, as_json) -> None:
    """Print the event log.

    One line per message of CCC_EVENTS: sequence, time, subject, type, payload.
    Messages that do not decode are shown as BAD with the reason; they never stop
    the listing."""
    ns = obj.ns
    subject = scope_filter(ns, task_id, agent_id)

    async def show(nc) -> None:
        store = obj.store(nc)
        if not as_json:
            print_line(_line(EVENT_COLUMNS), "bold")
        async for seq, item in store.read(filter_subject=subject, from_seq=from_seq, follow=follow):
            if as_json:
                emit_json(event_json(ns, seq, item))
            else:
                cols, style = _event_row(ns, seq, item)
                print_line(_line(cols), style)

    obj.run(lambda nc: until_signal(show(nc)) if follow else show(nc))


# -- replay ---------------------------------------------------------------------------
@click.command("replay")
@task_option
@agent_option
@click.option("--until-seq", type=click.IntRange(min=1), default=None,
              help="Stop after this stream sequence (time travel).")
@json_option
@click.pass_obj
def replay_cmd(obj, task_id, agent_id, until_seq, as_json) -> None:
    """Replay events through the state machines.

    Prints each event and the state of its aggregate after it.
    Uses the same pure evolve functions as every projection, so what you see is what
    the system computes. An event the state machine rejects is shown with the reason
    (the state stays as it was) and the replay goes on."""
    ns = obj.ns
    subject = scope_filter(ns, task_id, agent_id)
    tasks: dict[str, TaskState] = {}
    agents: dict[str, AgentState] = {}
    counts = {"applied": 0, "rejected": 0, "bad": 0}

    def apply(seq: int, item) -> None:
        if isinstance(item, BadMessage):
            counts["bad"] += 1
            if as_json:
                emit_json(event_json(ns, seq, item))
            else:
                print_line(_line(_event_row(ns, seq, item)[0]), "red")
            return
        views, evolve, key = ((tasks, evolve_task, item.task_id) if isinstance(item, TaskEventBase)
                              else (agents, evolve_agent, item.agent_id))
        before = views.get(key)
        try:
            after = evolve(before, item)
        except DomainError as e:
            counts["rejected"] += 1
            error = f"{type(e).__name__}: {e}"
            if as_json:
                emit_json({**event_json(ns, seq, item), "rejected": True, "error": error, "state": before})
            else:
                print_line(_line(_event_row(ns, seq, item)[0]))
                print_line(f"{'':9}REJECTED {error}; state unchanged", "red")
            return
        views[key] = after
        counts["applied"] += 1
        if as_json:
            emit_json({**event_json(ns, seq, item), "state": after})
        else:
            print_line(_line(_event_row(ns, seq, item)[0]))
            summary = task_summary(after) if isinstance(after, TaskState) else agent_summary(after)
            print_line(f"{'':9}-> {summary}", "cyan")

    async def run(nc) -> int:
        if not as_json:
            print_line(_line(EVENT_COLUMNS), "bold")
        return await obj.store(nc).replay(apply, filter_subject=subject, until_seq=until_seq)

    last = obj.run(run)
    if not as_json:
        total = sum(counts.values())
        click.echo(f"replayed {total} events up to seq {max(last, 0)}: {counts['applied']} applied, "
                   f"{counts['rejected']} rejected, {counts['bad']} bad")


# -- tasks / agents / bad events ---------------------------------------------------
def _load_model(obj) -> ReadModel:
    model = ReadModel(obj.ns.prefix)

    async def rebuild(nc) -> None:
        await obj.store(nc).replay(model.apply)

    obj.run(rebuild)
    return model


class Board(NamedTuple):
    model: ReadModel
    fairness: FairnessPolicy | None  # the admission policy the coordinator published (None: none was)
    holds: Holds  # the spend ledger and the plugins' holds now: they explain waits too

    def waits(self) -> Waits:
        return Waits.of(self.model.tasks, self.model.agents, self.fairness, self.holds)


def _load_board(obj) -> Board:
    """The task view rebuilt from the log, the admission policy the coordinator published,
    the spend ledger and the plugins' holds."""
    model = ReadModel(obj.ns.prefix)

    async def rebuild(nc) -> tuple[FairnessPolicy | None, Holds]:
        # first: a malformed policy or caps value fails before the replay, not after it
        timeout = obj.settings().request_timeout
        policy = await read_setting(nc, obj.ns, FAIRNESS, FairnessPolicy, timeout=timeout)
        holds = Holds(await read_book(nc, obj.ns, timeout=timeout),
                      await read_plugin_waits(nc, obj.ns, timeout=timeout))
        await obj.store(nc).replay(model.apply)
        return policy, holds

    policy, holds = obj.run(rebuild)
    return Board(model, policy, holds)


def _bad_footer(model: ReadModel) -> list[str]:
    return [f"bad events: {model.bad_count} (ccc bad-events lists them)"] if model.bad_count else []


def _counts(states) -> str:
    counts: dict[str, int] = {}
    for s in states:
        counts[s.status] = counts.get(s.status, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


@click.group("tasks", invoke_without_command=True)
@click.option("--state", type=click.Choice(TASK_STATUSES), help="Only tasks in this state.")
@click.option("--specialty", type=click.Choice(SPECIALTIES), help="Only tasks of this specialty.")
@json_option
@click.pass_context
def tasks_cmd(ctx, state, specialty, as_json) -> None:
    """The task board, rebuilt from the event log; `ccc tasks show ID` shows one in full,
    `ccc tasks cancel ID` cancels one.

    WAITING says what a task that is not moving by itself waits for: its checks, the
    merge queue, a human, a file lease, a dependency, a retry backoff, an exhausted
    budget scope (`budget:<scope>`, see `ccc budget`), a fairness limit (the policy `ccc
    up` published), an agent."""
    if ctx.invoked_subcommand is not None:
        return
    board = _load_board(ctx.obj)
    model, fairness = board.model, board.fairness
    shown = [t for t in model.tasks.values()
             if (state is None or t.status == state) and (specialty is None or t.specialty == specialty)]
    waits, now = board.waits(), datetime.now(UTC)
    if as_json:
        policy = fairness or DEFAULT_POLICY
        for t in shown:
            emit_json({"seq": model.task_seq[t.task_id], "task": t, "waiting": waits.why(t, now),
                       "queue": explain(t, now, policy, model.tasks)})
        return
    rows = [(t.task_id, t.status, t.specialty, t.priority, t.agent_id, f"{t.attempt}/{t.max_attempts}",
             t.issue.title, waits.why(t, now)) for t in shown]
    total = len(model.tasks)
    head = f"{len(shown)} of {total} tasks" if len(shown) != total else f"{total} tasks"
    footer = [f"{head}" + (f": {_counts(model.tasks.values())}" if total else "")
              + f"  (log at seq {model.last_seq})", *_bad_footer(model)]
    print_table(("TASK", "STATE", "SPECIALTY", "PRIORITY", "AGENT", "ATTEMPT", "TITLE", "WAITING"), rows,
                footer=footer)


@tasks_cmd.command("show")
@click.argument("task_id")
@json_option
@click.pass_obj
def tasks_show(obj, task_id, as_json) -> None:
    """One task in full: its state, what it waits for, its place in the scheduler's
    order while queued (lane and urgency), and why its agent was chosen."""
    check_id(task_id, "task id")
    board = _load_board(obj)
    model, fairness = board.model, board.fairness
    t = model.tasks.get(task_id)
    if t is None:
        raise ConfigError(f"no task {task_id}")
    now = datetime.now(UTC)
    waiting = board.waits().why(t, now)
    queue = explain(t, now, fairness or DEFAULT_POLICY, model.tasks)
    if as_json:
        emit_json({"seq": model.task_seq[task_id], "task": t, "waiting": waiting, "queue": queue})
        return
    for label, value in task_detail(t, waiting, queue):
        print_line(f"{label:<15} {value}")
    print_line(f"(log at seq {model.last_seq})")


def task_detail(t: TaskState, waiting: str, queue: str) -> list[tuple[str, str]]:
    """``ccc tasks show``'s lines: (label, value), those without a value left out."""
    i = t.issue
    pr = f"#{t.pr_number}" if t.pr_number else ""
    pr = " ".join(x for x in (pr, t.pr_url, f"({t.branch})" if t.branch else "") if x)
    failure = f"{t.failure_phase or 'failed'}: {t.failure_reason}" if t.failure_reason else ""
    lines = [
        ("task", t.task_id), ("state", f"{t.status}  v{t.version}  updated {fmt_time(t.updated_at)}"),
        ("title", i.title), ("issue", f"{i.source}:{i.repo}#{i.number}" + (f" by {i.author}" if i.author else "")),
        ("specialty", f"{t.specialty}, {t.complexity}, priority {t.priority}, {t.security_level}"),
        ("attempt", f"{t.attempt}/{t.max_attempts}" + (f", CI fixes {t.ci_fixes}" if t.ci_fixes else "")
         + (f", rebases {t.rebases}" if t.rebases else "")),
        ("agent", t.agent_id or ""), ("why this agent", t.assigned_why),
        ("waiting", waiting), ("in the queue", queue),
        ("dependencies", ", ".join(t.dependencies)), ("pull request", pr), ("failure", failure),
        ("reason", t.status_reason),
        ("cost", f"${t.dollars:.4f}, {t.input_tokens} tokens in, {t.output_tokens} out" if t.dollars
         or t.input_tokens or t.output_tokens else ""),
    ]
    return [(label, value) for label, value in lines if value]


@click.command("agents")
@click.option("--state", type=click.Choice(AGENT_STATUSES), help="Only agents in this state.")
@json_option
@click.pass_obj
def agents_cmd(obj, state, as_json) -> None:
    """The agents, rebuilt from the event log."""
    model = _load_model(obj)
    shown = [a for a in model.agents.values() if state is None or a.status == state]
    if as_json:
        for a in shown:
            emit_json({"seq": model.agent_seq[a.agent_id], "agent": a})
        return
    rows = [(a.agent_id, a.status, ",".join(a.specialties), f"{len(a.active_tasks)}/{a.capacity}",
             ",".join(a.active_tasks), a.tasks_done, a.tasks_failed) for a in shown]
    cluster = model.cluster()
    total = len(model.agents)
    head = f"{len(shown)} of {total} agents" if len(shown) != total else f"{total} agents"
    footer = [f"{head}" + (f": {_counts(model.agents.values())}" if total else "")
              + f"; cluster load {cluster.active}/{cluster.capacity}  (log at seq {model.last_seq})",
              *_bad_footer(model)]
    print_table(("AGENT", "STATE", "SPECIALTIES", "LOAD", "ACTIVE TASKS", "DONE", "FAILED"), rows,
                footer=footer)


@click.command("bad-events")
@json_option
@click.pass_obj
def bad_events_cmd(obj, as_json) -> None:
    """List messages the projections could not apply.

    Undecodable payloads and events the state machines reject, with their stream
    sequence and the reason. `ccc rejects` lists them with the dead letters."""
    model = _load_model(obj)
    if as_json:
        for b in model.bad:
            emit_json({"seq": b.seq, "subject": b.subject, "bad": True,
                       "error": b.error, "preview": b.preview})
        return
    footer = [f"bad events: {model.bad_count}"]
    if model.bad_count > len(model.bad):
        footer.append(f"(showing the newest {MAX_BAD_KEPT})")
    print_table(("SEQ", "SUBJECT", "ERROR"),
                [(b.seq, b.subject, b.error) for b in model.bad], footer=footer)


# -- rejects: the dead letters and the bad events, in one list ------------------------------
DEAD_LETTER, BAD_EVENT = "dead_letter", "bad_event"


class Reject(msgspec.Struct, frozen=True, kw_only=True):
    """A message the cluster did not act on: where it is, why, and how to look at it."""

    kind: str  # DEAD_LETTER: an actor parked it in <NS>_DLQ; BAD_EVENT: the projections skip it
    stream: str  # where the message itself is stored (never removed: the streams deny deletes)
    seq: int
    subject: str
    by: str  # the durable consumer that parked it, or "projections"
    reason: str  # a dead letter's: "poison", "gave_up", "refused"; a bad event: "skipped"
    error: str
    look: str  # the `nats` command that shows the message as stored
    preview: str = ""
    parked_seq: int | None = None  # a dead letter's own sequence in <NS>_DLQ
    at: datetime | None = None  # when it was parked (bad events: found at every replay)


def look_command(stream: str, seq: int) -> str:
    return f"nats stream get {stream} {seq}"


def rejects_of(letters: Sequence[tuple[int, DeadLetter]], bad: Sequence[BadMessage], events_stream: str) -> list[Reject]:
    """The dead letters (with their sequence in the dead-letter stream) and the bad events
    of the log as one list, ordered by where the messages are."""
    out = [Reject(kind=DEAD_LETTER, stream=d.stream, seq=d.seq, subject=d.subject, by=d.consumer, reason=d.reason,
                  error=d.error, look=look_command(d.stream, d.seq), preview=d.preview, parked_seq=parked,
                  at=d.at) for parked, d in letters]
    out += [Reject(kind=BAD_EVENT, stream=events_stream, seq=b.seq, subject=b.subject, by="projections",
                   reason="skipped", error=b.error, look=look_command(events_stream, b.seq), preview=b.preview)
            for b in bad]
    return sorted(out, key=lambda r: (r.stream, r.seq, r.kind))


async def read_dead_letters(nc, dlq_stream: str, timeout: float) -> tuple[list[tuple[int, DeadLetter]], list[int]]:
    """Every dead letter with its sequence, and the sequences of the ones that do not
    decode (listed, never fatal)."""
    js = nc.jetstream(timeout=timeout)
    letters: list[tuple[int, DeadLetter]] = []
    damaged: list[int] = []
    try:
        try:
            state = (await js.stream_info(dlq_stream)).state
        except nats.js.errors.NotFoundError:
            return [], []
        for seq in range(state.first_seq or 1, state.last_seq + 1):
            try:
                msg = await js.get_msg(dlq_stream, seq)
            except nats.js.errors.NotFoundError:  # aged out (the stream keeps a month)
                continue
            try:
                letters.append((seq, dead_letter_decoder.decode(msg.data or b"")))
            except msgspec.DecodeError as e:
                log.warning("dlq.unreadable", seq=seq, error=str(e))
                damaged.append(seq)
    except (nats.errors.Error, TimeoutError, OSError) as e:
        raise StoreUnavailable(f"dead letters ({dlq_stream}): {type(e).__name__}: {e}") from None
    return letters, damaged


@click.command("rejects")
@click.option("--kind", type=click.Choice((DEAD_LETTER, BAD_EVENT)), default=None,
              help="Only the dead letters (parked by an actor) or only the bad events (skipped by the projections).")
@json_option
@click.pass_obj
def rejects_cmd(obj, kind, as_json) -> None:
    """Every message the cluster did not act on, in one list.

    Dead letters: messages an actor could not process (an issue fact that does not
    decode, is refused by the trust policy, or failed every redelivery), parked by the
    coordinator in CCC_DLQ with the reason. Bad events: messages on the event log the
    projections cannot apply (not an event, or a transition the state machine refuses),
    skipped by every view. Each row says where the message is stored (stream and
    sequence), who rejected it and why, and the `nats` command that shows it."""
    ns = obj.ns
    model = ReadModel(ns.prefix)

    async def gather(nc):
        letters, damaged = await read_dead_letters(nc, ns.dlq_stream, obj.settings().request_timeout)
        if kind != DEAD_LETTER:
            await obj.store(nc).replay(model.apply)
        return letters, damaged

    letters, damaged = obj.run(gather)
    rows = rejects_of(letters if kind != BAD_EVENT else [], model.bad, ns.events_stream)
    if as_json:
        for r in rows:
            emit_json(r)
        return
    dead = sum(r.kind == DEAD_LETTER for r in rows)
    footer = [(f"{len(rows)} rejected: {dead} dead letters (parked in {ns.dlq_stream} by an actor), "
               f"{len(rows) - dead} bad events (skipped by the projections)")]
    if model.bad_count > len(model.bad):
        footer.append(f"(bad events: showing the newest {MAX_BAD_KEPT} of {model.bad_count})")
    if damaged and kind != BAD_EVENT:
        footer.append(f"unreadable dead letters: {', '.join(look_command(ns.dlq_stream, s) for s in damaged)}")
    print_table(("KIND", "STREAM", "SEQ", "SUBJECT", "BY", "REASON", "ERROR", "LOOK"),
                [(r.kind, r.stream, r.seq, r.subject, r.by, r.reason, r.error[:80], r.look) for r in rows],
                footer=footer)


READ_COMMANDS = (events_cmd, replay_cmd, tasks_cmd, agents_cmd, bad_events_cmd, rejects_cmd)
