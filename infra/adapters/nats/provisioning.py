"""Idempotent provisioning of streams, KV buckets and the object store.

Run at every start: creates what is missing, updates what drifted, leaves the rest.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api

from events.cluster import cluster_filter, cluster_stream
from events.errors import ConfigError, StoreUnavailable
from events.subjects import DEFAULT_NS, Namespace
from events.task import SPECIALTIES
from projections.kv_writer import checkpoints_bucket

STREAM_NAME_IN_USE = 10058

RATE_LIMITS_TTL = 300.0
"""How long an entry of the rate-limit bucket lives after its last write: longer than any
shared pause may last (:mod:`infra.adapters.coders.shared_limits` caps them below it), so
a pause always expires by its own deadline first and the bucket empties itself."""


def rate_limits_bucket(ns: Namespace = DEFAULT_NS) -> str:
    """The KV bucket of the shared API pauses: one key per API key (a hash of it, never
    the key), its value the pause every agent using that key waits out."""
    return f"{ns.prefix}_ratelimits"


def spend_bucket(ns: Namespace = DEFAULT_NS) -> str:
    """The KV bucket of the spend ledger (:mod:`events.spend`): one entry per scope
    (``task.<id>``, ``<day>.day``, ``<day>.repo.<name>``, ``<day>.author.<name>``)."""
    return f"{ns.prefix}_spend"


SPEND_MAX_AGE = 40 * 86_400.0
"""An entry of the spend ledger not written for this long is dropped: daily scopes are
done with after their day, and a task's account outlives any task's run."""


def config_bucket(ns: Namespace = DEFAULT_NS) -> str:
    """The KV bucket of the cluster's settings that every process must see the same:
    ``budget`` (the spend caps, :class:`events.spend.Caps`) and ``fairness`` (the
    coordinator's admission policy)."""
    return f"{ns.prefix}_config"


def plugins_bucket(ns: Namespace = DEFAULT_NS) -> str:
    """The KV bucket of the plugins' health (:mod:`infra.adapters.plugins`): one key per
    process running plugins (``coordinator.<process>``, ``agent.<id>``), its value what
    that process loaded, how each plugin fares and which queued tasks a plugin holds back;
    ``ccc plugins`` reads it."""
    return f"{ns.prefix}_plugins"


PLUGINS_TTL = 60.0
"""How long a process's plugin health lives after its last write: it rewrites it every
few seconds, so the record of a process that is gone drops out by itself."""


EVENTS_MAX_CONSUMERS = 20_000
"""The consumers ``<NS>_EVENTS`` may hold, set explicitly: left unset, nats-server caps a
stream at 1,000, and every agent holds one (its durable on its own assignments; its cancel
watch is a plain subscription, see :mod:`actors.agent`), so 1,000 agents could not start.
Besides the agents' durables, the coordinators' few and the forge CI's, the count includes
the short-lived ordered consumers an agent opens to read a task it is assigned (or its own
history when it registers). 5,000 agents are tested (``ccc bench fleet``); the cap leaves
room for as many transient readers again and for growth, while a runaway client still
meets a limit."""

HEARTBEATS_MAX_AGE = 24 * 3600.0
"""A heartbeat that carries no ``Nats-TTL`` (an agent from before per-message TTLs) is
removed after this long, so a departed agent's last heartbeat does not stay forever."""


def stream_configs(ns: Namespace = DEFAULT_NS, replicas: int = 1) -> list[api.StreamConfig]:
    events = api.StreamConfig(
        name=ns.events_stream,
        description="claude-code-cluster event log: task and agent aggregates",
        subjects=[f"{ns.prefix}.task.>", f"{ns.prefix}.agent.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=30 * 60.0,  # ≥ 10 min: retries after a leader election still dedup
        deny_delete=True,  # the log is the database: events are never removed
        deny_purge=True,
        allow_direct=True,  # fast last-by-subject reads for optimistic concurrency
        allow_atomic=True,  # a decision's events land all together or not at all
        max_msg_size=512 * 1024,
        discard=api.DiscardPolicy.NEW,  # if a limit is ever set, refuse rather than lose
        max_consumers=EVENTS_MAX_CONSUMERS,
    )
    issues = api.StreamConfig(
        name=ns.issues_stream,
        description="claude-code-cluster intake: issue facts from webhooks, CLI, nats pub",
        subjects=[f"{ns.prefix}.issue.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=24 * 3600.0,  # GitHub redelivers a webhook hours later
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        max_msg_size=512 * 1024,
    )
    heartbeats = api.StreamConfig(
        name=ns.heartbeats_stream,
        description="claude-code-cluster agent heartbeats (latest per agent, each living its Nats-TTL)",
        subjects=[f"{ns.prefix}.hb.>"],
        retention=api.RetentionPolicy.LIMITS,
        # soft state, rewritten every few seconds: memory, not one fsync per heartbeat
        # (half of what a thousand idle agents cost nats-server). Lost with a restart, as
        # the connections are: the monitor then gives every agent a fresh grace period
        storage=api.StorageType.MEMORY,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        allow_direct=True,
        duplicate_window=60.0,
        # nats-server keeps liveness: each heartbeat carries a TTL (Nats-TTL) and the
        # server removes it unless the next one replaces it first, so the subjects in the
        # stream are the agents alive; the health monitor reads that list instead of
        # receiving every heartbeat (actors.health)
        allow_msg_ttl=True,
        max_age=HEARTBEATS_MAX_AGE,
    )
    dlq = api.StreamConfig(
        name=ns.dlq_stream,
        description="claude-code-cluster dead letters: messages actors could not process",
        subjects=[f"{ns.prefix}.dlq.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=24 * 3600.0,
        max_age=30 * 24 * 3600.0,  # operators have a month to look; the originals stay in their streams
        allow_direct=True,
    )
    cluster = api.StreamConfig(
        name=cluster_stream(ns),
        description="claude-code-cluster decisions about the fleet: autoscaling up and down, with why",
        subjects=[cluster_filter(ns)],  # apart from <NS>_EVENTS: see events.cluster
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=10 * 60.0,
        max_age=90 * 24 * 3600.0,  # an audit trail of decisions, not the database
        allow_direct=True,
        max_msg_size=64 * 1024,
        discard=api.DiscardPolicy.OLD,
    )
    demand = api.StreamConfig(
        name=ns.demand_stream,
        description="claude-code-cluster demand: one message per task waiting for or held by an agent, "
                    "by specialty (KEDA reads the demand-<specialty> consumers)",
        subjects=[f"{ns.prefix}.demand.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,  # a task's entry is replaced, never counted twice
        discard=api.DiscardPolicy.OLD,
        max_msg_size=4 * 1024,
        allow_direct=True,
    )
    return [events, issues, heartbeats, dlq, cluster, demand]


def demand_consumer(specialty: str) -> str:
    """The durable consumer whose pending count is what ``specialty``'s agents are needed
    for (its tasks waiting or being worked on): what a KEDA ScaledObject names
    (deploy/k8s/keda.yaml)."""
    if specialty not in SPECIALTIES:
        raise ConfigError(f"unknown specialty {specialty!r}; one of {', '.join(SPECIALTIES)}")
    return f"demand-{specialty}"


def demand_consumer_configs(ns: Namespace = DEFAULT_NS) -> list[api.ConsumerConfig]:
    """One durable pull consumer per specialty on ``<NS>_DEMAND``, never pulled: every
    message of its filter stays pending, so ``num_pending`` is the specialty's entries on
    the board (and ``num_ack_pending``, the other half of KEDA's lag, stays 0)."""
    return [api.ConsumerConfig(
        name=demand_consumer(sp), durable_name=demand_consumer(sp),
        description=f"{sp} tasks waiting for or held by an agent: num_pending (KEDA reads it; nobody pulls)",
        filter_subject=ns.demand_filter(sp), deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT, replay_policy=api.ReplayPolicy.INSTANT,
    ) for sp in SPECIALTIES]


def disposable(ns: Namespace, stream: str) -> bool:
    """A stream of soft state only (the heartbeats: the latest of each agent, rewritten
    every few seconds), which provisioning may delete and create again when its storage
    must change (nats-server cannot update a stream's storage type)."""
    return stream == ns.heartbeats_stream


async def _ensure_stream(js, config: api.StreamConfig, *, recreate: bool = False) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise
        existing = (await js.stream_info(config.name)).config
        if (existing.num_replicas or 1) > (config.num_replicas or 1):
            # never lower replication implicitly (a command run without CCC_REPLICAS=3
            # against an R3 cluster must not turn its streams into R1)
            config.num_replicas = existing.num_replicas
        if recreate and existing.storage != config.storage:
            # an update would be refused (err_code 10052); another provisioning may race us
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(config.name)
            await _ensure_stream(js, config)
            return
        await js.update_stream(config)


async def provision(nc: Client, ns: Namespace = DEFAULT_NS, *, replicas: int = 1) -> None:
    """Create or update everything the cluster needs. Safe to run concurrently and
    repeatedly."""
    js = nc.jetstream(timeout=10.0)
    try:
        for config in stream_configs(ns, replicas):
            await _ensure_stream(js, config, recreate=disposable(ns, config.name))
        for consumer in demand_consumer_configs(ns):  # create, or update what drifted
            await js.add_consumer(ns.demand_stream, consumer)
        for bucket, description in (
            (ns.tasks_bucket, "task view, materialised from the event log"),
            (ns.agents_bucket, "agent view, materialised from the event log"),
            # (apart from the views: every key of <ns>_tasks is a task, of <ns>_agents an agent)
            (checkpoints_bucket(ns), "where each projection has got to in the event log, one key per projection"),
        ):
            await js.create_key_value(
                bucket=bucket, description=description, history=1, replicas=replicas,
                storage=api.StorageType.FILE,
            )
        # soft state: a pause lost with a server restart costs one more 429 per agent, so
        # memory storage; every entry expires by itself (ttl), nobody has to clean up
        await js.create_key_value(
            bucket=rate_limits_bucket(ns), description="API pauses shared by every agent (429/529 retry-after)",
            history=1, ttl=RATE_LIMITS_TTL, replicas=replicas, storage=api.StorageType.MEMORY, direct=True,
        )
        # money: file storage, kept across restarts
        await js.create_key_value(
            bucket=spend_bucket(ns), description="spend ledger: spent and reserved per task, repository, "
            "author and day", history=1, ttl=SPEND_MAX_AGE, replicas=replicas, storage=api.StorageType.FILE,
            direct=True,
        )
        await js.create_key_value(
            bucket=config_bucket(ns), description="cluster settings every process reads: budget caps, fairness",
            history=5, replicas=replicas, storage=api.StorageType.FILE, direct=True,
        )
        # soft state like the pauses: each process rewrites its own entry every few seconds
        await js.create_key_value(
            bucket=plugins_bucket(ns), description="plugins' health per process (ccc plugins)",
            history=1, ttl=PLUGINS_TTL, replicas=replicas, storage=api.StorageType.MEMORY, direct=True,
        )
        await js.create_object_store(
            bucket=ns.artifacts_bucket, description="diffs, test logs, transcripts",
            replicas=replicas, storage=api.StorageType.FILE,
        )
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
        raise StoreUnavailable(f"provisioning failed: {type(e).__name__}: {e}") from None


async def provision_agent(nc: Client, ns: Namespace, agent_id: str, *, replicas: int = 1) -> None:
    """An agent's own artifact bucket (its permissions let it write there only). An admin
    step, like :func:`provision`: done when the agent is registered and at each start of
    the cluster for the agents it knows."""
    js = nc.jetstream(timeout=10.0)
    try:
        await js.create_object_store(
            bucket=ns.agent_artifacts_bucket(agent_id),
            description=f"diffs, test logs, transcripts of agent {agent_id}",
            replicas=replicas, storage=api.StorageType.FILE,
        )
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
        raise StoreUnavailable(f"provisioning agent {agent_id}: {type(e).__name__}: {e}") from None


async def require_streams(nc: Client, ns: Namespace, names: tuple[str, ...] | None = None) -> None:
    """Check that the streams of ``ns`` (or ``names``) exist (an actor or a command without
    admin rights cannot create them): one line naming the first one missing."""
    js = nc.jetstream(timeout=5.0)
    for name in names or (ns.events_stream, ns.issues_stream, ns.heartbeats_stream, ns.dlq_stream):
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            raise ConfigError(f"stream {name} is missing: provisioning is an admin step "
                              "(`ccc server`, `ccc up` or `ccc secure init` on the server's machine)") from None
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise StoreUnavailable(f"stream {name}: {type(e).__name__}: {e}") from None
