"""End to end on the GitHub path, offline, through the real client libraries:

a signed ``issues.opened`` webhook -> task -> the Anthropic coder (against a local
Messages API server) -> the branch pushed over git's smart HTTP with token auth ->
the PR opened through the GitHub REST API (PyGithub against a local server) ->
labels and the tracking comment kept up to date -> a ``pull_request.closed`` (merged)
webhook -> Completed."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import pytest

from actors.agent import Agent, AgentConfig
from actors.coordinator import Coordinator, CoordinatorConfig
from actors.forge_sync import ForgeSync
from actors.pipeline import PipelineSettings
from infra.adapters.coders.anthropic_coder import AnthropicCoder
from infra.adapters.forge.github import GitHubForge
from infra.adapters.forge.github_checks import GitHubChecks
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.obs.masking import mask_secrets
from events.codec import encode
from events.trust import TrustPolicy
from infra.adapters.http.webhook import WebhookServer
from tests.conftest import eventually
from tests.fakes.anthropic_api import fake_anthropic, tool_call  # noqa: F401 - fixture
from tests.fakes.github_api import FakeGitHub, fake_github_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(90)
TOKEN = "ghp_fake_token_123456"
SECRET = "webhook-secret-for-tests"
HOOKS = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"
REPO = "octo/calc"
FILES = {
    "calc.py": "def add(a, b):\n    return a - b\n",
    "tests/__init__.py": "",
    "tests/test_calc.py": ("import unittest\n\nfrom calc import add\n\n\n"
                           "class T(unittest.TestCase):\n    def test_add(self):\n"
                           "        self.assertEqual(add(2, 3), 5)\n"),
    ".ccc/test-command": "python3 -m unittest discover -s tests -v\n",
}


def fresh(node) -> None:
    """The payload's own times set to now: the receiver refuses deliveries older than its
    freshness window, and the fixtures are GitHub's examples from 2019."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("created_at", "updated_at", "closed_at", "merged_at", "submitted_at") and value:
                node[key] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            else:
                fresh(value)
    elif isinstance(node, list):
        for item in node:
            fresh(item)


def payload(name: str, **changes) -> dict:
    data = copy.deepcopy(json.loads((HOOKS / f"{name}.json").read_text()))
    fresh(data)
    owner, repo = REPO.split("/")
    data["repository"].update(full_name=REPO, name=repo)
    data["repository"]["owner"]["login"] = owner
    for path, value in changes.items():
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return data


async def deliver(url: str, event: str, body: dict) -> httpx.Response:
    raw = json.dumps(body).encode()
    headers = {
        "X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json",
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest(),
    }
    async with httpx.AsyncClient() as client:
        return await client.post(f"{url}/webhook", content=raw, headers=headers)


async def test_webhook_to_merged_pull_request(nc, ns, store, tmp_path, fake_github: FakeGitHub,
                                              fake_anthropic):  # noqa: F811 - the fixture
    server, base_url = fake_anthropic
    server.add(
        tool_call("edit_file", {"path": "calc.py", "old_string": "return a - b", "new_string": "return a + b"}),
        tool_call("run_command", {"command": "python3 -m unittest discover -s tests"}),
        tool_call("finish", {"summary": "add() returned a - b; it returns a + b now."}),
    )
    fake_github.init_git_repo(REPO, FILES)
    number = fake_github.add_issue(REPO, "add() subtracts", "calc.py: add(2, 3) is -1", labels=["ccc"])
    forge = GitHubForge(TOKEN, api_url=fake_github.base_url, env={}, seconds_between_requests=None,
                        seconds_between_writes=None, retries=0,
                        git_url_template=f"{fake_github.root}/git/{{repo}}.git")
    coder = AnthropicCoder(client=anthropic.AsyncAnthropic(api_key="test-key", base_url=base_url),
                           default_model="claude-sonnet-4-6")
    # trusted = write access, as GitHub's permission API says: the receiver asks, the intake re-checks
    trust = TrustPolicy(permission_required_for=frozenset({"github"}))
    fake_github.set_permission(REPO, "Codertocat", "write")  # the payloads' author
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=10, trust=trust))
    agent = Agent(nc, ns, AgentConfig(
        agent_id="gh-agent", specialties=("general",), heartbeat_interval=0.5,
        pipeline=PipelineSettings(test_timeout=60)),
        workbench=GitWorkbench(tmp_path / "ws"), coder=coder, forge=forge,
        artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket))
    sync = ForgeSync(nc, ns, forge, mask=mask_secrets, live=coordinator.live)
    hooks = WebhookServer(nc, ns, port=0, secret=SECRET, trust=trust, permissions=forge.author_permission,
                          checks=GitHubChecks(forge))
    await coordinator.start()
    await agent.start()
    await sync.start()
    await hooks.start()
    try:
        opened = payload("issues.opened", **{
            "issue.number": number, "issue.title": "add() subtracts", "issue.body": "calc.py: add(2, 3) is -1",
            "issue.labels": [{"name": "ccc", "color": "ededed"}], "issue.author_association": "OWNER"})
        r = await deliver(hooks.url, "issues", opened)
        assert r.status_code == 200, r.text
        task_id = f"gh-octo_calc-{number}"  # a GitHub issue's task
        assert len(fake_github.permission_requests(REPO, "Codertocat")) == 1

        def task():
            return coordinator.model.tasks.get(task_id)

        # the pull request is open: its checks are awaited (GitHub runs them; a webhook says when)
        await eventually(lambda: task() is not None and task().status == "checking", timeout=45)
        t = task()
        await eventually(lambda: "ccc:checking" in fake_github.issue_labels(REPO, number))
        fake_github.add_workflow_run(REPO, t.head_sha, {"test": "success"}, branch=t.branch)
        suite = payload("check_suite.completed")
        suite["check_suite"].update(head_sha=t.head_sha, head_branch=t.branch)
        for pr in suite["check_suite"]["pull_requests"]:
            pr["number"] = t.pr_number
            pr["head"].update(ref=t.branch, sha=t.head_sha)
        r = await deliver(hooks.url, "check_suite", suite)
        assert r.status_code == 200, r.text
        await eventually(lambda: task().status == "review", timeout=20)
        t = task()
        assert [(c.name, c.conclusion) for c in t.checks] == [("test", "success")] and t.green_at is not None
        assert t.issue.source == "github" and t.pr_number is not None and t.tests_passed == 1
        with fake_github.lock:
            pull = fake_github._pull_json(fake_github.repos[REPO], t.pr_number)  # as the API shows it
        assert pull["head"]["ref"] == t.branch and f"#{number}" in pull["body"] and t.pr_url == pull["html_url"]
        # the model's usage and cost ride on the events
        assert t.input_tokens > 0 and t.dollars > 0
        # labels and one tracking comment follow the task
        await eventually(lambda: "ccc:review" in fake_github.issue_labels(REPO, number))

        def tracking() -> list[dict]:
            return [c for c in fake_github.comments_on(REPO, number) if f"ccc:task:{task_id}" in c["body"]]

        # label and comment are separate API calls: wait for the comment to catch up
        await eventually(lambda: any(pull["html_url"] in c["body"] for c in tracking()))
        comments = tracking()
        assert len(comments) == 1 and pull["html_url"] in comments[0]["body"]
        # the token never appears in an event, task or agent
        everything = [x async for x in store.read()]
        assert everything and all(TOKEN.encode() not in encode(item) for _, item in everything)

        merged = payload("pull_request.closed", **{
            "pull_request.number": t.pr_number, "pull_request.merged": True,
            "pull_request.head.ref": t.branch, "pull_request.head.repo.full_name": REPO})
        r = await deliver(hooks.url, "pull_request", merged)
        assert r.status_code == 200, r.text
        await eventually(lambda: task().status == "completed")
        await eventually(lambda: "ccc:done" in fake_github.issue_labels(REPO, number))
        assert len([c for c in fake_github.comments_on(REPO, number)
                    if f"ccc:task:{task_id}" in c["body"]]) == 1
    finally:
        await hooks.stop()
        await sync.stop()
        await agent.stop()
        await coordinator.stop()
        forge.close()
