"""Who may do what on the bus: one role per kind of process, its permissions as nats-server
enforces them (DESIGN.md §10). Pure: a table from (role, namespace, agent id) to the
subjects a user may publish and subscribe to; :mod:`infra.adapters.nats.secure` writes
them into the server's configuration.

JetStream is an API over subjects, so the permissions name JetStream's own subjects too:
``$JS.API.CONSUMER.CREATE.<stream>.<consumer>.<filter>`` carries the filter (nats-server
≥ 2.10 checks it against the request), so an agent may create exactly one durable
consumer, on its own assignments; ``$JS.API.CONSUMER.MSG.NEXT`` / ``$JS.ACK`` are scoped to
that consumer. Reads that are not work (replaying a task's history) use ephemeral
ordered consumers (``$JS.API.CONSUMER.CREATE.<stream>`` with no name: the server refuses
a durable name there) and direct gets. The cancel watch is no consumer at all: an agent
may subscribe to ``<ns>.task.*.cancel_requested`` (events it may read from the log
anyway), so a thousand agents hold a thousand consumers, not two thousand.

Nobody but ``admin`` may create, update, delete or purge a stream, a bucket or a
consumer's configuration of another role: those API subjects are denied to every other
role, whatever its allow list says (a deny wins in nats-server). One exception: the
coordinator may purge ``<NS>_DEMAND`` (and no other stream), the demand board it keeps
equal to its read model (``actors.demand``): a task's entry is taken down by purging its
subject. A deny cannot carve one stream out of ``$JS.API.STREAM.PURGE.>``, so its allow
list names that one purge (what is not allowed is refused: every other purge) and its deny
list the purges of the log's own streams, which no later allow may then open.

Every role has its own inbox prefix (``_INBOX_<role>``, ``_INBOX_agent_<id>``) and may
subscribe only below it (and to its ordered consumers' deliver subjects, which nats-py
takes from the same prefix), so no role can read another's replies.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from events.cluster import cluster_stream
from events.subjects import Namespace, check_id
from infra.adapters.nats.provisioning import config_bucket, plugins_bucket, rate_limits_bucket, spend_bucket
from projections.kv_writer import checkpoints_bucket

Role = Literal["admin", "coordinator", "agent", "webhook", "cli", "status", "ci"]
ROLES: tuple[Role, ...] = ("admin", "coordinator", "agent", "webhook", "cli", "status", "ci")
CI_CONSUMER = "forge-ci"  # the CI actor's durable consumer (actors.forge_ci.ForgeCI's default name)

# Stream, bucket and consumer administration: only admin (deny wins over any allow).
PURGE_ANY = "$JS.API.STREAM.PURGE.>"
ADMIN_ONLY = (
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    PURGE_ANY,
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.STREAM.PEER.>",
    "$JS.API.STREAM.LEADER.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",  # the legacy endpoint carries no filter to check
    "$JS.API.CONSUMER.PAUSE.>",
    "$JS.API.CONSUMER.LEADER.>",
    "$JS.API.CONSUMER.UNPIN.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
    "$JS.API.ACCOUNT.>",
    "$SYS.>",
)


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """A user's permissions, as the server config's ``permissions`` block holds them."""

    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_allow: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()


def inbox_prefix(role: Role, agent_id: str | None = None) -> str:
    """The role's own inbox prefix (nats-py's ``inbox_prefix``)."""
    if role == "agent":
        return f"_INBOX_agent_{_agent(agent_id)}"
    return f"_INBOX_{role}"


def permissions_for(role: Role, ns: Namespace, agent_id: str | None = None) -> Permissions:
    """The permissions of ``role`` in the cluster of namespace ``ns``."""
    p = ns.prefix
    events, issues, hbs = ns.events_stream, ns.issues_stream, ns.heartbeats_stream
    own_inbox = (f"{inbox_prefix(role, agent_id)}.>",)
    match role:
        case "admin":
            return Permissions(publish_allow=(">",), subscribe_allow=(">",))
        case "coordinator":
            return Permissions(
                publish_allow=(
                    *read_subjects("*"),
                    # its durable consumers on the issues, the agents' reports, the task
                    # events (forge sync) and the heartbeats, named in the subject
                    *(f"$JS.API.CONSUMER.{op}.{s}.>" for op in ("CREATE", "MSG.NEXT", "INFO")
                      for s in (issues, events, hbs)),
                    *(f"$JS.ACK.{s}.>" for s in (issues, events, hbs)),
                    f"{p}.task.>", f"{p}.agent.*.offline", f"{p}.dlq.>",
                    f"{p}.cluster.>",  # the autoscaler's decisions (it runs with the coordinator's role)
                    f"$KV.{ns.tasks_bucket}.>", f"$KV.{ns.agents_bucket}.>",
                    f"$KV.{checkpoints_bucket(ns)}.>",  # where its KV views have got to
                    f"$KV.{config_bucket(ns)}.>",  # the caps and the fairness policy `ccc up` was given
                    f"$KV.{spend_bucket(ns)}.>",  # the Claude analyser's calls are charged like the agents'
                    # the demand board (actors.demand): its entries, and taking one down
                    f"{p}.demand.>", f"$JS.API.STREAM.PURGE.{ns.demand_stream}",
                    # its process's plugins' health (infra.adapters.plugins): coordinator.<process>
                    f"$KV.{plugins_bucket(ns)}.coordinator.>",
                ),
                publish_deny=(*(s for s in ADMIN_ONLY if s != PURGE_ANY),
                              *(f"$JS.API.STREAM.PURGE.{s}" for s in (events, issues, hbs, ns.dlq_stream,
                                                                     cluster_stream(ns)))),
                subscribe_allow=own_inbox,
            )
        case "agent":
            a = _agent(agent_id)
            durable, bucket = f"agent-{a}", ns.agent_artifacts_bucket(a)
            limits, spend = rate_limits_bucket(ns), spend_bucket(ns)
            return Permissions(
                publish_allow=(
                    *read_subjects(events), *read_subjects(hbs),
                    f"{p}.agent.{a}.>", ns.heartbeat_subject(a),
                    f"$JS.API.CONSUMER.CREATE.{events}.{durable}.{ns.assignments_filter(a)}",
                    f"$JS.API.CONSUMER.INFO.{events}.{durable}",
                    f"$JS.API.CONSUMER.MSG.NEXT.{events}.{durable}",
                    f"$JS.ACK.{events}.{durable}.>",
                    f"$O.{bucket}.>", *read_subjects(f"OBJ_{bucket}"),  # its own artifacts
                    # the shared API pauses (coders.shared_limits): it reads and watches them
                    # and records a 429/529 it saw. Shared by all agents of the cluster, so
                    # one agent's credentials can pause the others, at most for the readers'
                    # cap at a time; they cannot touch any other bucket or the events.
                    f"$KV.{limits}.>", *read_subjects(f"KV_{limits}"),
                    # the spend ledger (events.spend): it reserves before each model call and
                    # settles after, in every scope (task, repository, author, day) — shared by
                    # all agents like the pauses; the caps it only reads
                    f"$KV.{spend}.>", *read_subjects(f"KV_{spend}"), *read_subjects(f"KV_{config_bucket(ns)}"),
                    # its plugins' health (infra.adapters.plugins): its own key only
                    f"$KV.{plugins_bucket(ns)}.agent.{a}", *read_subjects(f"KV_{plugins_bucket(ns)}"),
                ),
                # (it may say it goes offline itself; dead letters are the coordinator's)
                publish_deny=ADMIN_ONLY,
                # the cancellation requests and the coordinator's agent.offline about it, live
                # (actors.agent: plain subscriptions, no consumer)
                subscribe_allow=(*own_inbox, f"{p}.task.*.cancel_requested", f"{p}.agent.{a}.offline"),
            )
        case "webhook":
            return Permissions(
                publish_allow=(f"{p}.issue.github.>", "$JS.API.INFO", f"$JS.API.STREAM.INFO.{issues}"),
                publish_deny=ADMIN_ONLY,
                subscribe_allow=own_inbox,
            )
        case "cli":
            # reads everything, live too (`nats sub '<ns>.>'`); writes local issue facts and
            # the budget caps (`ccc budget set`) only
            return Permissions(
                publish_allow=(*read_subjects("*"), f"{p}.issue.local.>", f"$KV.{config_bucket(ns)}.budget"),
                publish_deny=ADMIN_ONLY,
                subscribe_allow=(*own_inbox, f"{p}.>"),
            )
        case "status":
            return Permissions(publish_allow=read_subjects("*"), publish_deny=ADMIN_ONLY,
                               subscribe_allow=(*own_inbox, f"{p}.>"))
        case "ci":
            # the local forge's CI (actors.forge_ci): follows the task events with its one
            # durable consumer, publishes check results as local issue facts (nothing else
            # of an issue: it cannot open, close or approve one) and keeps their logs in
            # the shared artifacts bucket. It runs repositories' code (sandboxed), so it is
            # kept apart from the coordinator: it writes no task event.
            bucket = ns.artifacts_bucket
            return Permissions(
                publish_allow=(
                    *read_subjects("*"),
                    f"$JS.API.CONSUMER.CREATE.{events}.{CI_CONSUMER}",  # several filters: none in the subject
                    f"$JS.API.CONSUMER.CREATE.{events}.{CI_CONSUMER}.>",
                    f"$JS.API.CONSUMER.INFO.{events}.{CI_CONSUMER}",
                    f"$JS.API.CONSUMER.MSG.NEXT.{events}.{CI_CONSUMER}",
                    f"$JS.ACK.{events}.{CI_CONSUMER}.>",
                    f"{p}.issue.local.*.*.checks_completed",
                    f"{p}.dlq.{CI_CONSUMER}",
                    f"$O.{bucket}.>",
                ),
                publish_deny=ADMIN_ONLY,
                subscribe_allow=own_inbox,
            )
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def read_subjects(stream: str) -> tuple[str, ...]:
    """Reading ``stream`` (``*``: every stream): its info, direct gets, message gets and
    ephemeral ordered consumers (whose flow-control replies go to ``$JS.FC``)."""
    return (
        "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "$JS.FC.>",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",  # ephemeral only: no consumer name in the subject
        f"$JS.API.CONSUMER.INFO.{stream}.*",
    )


def _agent(agent_id: str | None) -> str:
    if not agent_id:
        raise ValueError("the agent role needs an agent id")
    return check_id(agent_id, "agent id")
