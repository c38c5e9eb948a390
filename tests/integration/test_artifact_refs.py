"""An artifact's reference and digest against a real object store: the reference is the
bucket and the name ``nats object get`` takes, and the digest a report carries is the
one the object store records for the bytes it holds (``nats object info`` shows it)."""

from __future__ import annotations

import pytest

from events.errors import ConfigError
from events.refs import object_digest, split_ref
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.nats.provisioning import provision_agent

pytestmark = pytest.mark.timeout(60)


async def test_a_reference_fetches_its_object_and_the_digests_agree(nc, ns, store):
    await provision_agent(nc, ns, "agent-1")
    artifacts = ObjectStoreArtifacts(nc, ns.agent_artifacts_bucket("agent-1"))
    diff = b"--- a/app.py\n+++ b/app.py\n@@ -1 +1 @@\n-old\n+new\n"
    ref = await artifacts.put("diffs/acme_app-7/1.diff", diff)
    assert ref == f"{ns.agent_artifacts_bucket('agent-1')} diffs/acme_app-7/1.diff"

    bucket, name = split_ref(ref)  # what `nats object get <ref>` is handed
    obs = await nc.jetstream().object_store(bucket)
    assert (await obs.get(name)).data == diff
    info = await obs.get_info(name)
    assert info.digest == object_digest(diff)  # the report's digest is the store's own

    log_ref = await artifacts.put_text("logs/acme_app-7/1/tests.log", "3 passed\n")
    assert split_ref(log_ref).name == "logs/acme_app-7/1/tests.log"


async def test_a_name_the_reference_cannot_carry_is_refused_before_storing(nc, ns, store):
    artifacts = ObjectStoreArtifacts(nc, ns.artifacts_bucket)
    with pytest.raises(ConfigError, match="without whitespace"):
        await artifacts.put("logs/my tests.log", b"x")
    assert (await nc.jetstream().stream_info(f"OBJ_{ns.artifacts_bucket}")).state.messages == 0
