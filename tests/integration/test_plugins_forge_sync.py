"""The tracking-comment hook through a real ForgeSync (real nats-server, the real PyGithub
client against the local fake GitHub): a plugin's text goes on the issue's tracking
comment; a plugin that hangs is left out after its timeout and the comment is written
anyway (the point fails open)."""

from __future__ import annotations

import msgspec
import pytest

from actors.forge_sync import ForgeSync
from actors.plugins import PluginHooks
from events import task_state as ts
from events.task import Analysis
from infra.adapters.obs.masking import mask_secrets
from infra.adapters.plugins import discovery
from infra.adapters.plugins.host import PluginHost
from tests.conftest import eventually
from tests.fakes.github_api import fake_github_fixture  # noqa: F401 - fixture
from tests.integration.test_forge_github import make_forge
from tests.integration.test_forge_sync import AT, REPO, Task, reflects, tracking

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

if discovery.find("ccc.hooks", "example-notifier") is None:  # fail loudly, not with a KeyError later
    pytest.fail("the example plugins are not installed: pip install -e ./tests/plugins/ccc_example_plugins "
                "(the README's test command installs them)", pytrace=False)


@pytest.fixture
def forge(fake_github):
    f = make_forge(fake_github)
    yield f
    f.close()


async def test_a_plugins_text_is_on_the_tracking_comment_and_a_hanging_one_is_left_out(
        nc, ns, store, fake_github, forge):
    host = PluginHost(["example-faulty", "example-label-gate"],
                      (("EXAMPLE_FAULTY_MODE", "hang"), ("EXAMPLE_FAULTY_TIMEOUT", "0.2")))
    await host.start()
    sync = ForgeSync(nc, ns, forge, mask=mask_secrets, plugins=PluginHooks(host))
    await sync.start()
    n = fake_github.add_issue(REPO, "Refactor everything", labels=["hold"])
    task = Task(store, REPO, n)
    task.issue = msgspec.structs.replace(task.issue, labels=("hold",))
    try:
        await task.create()
        await task.do(ts.StartAnalysis(at=AT, actor="c"))
        await task.do(ts.RecordAnalysis(at=AT, actor="c", analysis=Analysis(specialty="backend")))
        await eventually(reflects(fake_github, n, task.id, "ccc:queued", "queued, waiting for an agent",
                                  "**`example-label-gate`:** On hold: remove the `hold` label to let an agent "
                                  "take it."))
        [body] = tracking(fake_github, n, task.id)
        assert "example-faulty" not in body
        assert host.counts("example-faulty").timeout >= 1
        # once assigned, the gate has nothing to add: its text goes
        await task.do(ts.AssignTask(at=AT, actor="c", agent_id="agent-1"))
        await eventually(reflects(fake_github, n, task.id, "ccc:in-progress", "assigned to an agent"))
        assert "example-label-gate" not in tracking(fake_github, n, task.id)[0]
    finally:
        await sync.stop()
        await host.stop()
