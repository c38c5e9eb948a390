"""The Claude analyser (the policy in ``actors``, its model in ``infra``) against a local
Messages API server (real ``anthropic`` client): a good structured answer is used;
anything else falls back to the rules, saying why."""

from __future__ import annotations

import inspect
from pathlib import Path

import anthropic
import pytest
from tests.fakes.anthropic_api import ApiError, FakeAnthropic, fake_anthropic, reply, tool_call, usage  # noqa: F401

from actors.analysis import Analyser, analyse_issue
from actors.claude_analysis import TOOL_NAME, ClaudeAnalyser
from events.subjects import task_id_for
from events.task import IssueRef
from infra.adapters.coders import prices
from infra.adapters.coders.claude_analyser import ClaudeToolModel
from infra.adapters.obs.masking import mask_secrets

pytestmark = pytest.mark.timeout(60)

MODEL = "claude-haiku-4-5"
ISSUE = IssueRef(source="github", repo="acme/shop", number=42, title="Checkout API returns 500 on empty cart",
                 body="POST /api/checkout with an empty cart crashes. Depends on #40.", labels=("bug",))
GOOD = {"specialty": "backend", "complexity": "small", "priority": "high", "security_level": "public",
        "dependencies": [40, 41, 42], "requirements": ["Python", "fastapi"],
        "plan": "1. Reproduce in a test\n2. Guard the empty cart\n3. Return 400", "rationale": "API handler bug"}


@pytest.fixture
def fake(fake_anthropic: tuple[FakeAnthropic, str]) -> FakeAnthropic:  # noqa: F811
    return fake_anthropic[0]


def analyser_for(fake: FakeAnthropic, *, retries: int = 0) -> ClaudeAnalyser:
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake.base_url, max_retries=retries)
    return ClaudeAnalyser(ClaudeToolModel(client=client, model=MODEL), mask=mask_secrets)


async def test_good_structured_result(fake: FakeAnthropic) -> None:
    fake.add(tool_call(TOOL_NAME, GOOD, use=usage(800, 120)))
    analyser: Analyser = analyser_for(fake)  # the protocol the coordinator takes
    assert analyser.name == "claude" and inspect.iscoroutinefunction(analyser.analyse)
    a = await analyser.analyse(ISSUE)
    assert a.reasons[0] == f"analysed by Claude ({MODEL})"
    assert (a.specialty, a.complexity, a.priority, a.security_level) == ("backend", "small", "high", "public")
    # not itself; "#40" is an issue of the same forge (GitHub): its task's id says so
    assert a.dependencies == (task_id_for("acme/shop", 40, "github"), task_id_for("acme/shop", 41, "github"))
    assert a.requirements == ("fastapi", "python") and a.plan.startswith("1. Reproduce")
    assert "API handler bug" in a.reasons
    assert a.usage is not None and a.usage.model == MODEL and a.usage.input_tokens == 800
    assert a.usage.dollars == pytest.approx(prices.cost(MODEL, input_tokens=800, output_tokens=120))

    sent = fake.requests[0].body
    assert sent["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
    assert sent["tools"][0]["name"] == TOOL_NAME and sent["model"] == MODEL
    assert "empty cart crashes" in sent["messages"][0]["content"]


async def test_rules_stay_authoritative_for_security_and_written_dependencies(fake: FakeAnthropic) -> None:
    issue = IssueRef(source="github", repo="acme/shop", number=7, title="Token leak in logs",
                     body="Blocked by #5.", labels=("restricted",))
    fake.add(tool_call(TOOL_NAME, {**GOOD, "dependencies": [], "security_level": "internal"}))
    a = await analyser_for(fake).analyse(issue)
    assert a.security_level == "restricted" and a.dependencies == (task_id_for("acme/shop", 5, "github"),)
    assert any("raised from internal to restricted" in r for r in a.reasons)


@pytest.mark.parametrize("answer", [
    reply("I think this is a backend issue."),  # no tool call at all
    tool_call(TOOL_NAME, {**GOOD, "specialty": "wizardry"}),  # unknown specialty
    tool_call(TOOL_NAME, {**GOOD, "dependencies": ["soon"]}),  # not issue numbers
    tool_call(TOOL_NAME, {"specialty": "backend"}),  # fields missing
])
async def test_garbage_result_falls_back_to_rules(fake: FakeAnthropic, answer: dict) -> None:
    fake.add(answer)
    a = await analyser_for(fake).analyse(ISSUE)
    rules = analyse_issue(ISSUE)
    assert (a.specialty, a.dependencies) == (rules.specialty, rules.dependencies)
    assert a.reasons[:-1] == rules.reasons
    assert a.reasons[-1].startswith("Claude unavailable (") and a.reasons[-1].endswith("rule-based analysis used")
    assert a.usage is not None and a.usage.dollars > 0  # the call was made and paid for


async def test_api_error_falls_back_to_rules(fake: FakeAnthropic) -> None:
    fake.add(*[ApiError(500, "api_error", "Internal server error", {"retry-after": "0"})] * 2)
    a = await analyser_for(fake, retries=1).analyse(ISSUE)
    assert a.reasons[:-1] == analyse_issue(ISSUE).reasons and len(fake.requests) == 2
    assert "Claude unavailable (Anthropic API error: 500 api_error: Internal server error)" in a.reasons[-1]
    assert a.usage is None


async def test_forced_tool_choice_rejected_retries_with_auto(fake: FakeAnthropic) -> None:
    fake.add(ApiError(400, "invalid_request_error", "tool_choice: type \"tool\" is not supported for this model"),
             tool_call(TOOL_NAME, GOOD))
    a = await analyser_for(fake).analyse(ISSUE)
    assert a.reasons[0].startswith("analysed by Claude") and a.specialty == "backend"
    assert [r.body["tool_choice"]["type"] for r in fake.requests] == ["tool", "auto"]


async def test_not_configured_falls_back_without_a_request(fake: FakeAnthropic, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-config"))
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("HOME", str(tmp_path))
    a = await ClaudeAnalyser(ClaudeToolModel(), mask=mask_secrets).analyse(ISSUE)
    assert a.reasons[:-1] == analyse_issue(ISSUE).reasons and "not configured" in a.reasons[-1]
    assert fake.requests == []


async def test_the_reason_recorded_carries_no_secret(fake: FakeAnthropic) -> None:
    leaked = "sk-ant-api03-" + "x" * 40
    fake.add(ApiError(500, "api_error", f"upstream said: bad key {leaked}", {"retry-after": "0"}))
    a = await analyser_for(fake).analyse(ISSUE)
    assert "Claude unavailable (Anthropic API error: 500" in a.reasons[-1]
    assert leaked not in a.reasons[-1] and "***" in a.reasons[-1]


# -- the spend ledger: the analysis call is charged like an agent's --------------------------
async def test_the_analysis_call_is_charged_to_the_ledger_and_a_spent_scope_falls_back_to_the_rules(
        fake: FakeAnthropic, nc) -> None:
    import os
    import time

    import msgspec

    from events.spend import Caps, Entry, Scope, period_of
    from events.subjects import Namespace
    from infra.adapters.nats.cluster_config import BUDGET, write_setting
    from infra.adapters.nats.provisioning import provision, spend_bucket
    from infra.adapters.nats.spend_ledger import KVSpendLedger
    from tests.conftest import eventually

    ns = Namespace("tan" + os.urandom(4).hex())
    await provision(nc, ns)
    await write_setting(nc, ns, BUDGET, Caps(repo=0.05))
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake.base_url, max_retries=0)
    model = ClaudeToolModel(client=client, model=MODEL, ledger=KVSpendLedger(nc, ns, name="analyser"))
    analyser = ClaudeAnalyser(model, mask=mask_secrets)
    try:
        fake.add(tool_call(TOOL_NAME, GOOD, use=usage(800, 120)))
        a = await analyser.analyse(ISSUE)
        assert a.reasons[0] == f"analysed by Claude ({MODEL})"
        kv = await nc.jetstream().key_value(spend_bucket(ns))
        day = period_of(time.time())
        repo = msgspec.json.decode((await kv.get(Scope("repo", "acme/shop").key(day))).value, type=Entry)
        task = msgspec.json.decode((await kv.get(Scope("task", task_id_for("acme/shop", 42, "github")).key(day)))
                                   .value, type=Entry)
        cost = round(prices.cost(MODEL, input_tokens=800, output_tokens=120) * 1e6)
        assert abs(repo.spent - cost) <= 1 and repo.holds == {} and task.spent == repo.spent
        # the repository's cap spent: no call is made, the rules answer and say why
        await write_setting(nc, ns, BUDGET, Caps(repo=repo.spent / 1e6))
        await eventually(lambda: model.ledger.caps.repo == repo.spent / 1e6, timeout=5)
        a = await analyser.analyse(ISSUE)
        assert len(fake.requests) == 1, "no call in an exhausted scope"
        assert any(r.startswith("Claude unavailable (budget:repo:acme/shop exhausted") for r in a.reasons), a.reasons
    finally:
        await analyser.close()
