"""The plugins' health bucket with each role's own credentials, on a server started with
the generated configuration (as tests/integration/test_security.py does): a process
writes its own entry only (the coordinator ``coordinator.*``, an agent ``agent.<its id>``),
and everyone who reads the cluster (the CLI's ``ccc plugins``, the status role) reads them
all and writes none."""

from __future__ import annotations

import pytest

from infra.adapters.nats.provisioning import plugins_bucket
from infra.adapters.plugins.health import ProcessHealth, read_health, write_health
# the secure server of the security tests (its fixtures, one server for this module)
from tests.integration.test_security import allowed_publish, denied_publish, provisioned, secured  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_each_process_writes_its_own_health_entry_and_everyone_reads_them(provisioned) -> None:  # noqa: F811
    s = provisioned
    coord, a1 = await s.as_("coordinator"), await s.as_("agent", "a1")
    cli, status = await s.as_("cli"), await s.as_("status")
    bucket = plugins_bucket(s.ns)
    try:
        await write_health(coord, s.ns, ProcessHealth(process="coordinator.box-1", role="coordinator"))
        await write_health(a1, s.ns, ProcessHealth(process="agent.a1", role="agent"))
        for reader in (cli, status, a1):
            assert [r.process for r in await read_health(reader, s.ns)] == ["agent.a1", "coordinator.box-1"]
        # no one writes another's entry
        assert await denied_publish(a1, f"$KV.{bucket}.agent.a2")
        assert await denied_publish(a1, f"$KV.{bucket}.coordinator.box-1")
        assert await denied_publish(coord, f"$KV.{bucket}.agent.a1")
        for nc in (cli, status):
            assert await denied_publish(nc, f"$KV.{bucket}.coordinator.box-1")
            assert await denied_publish(nc, f"$KV.{bucket}.agent.a1")
        assert await allowed_publish(a1, f"$KV.{bucket}.agent.a1")
        # and the health bucket opens no other bucket to the agent
        assert await denied_publish(a1, f"$KV.{s.ns.tasks_bucket}.k")
    finally:
        for nc in (coord, a1, cli, status):
            await nc.close()
