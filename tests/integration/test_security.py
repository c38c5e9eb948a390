"""The bus's security, against a real nats-server started with the generated configuration
(mutual TLS, nkey users, per-role permissions, encryption at rest). Every denial is
asserted, not assumed: a publish nats-server refuses never gets an ack (nats-py surfaces it
as a timeout, and the permissions violation reaches ``error_cb``)."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio

from events.subjects import Namespace
from infra.adapters.nats.connection import connect, connect_when_admitted
from infra.adapters.nats.permissions import ADMIN_ONLY, ROLES, inbox_prefix, permissions_for
from infra.adapters.nats.pki import CertificateAuthority
from infra.adapters.nats.provisioning import provision, provision_agent
from infra.adapters.nats.secure import KitFiles, SecureDir
from infra.adapters.nats.server import EmbeddedServer
from tests.conftest import eventually

pytestmark = pytest.mark.integration
DENIED = (asyncio.TimeoutError, nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)


class Secured:
    def __init__(self, root: Path) -> None:
        self.ns = Namespace("s" + uuid.uuid4().hex[:8])
        self.secure = SecureDir(root / "secure")
        self.secure.init(self.ns)
        self.secure.add_agent(self.ns, "a1")
        self.secure.add_agent(self.ns, "a2")
        self.server = EmbeddedServer(root, secure=self.secure, js_key=self.secure.js_key())
        self.url = ""
        self.errors: list[str] = []

    async def as_(self, role, agent_id: str | None = None, **kw):
        kit = self.secure.kit(role, None if role == "admin" else self.ns, agent_id)
        return await self.connect_kit(kit, **kw)

    async def connect_kit(self, kit: KitFiles, **kw):
        # a connection made while the server reloads its users may be cut: asked again, as
        # the cluster's own connections are (connect_when_admitted)
        nc = await connect_when_admitted(self.url, name=f"test-{kit.kit.user}", kit=kit, reconnect=False,
                                         quiet=True, **kw)

        async def record(e: Exception) -> None:
            self.errors.append(f"{kit.kit.user}: {e}")

        nc._error_cb = record  # noqa: SLF001 - the test collects what the server refused
        return nc


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s = Secured(tmp_path_factory.mktemp("secure"))
    s.url = s.server.start()
    yield s
    s.server.stop()


@pytest_asyncio.fixture(scope="module")
async def provisioned(secured):
    admin = await secured.as_("admin")
    await provision(admin, secured.ns)
    for a in ("a1", "a2"):
        await provision_agent(admin, secured.ns, a)
    await admin.close()
    return secured


async def denied_publish(nc, subject: str, data: bytes = b"{}") -> bool:
    try:
        await nc.jetstream(timeout=0.5).publish(subject, data)
    except DENIED:
        return True
    return False


async def allowed_publish(nc, subject: str, data: bytes = b"{}") -> bool:
    ack = await nc.jetstream(timeout=2.0).publish(subject, data)
    return ack.seq > 0


def test_every_role_has_its_own_inbox_and_no_role_may_administer_streams() -> None:
    ns = Namespace("ccc")
    prefixes = {inbox_prefix(r, "a1" if r == "agent" else None) for r in ROLES}
    assert len(prefixes) == len(ROLES)
    for role in ROLES:
        if role == "admin":
            continue
        p = permissions_for(role, ns, "a1" if role == "agent" else None)
        assert "$JS.API.STREAM.DELETE.>" in p.publish_deny
        # no purge; the coordinator's of the demand board only (actors.demand), allowed by name
        assert "$JS.API.STREAM.PURGE.>" in p.publish_deny or role == "coordinator" and [
            s for s in p.publish_allow if ".PURGE." in s] == [f"$JS.API.STREAM.PURGE.{ns.demand_stream}"]
        assert p.subscribe_allow[0] == f"{inbox_prefix(role, 'a1' if role == 'agent' else None)}.>"
        assert not [s for s in p.subscribe_allow if s.startswith("_INBOX") and s != p.subscribe_allow[0]]


def test_the_ci_role_publishes_check_results_and_their_logs_only() -> None:
    """The CI actor runs repositories' code (sandboxed): its credentials write no task
    event, no other issue fact, no agent's artifacts, and consume with one durable."""
    p = permissions_for("ci", Namespace("ccc"))
    allow = p.publish_allow
    assert "ccc.issue.local.*.*.checks_completed" in allow
    assert "$O.ccc_artifacts.>" in allow and "ccc.dlq.forge-ci" in allow
    assert not [s for s in allow if s.startswith(("ccc.task", "ccc.agent", "ccc.hb", "$KV.", "$O.ccc_artifacts_"))
                or s.startswith("ccc.issue.") and not s.endswith(".checks_completed")]
    durable = [s for s in allow if s.startswith(("$JS.API.CONSUMER.CREATE.CCC_EVENTS.", "$JS.API.CONSUMER.MSG.NEXT.",
                                                 "$JS.ACK."))]
    assert durable and all(".forge-ci" in s for s in durable)
    assert set(ADMIN_ONLY) <= set(p.publish_deny) and p.subscribe_allow == ("_INBOX_ci.>",)


async def test_agent_publishes_only_its_own_subjects(provisioned) -> None:
    s, p = provisioned, provisioned.ns.prefix
    nc = await s.as_("agent", "a1")
    try:
        assert await allowed_publish(nc, f"{p}.agent.a1.registered")
        assert await allowed_publish(nc, f"{p}.hb.a1")
        for subject in (
            f"{p}.task.acme_app-1.created",      # task events: the coordinator's
            f"{p}.task.acme_app-1.assigned.a1",   # even its own assignment
            f"{p}.agent.a2.tests_run",            # another agent's reports
            f"{p}.hb.a2",                         # another agent's heartbeat
            f"{p}.issue.local.acme_app.1.opened",  # issue facts
            f"{p}.issue.github.acme_app.1.opened",
            f"{p}.dlq.coordinator-intake",        # dead letters
            f"$KV.{s.ns.tasks_bucket}.acme_app-1",  # KV writes
            f"$O.{s.ns.artifacts_bucket}.M.x",      # the shared artifact bucket
            f"$O.{s.ns.agent_artifacts_bucket('a2')}.M.x",  # another agent's artifacts
        ):
            assert await denied_publish(nc, subject), subject
        assert any("ermissions violation" in e for e in s.errors)
    finally:
        await nc.close()


async def test_agent_cannot_administer_streams_or_buckets(provisioned) -> None:
    s = provisioned
    nc = await s.as_("agent", "a1")
    js = nc.jetstream(timeout=0.5)
    try:
        with pytest.raises(DENIED):
            await js.delete_stream(s.ns.events_stream)
        with pytest.raises(DENIED):
            await js.purge_stream(s.ns.events_stream)
        info = await js.stream_info(s.ns.events_stream)  # reading is allowed
        info.config.max_msgs = 10
        with pytest.raises(DENIED):
            await js.update_stream(info.config)
        with pytest.raises(DENIED):
            await js.delete_key_value(s.ns.tasks_bucket)
        with pytest.raises(DENIED):
            await js.add_stream(name=f"{s.ns.prefix.upper()}_ROGUE", subjects=[f"{s.ns.prefix}.rogue.>"])
        with pytest.raises(DENIED):
            await js.delete_consumer(s.ns.events_stream, "agent-a2")
    finally:
        await nc.close()
    admin = await s.as_("admin")
    try:
        assert (await admin.jetstream().stream_info(s.ns.events_stream)).config.max_msgs in (-1, 0, None)
    finally:
        await admin.close()


async def test_agent_consumes_only_its_own_assignments(provisioned) -> None:
    s, p = provisioned, provisioned.ns.prefix
    coord = await s.as_("coordinator")
    await allowed_publish(coord, f"{p}.task.acme_app-7.assigned.a1", b'{"for":"a1"}')
    await allowed_publish(coord, f"{p}.task.acme_app-8.assigned.a2", b'{"for":"a2"}')
    await coord.close()
    nc = await s.as_("agent", "a1")
    js = nc.jetstream(timeout=1.0)
    try:
        sub = await js.pull_subscribe(s.ns.assignments_filter("a1"), durable="agent-a1", stream=s.ns.events_stream,
                                      config=nats.js.api.ConsumerConfig(name="agent-a1"))
        msgs = await sub.fetch(1, timeout=2.0)
        assert msgs[0].data == b'{"for":"a1"}'
        await msgs[0].ack()
        with pytest.raises(DENIED):  # a durable on another agent's assignments
            await js.add_consumer(s.ns.events_stream, nats.js.api.ConsumerConfig(
                name="agent-a2", durable_name="agent-a2", filter_subject=s.ns.assignments_filter("a2")))
        with pytest.raises(DENIED):  # its own durable name with another filter
            await js.add_consumer(s.ns.events_stream, nats.js.api.ConsumerConfig(
                name="agent-a1", durable_name="agent-a1", filter_subject=s.ns.assignments_filter("a2")))
        with pytest.raises(DENIED):  # the legacy endpoint, which carries no filter
            await js.add_consumer(s.ns.events_stream, nats.js.api.ConsumerConfig(
                durable_name="agent-a2x", filter_subject=s.ns.assignments_filter("a2")))
    finally:
        await nc.close()


async def test_agent_cannot_read_another_roles_inbox(provisioned) -> None:
    s = provisioned
    nc = await s.as_("agent", "a1")
    before = len(s.errors)
    try:
        got = []

        async def steal(msg) -> None:
            got.append(msg)

        await nc.subscribe(f"{inbox_prefix('coordinator')}.>", cb=steal)
        await nc.subscribe(f"{inbox_prefix('agent', 'a2')}.>", cb=steal)
        await eventually(lambda: sum("ermissions violation for subscription" in e for e in s.errors[before:]) >= 2,
                         timeout=5)
        coord = await s.as_("coordinator")
        await coord.publish(f"{inbox_prefix('coordinator')}.x", b"secret reply")
        await coord.flush()
        await coord.close()
        await nc.flush()
        assert got == []
    finally:
        await nc.close()


async def test_webhook_publishes_only_github_issue_facts(provisioned) -> None:
    s, p = provisioned, provisioned.ns.prefix
    nc = await s.as_("webhook")
    try:
        assert await allowed_publish(nc, f"{p}.issue.github.acme_app.1.opened")
        for subject in (f"{p}.issue.local.acme_app.1.opened", f"{p}.task.acme_app-1.created",
                        f"{p}.agent.a1.registered", f"{p}.dlq.x", f"{p}.hb.a1"):
            assert await denied_publish(nc, subject), subject
    finally:
        await nc.close()


async def test_status_reads_and_writes_nothing_cli_publishes_local_facts(provisioned) -> None:
    s, p = provisioned, provisioned.ns.prefix
    status, cli = await s.as_("status"), await s.as_("cli")
    try:
        assert (await status.jetstream().stream_info(s.ns.events_stream)).config.name == s.ns.events_stream
        for subject in (f"{p}.issue.local.acme_app.1.opened", f"{p}.task.x.created", f"{p}.agent.a1.registered",
                        f"$KV.{s.ns.tasks_bucket}.x"):
            assert await denied_publish(status, subject), subject
        assert await allowed_publish(cli, f"{p}.issue.local.acme_app.2.opened")
        for subject in (f"{p}.issue.github.acme_app.2.opened", f"{p}.task.x.created", f"$KV.{s.ns.tasks_bucket}.x"):
            assert await denied_publish(cli, subject), subject
    finally:
        await status.close()
        await cli.close()


async def test_coordinator_writes_tasks_but_administers_nothing(provisioned) -> None:
    s, p = provisioned, provisioned.ns.prefix
    nc = await s.as_("coordinator")
    try:
        assert await allowed_publish(nc, f"{p}.task.acme_app-3.created")
        assert await allowed_publish(nc, f"{p}.agent.a1.offline")
        assert await allowed_publish(nc, f"{p}.dlq.coordinator-intake")
        for subject in (f"{p}.agent.a1.registered", f"{p}.hb.a1", f"{p}.issue.local.x.1.opened"):
            assert await denied_publish(nc, subject), subject
        with pytest.raises(DENIED):
            await nc.jetstream(timeout=0.5).purge_stream(s.ns.events_stream)
        with pytest.raises(DENIED):
            await nc.jetstream(timeout=0.5).delete_stream(s.ns.issues_stream)
    finally:
        await nc.close()


async def _refused(url: str, **kw) -> Exception:
    with pytest.raises(Exception) as e:  # noqa: PT011 - TLS refusals surface as several types
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2, **kw)
        await nc.close()
    return e.value


async def test_clients_without_a_valid_certificate_or_credentials_are_refused(provisioned, tmp_path) -> None:
    s = provisioned
    kit = s.secure.kit("cli", s.ns)
    trusted = ssl.create_default_context(cafile=str(kit.ca))
    await _refused(s.url, tls=trusted, nkeys_seed=str(kit.seed))  # no client certificate
    other = CertificateAuthority.create(tmp_path / "other-ca.pem", tmp_path / "other-ca-key.pem")
    other.issue(tmp_path / "c.pem", tmp_path / "k.pem", common_name="intruder")
    foreign = ssl.create_default_context(cafile=str(kit.ca))
    foreign.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    await _refused(s.url, tls=foreign, nkeys_seed=str(kit.seed))  # a certificate from another CA
    good = ssl.create_default_context(cafile=str(kit.ca))
    good.load_cert_chain(str(kit.cert), str(kit.key))
    await _refused(s.url, tls=good)  # a valid certificate but no credentials
    await _refused(s.url.replace("tls://", "nats://"))  # plain text


async def test_a_revoked_agent_is_disconnected_and_refused(provisioned) -> None:
    s = provisioned
    kit = s.secure.add_agent(s.ns, "gone")
    s.server.reload()  # added without a restart (SIGHUP: the reload is asynchronous)
    nc = None

    async def connected() -> bool:
        nonlocal nc
        try:
            nc = await s.connect_kit(kit)
        except Exception:  # noqa: BLE001 - not reloaded yet
            return False
        return True

    await eventually(connected, timeout=5)
    assert await allowed_publish(nc, f"{s.ns.prefix}.agent.gone.registered")
    assert s.secure.revoke_agent(s.ns, "gone")
    s.server.reload()
    await eventually(lambda: not nc.is_connected, timeout=5)
    with pytest.raises(Exception):  # noqa: PT011
        await connect(s.url, kit=kit, reconnect=False, quiet=True)
    await nc.close()


async def test_issue_titles_are_not_stored_in_plaintext(provisioned) -> None:
    s = provisioned
    marker = f"Plaintext-marker-{uuid.uuid4().hex}"
    cli = await s.as_("cli")
    try:
        await allowed_publish(cli, f"{s.ns.prefix}.issue.local.acme_app.9.opened",
                              f'{{"title": "{marker}"}}'.encode())
    finally:
        await cli.close()
    files = [f for f in s.server.data_dir.rglob("*") if f.is_file() and "secure" not in f.parts]
    assert files
    assert not [f for f in files if marker.encode() in f.read_bytes()]


def test_secrets_are_private(provisioned) -> None:
    s = provisioned.secure
    assert (s.path.stat().st_mode & 0o777) == 0o700
    for f in (s.ca_key, s.server_key, s.js_key_file, s.kit_dir("admin") / "user.nk", s.kit_dir("admin") / "key.pem"):
        assert (f.stat().st_mode & 0o777) == 0o600, f


async def test_a_revoked_agents_task_is_requeued(provisioned, tmp_path) -> None:
    """Revocation end to end: the agent holding a task loses its connection, gives up on
    the refused credentials, stops heartbeating, and the coordinator's health monitor
    takes the task back into the queue."""
    from actors.agent import Agent, AgentConfig
    from actors.coordinator import Coordinator, CoordinatorConfig
    from actors.pipeline import PipelineSettings
    from infra.adapters.coders.scripted import ScriptedCoder
    from infra.adapters.forge.local import LocalForge, LocalForgeClient
    from infra.adapters.git.workbench import GitWorkbench
    from infra.adapters.nats.artifacts import ObjectStoreArtifacts
    from tests.e2e.test_actors import CALC, FIX, TEST, script
    from tests.integration.test_coordinator import opened, publish_issue

    s = provisioned
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/calc", {"calc.py": CALC, "tests/test_calc.py": TEST,
                                    ".ccc/test-command": "python -m pytest -q\n"})
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "acme_calc-5.json").write_text(script([{"run": {"command": "sleep 30"}}, *FIX]))
    kit = s.secure.add_agent(s.ns, "doomed")
    s.server.reload()
    admin = await s.as_("admin")
    await provision_agent(admin, s.ns, "doomed")
    await admin.close()

    coord_nc = await s.as_("coordinator")
    coordinator = Coordinator(coord_nc, s.ns, CoordinatorConfig(heartbeat_timeout=1.5, retry_base=0.05))
    await coordinator.start()
    agent_nc = None

    async def admitted() -> bool:
        nonlocal agent_nc
        try:
            agent_nc = await connect(s.url, name="doomed", kit=kit, quiet=True)
        except Exception:  # noqa: BLE001 - the reload is asynchronous
            return False
        return True

    await eventually(admitted, timeout=5)
    agent = Agent(agent_nc, s.ns, AgentConfig(agent_id="doomed", specialties=("backend",), heartbeat_interval=0.2,
                                              shutdown_grace=0.2, pipeline=PipelineSettings(test_timeout=60)),
                  workbench=GitWorkbench(tmp_path / "ws"), coder=ScriptedCoder(scripts),
                  forge=LocalForgeClient(forge.root),
                  artifacts=ObjectStoreArtifacts(agent_nc, s.ns.agent_artifacts_bucket("doomed")))
    await agent.start()
    cli = await s.as_("cli")
    try:
        await publish_issue(cli, s.ns, opened(5, "Fix add", labels=["backend"], repo="acme/calc"))
        task = lambda: coordinator.model.tasks.get("acme_calc-5")  # noqa: E731
        await eventually(lambda: task() is not None and task().status == "in_progress", timeout=20)
        assert task().agent_id == "doomed"
        assert s.secure.revoke_agent(s.ns, "doomed")
        s.server.reload()
        await eventually(lambda: agent_nc.is_closed, timeout=10)  # refused on reconnect: it gives up
        await eventually(lambda: task().status == "queued", timeout=15)
        assert coordinator.model.agents["doomed"].status == "offline"
    finally:
        await cli.close()
        await agent.stop()
        await coordinator.stop()
        await coord_nc.close()


async def test_the_encryption_key_rotates_with_the_previous_key(tmp_path) -> None:
    """README's rotation: one start with the new key and the old one as the previous key;
    after it the store opens with the new key alone, and nothing is in plaintext."""
    old, new = "a" * 64, "b" * 64
    marker = f"rotation-marker-{uuid.uuid4().hex}".encode()

    async def roundtrip(server: EmbeddedServer, publish: bool) -> bytes:
        url = server.start()
        try:
            nc = await nats.connect(url)
            js = nc.jetstream(timeout=5)
            if publish:
                await js.add_stream(name="ROT", subjects=["rot.>"])
                await js.publish("rot.1", marker)
            data = (await js.get_msg("ROT", 1)).data
            await nc.close()
            return data
        finally:
            server.stop()

    assert await roundtrip(EmbeddedServer(tmp_path, js_key=old), publish=True) == marker
    assert await roundtrip(EmbeddedServer(tmp_path, js_key=new, js_prev_key=old), publish=False) == marker
    assert await roundtrip(EmbeddedServer(tmp_path, js_key=new), publish=False) == marker
    stored = [f for f in tmp_path.rglob("*") if f.is_file() and f.suffix != ".log"]
    assert not [f for f in stored if marker in f.read_bytes()]


async def test_agents_share_api_pauses_through_the_rate_limit_bucket_only(provisioned) -> None:
    """An agent reads, watches and writes the shared API pauses (coders.shared_limits) with
    its own credentials; it still writes no other bucket."""
    from infra.adapters.coders.shared_limits import SharedPause
    from infra.adapters.nats.provisioning import rate_limits_bucket

    s, key = provisioned, "test-key-" + uuid.uuid4().hex
    a1, a2 = await s.as_("agent", "a1"), await s.as_("agent", "a2")
    p1, p2 = SharedPause(a1, s.ns, key, name="a1"), SharedPause(a2, s.ns, key, name="a2")
    try:
        await p2.start()
        assert p2.remaining() == 0
        assert await p1.record(429, {"retry-after": "30"}) == 30 and p1.shared == 1 and p1.unshared == 0
        await eventually(lambda: p2.remaining() > 25, timeout=5)  # a2 watched it arrive
        assert await denied_publish(a1, f"$KV.{s.ns.tasks_bucket}.k") and await denied_publish(
            a1, f"$KV.{s.ns.agents_bucket}.k")
        assert await allowed_publish(a1, f"$KV.{rate_limits_bucket(s.ns)}.k0")
    finally:
        for p in (p1, p2):
            await p.close()
        for nc in (a1, a2):
            await nc.close()


async def test_the_spend_ledger_with_each_roles_own_credentials(provisioned) -> None:
    """Agents reserve and settle in the spend ledger and read the caps; only the CLI (its
    `ccc budget set`) and the coordinator (`ccc up`'s flags) write the caps; the status
    role reads both and writes neither."""
    from events.errors import StoreUnavailable
    from events.spend import Caps, Refusal, Reservation, scopes_for
    from infra.adapters.nats.cluster_config import BUDGET, FAIRNESS, read_setting, update_setting
    from infra.adapters.nats.provisioning import config_bucket, spend_bucket
    from infra.adapters.nats.spend_ledger import KVSpendLedger, read_book

    s = provisioned
    cli, coord = await s.as_("cli"), await s.as_("coordinator")
    a1, status = await s.as_("agent", "a1"), await s.as_("status")
    ledger = KVSpendLedger(a1, s.ns, name="a1")
    try:
        await update_setting(cli, s.ns, BUDGET, Caps, lambda c: Caps(day=1.0))  # `ccc budget set`
        await update_setting(coord, s.ns, BUDGET, Caps, lambda c: Caps(day=1.0, repo=0.5))  # `ccc up` flags
        got = await ledger.reserve(scopes_for("t-1", "acme/app", "alice"), 200_000, ttl=30)
        assert isinstance(got, Reservation) and len(got.held) == 2
        await ledger.settle(got, 100_000)
        refused = await ledger.reserve(scopes_for("t-2", "acme/app"), 450_000, ttl=30)
        assert isinstance(refused, Refusal) and refused.scope == "repo:acme/app"
        book = await read_book(status, s.ns)  # the status API's and `ccc budget`'s view
        assert book.caps == Caps(day=1.0, repo=0.5) and book.entries
        assert await read_setting(a1, s.ns, BUDGET, Caps) == Caps(day=1.0, repo=0.5)
        # nobody else writes the caps; the CLI writes no other setting and no spend
        for nc in (a1, status):
            with pytest.raises(StoreUnavailable):
                await update_setting(nc, s.ns, BUDGET, Caps, lambda c: Caps())
        assert await denied_publish(cli, f"$KV.{config_bucket(s.ns)}.{FAIRNESS}")
        assert await denied_publish(cli, f"$KV.{spend_bucket(s.ns)}.task.t-1")
        assert await denied_publish(status, f"$KV.{spend_bucket(s.ns)}.task.t-1")
        assert await allowed_publish(a1, f"$KV.{spend_bucket(s.ns)}.task.t-9")
    finally:
        await ledger.close()
        for nc in (cli, coord, a1, status):
            await nc.close()
