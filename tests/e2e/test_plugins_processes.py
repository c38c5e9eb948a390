"""Plugins in real processes: ``ccc up --plugin`` (the coordinator's process) and a
standalone ``ccc agent --plugin`` with its own agent credentials on the embedded secure
server. The agent's pull-request policy refuses a change to a protected path; ``ccc
plugins`` shows both processes' plugins, each reported by its own process under its own
key (the agent's credentials may write only ``agent.<its id>``)."""

from __future__ import annotations

import json
import signal

import pytest

from infra.adapters.plugins import discovery
from tests.support.e2e import (
    FIX,
    Processes,
    ccc,
    make_repo,
    publish,
    status_is,
    wait_for,
    wait_task,
    write_script,
)

pytestmark = pytest.mark.timeout(120)

if discovery.find("ccc.hooks", "example-protected-paths") is None:
    pytest.fail("the example plugins are not installed: pip install -e ./tests/plugins/ccc_example_plugins "
                "(the README's test command installs them)", pytrace=False)

WORKFLOW = [{"write": {"path": ".github/workflows/ci.yml", "content": "on: push\njobs: {}\n"}}]


@pytest.fixture
def procs(tmp_path):
    owner = Processes(tmp_path)
    yield owner
    owner.close()
    print(owner.logs())  # pytest shows it only when the test failed


def processes(data_dir) -> dict[str, dict]:
    result = ccc(data_dir, "plugins", "--json", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {r["process"]["process"]: r["process"] for r in records if "process" in r}


def test_a_standalone_agents_policy_and_the_health_of_both_processes(procs, tmp_path):
    data_dir = tmp_path / "data"
    make_repo(data_dir)
    scripts = tmp_path / "scripts"
    write_script(scripts, 1, [*FIX, *WORKFLOW])
    _, api = procs.up(data_dir, "--agents", "0", "--heartbeat-timeout", "2", "--plugin", "example-label-gate")
    agent = procs.start("solo", data_dir, "agent", "--specialty", "backend", "--script-dir", str(scripts),
                        "--heartbeat-interval", "0.3", "--agent-id", "solo", "--plugin", "example-protected-paths")
    agent.wait_for_output("agent solo (backend) registered")

    task_id = publish(data_dir, "Fix add", number=1)
    task = wait_task(data_dir, task_id, status_is("failed"), what="failed", api=api)
    assert task["failure_phase"] == "policy" and task["agent_id"] == "solo"
    assert task["failure_reason"].startswith("plugin example-protected-paths refused the pull request: "
                                             "touches protected paths (.github/workflows/**): .github/workflows/ci.yml")

    def reported() -> dict | None:  # (each process rewrites its entry every few seconds)
        p = processes(data_dir)
        calls = [r["plugins"][0]["counts"]["ok"] for r in p.values() if r["plugins"]]
        return p if "agent.solo" in p and len(p) == 2 and calls and min(calls) >= 1 else None

    seen = wait_for(reported, 20, "both processes' plugin health, after their calls")
    coordinator = next(r for key, r in seen.items() if key.startswith("coordinator."))
    assert coordinator["enabled"] == ["example-label-gate"]
    assert [(p["name"], p["state"]) for p in coordinator["plugins"]] == [("example-label-gate", "ok")]
    assert coordinator["plugins"][0]["counts"]["ok"] >= 1  # it was asked about the assignment
    solo = seen["agent.solo"]
    assert solo["role"] == "agent" and solo["enabled"] == ["example-protected-paths"]
    [policy] = solo["plugins"]
    assert policy["state"] == "ok" and policy["hooks"] == ["pull_request"] and policy["counts"]["ok"] == 1

    table = ccc(data_dir, "plugins", check=True).stdout
    assert "agent.solo" in table and "example-protected-paths" in table and "example-label-gate" in table

    assert agent.stop(signal.SIGTERM) == 0
    closed = wait_for(lambda: processes(data_dir).get("agent.solo", {}).get("plugins", [{}])[0].get("state")
                      == "closed", 10, "the agent's last entry")
    assert closed
