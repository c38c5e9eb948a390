"""Loading plugins (infra.adapters.plugins: discovery, host) and what the actors make of
their answers (actors.plugins), with the example package (tests/plugins/
ccc_example_plugins, installed beside the project: ``pip install -e
./tests/plugins/ccc_example_plugins``) as the installed plugins. No NATS here: the
health on the bus is in tests/integration/test_plugins_cluster.py."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import msgspec
import pytest

from actors.analysis import Analyser
from actors.forge_sync import render_comment
from actors.plugins import (
    ALLOW,
    NO_PLUGINS,
    Delay,
    PluginHooks,
    Ruling,
    Veto,
    check_assignment,
    check_pull_request,
    check_text,
    hold_for,
)
from actors.ports import Coder, ForgeClient
from events import task_state as ts
from events.agent_state import AgentState
from events.errors import ConfigError
from infra.adapters.nats.settings import load_settings
from infra.adapters.plugins import discovery
from infra.adapters.plugins.host import PluginHost
from infra.shell.app.cluster import make_analyser, make_coder, make_forge
from projections.waits import Waits, why_waiting
from tests.support.domain import AT, ISSUE, history

pytestmark = pytest.mark.timeout(30)

if discovery.find("ccc.hooks", "example-notifier") is None:  # fail loudly, not with a KeyError later
    pytest.fail("the example plugins are not installed: pip install -e ./tests/plugins/ccc_example_plugins "
                "(the README's test command installs them)", pytrace=False)

QUEUED = ts.fold(history("queued"))
AGENT = AgentState(agent_id="agent-1", status="idle", version=1, specialties=("general",))


def with_labels(*labels: str) -> ts.TaskState:
    return msgspec.structs.replace(QUEUED, issue=msgspec.structs.replace(ISSUE, labels=labels))


def env(**options: str) -> tuple[tuple[str, str], ...]:
    """``CCC_PLUGIN_*`` variables as settings keep them."""
    return tuple(sorted(options.items()))


@pytest.fixture
async def hosts():
    started: list[PluginHost] = []

    async def start(*names: str, **options: str) -> PluginHost:
        host = PluginHost(names, env(**options))
        await host.start()
        started.append(host)
        return host

    yield start
    for host in started:
        await host.stop()


# -- discovery, enabling, options -------------------------------------------------------------
def test_the_example_package_is_installed_in_its_groups() -> None:
    found = {(i.group, i.name): i for i in discovery.installed()}
    notifier = found[("ccc.hooks", "example-notifier")]
    assert notifier.distribution == "ccc-example-plugins" and notifier.version == "0.1.0"
    assert {("ccc.hooks", "example-protected-paths"), ("ccc.analysers", "example-rules-plus"),
            ("ccc.coders", "example-not-a-coder")} <= set(found)


def test_options_go_to_the_plugin_whose_name_fits_longest() -> None:
    variables = env(EXAMPLE_NOTIFIER_URL="http://x", EXAMPLE_NOTIFIER_TIMEOUT="0.5", EXAMPLE_URL="y",
                    OTHER_KEY="z")
    assert discovery.options_for("example-notifier", variables) == {"url": "http://x", "timeout": "0.5"}
    assert discovery.options_for("example", variables, known=["example-notifier"]) == {"url": "y"}
    shown = discovery.plugin_options({"url": "u", "timeout": "1", "queue": "3"})
    assert dict(shown) == {"url": "u"}  # the guard's own keys are not the plugin's
    with pytest.raises(TypeError):
        shown["url"] = "other"  # read-only


def test_settings_read_the_enabled_plugins_and_their_options(tmp_path) -> None:
    s = load_settings(env={"CCC_PLUGINS": "example-notifier, example-label-gate,example-notifier",
                           "CCC_PLUGIN_EXAMPLE_NOTIFIER_URL": "http://x"}, data_dir=str(tmp_path))
    assert s.plugins == ("example-notifier", "example-label-gate")
    assert s.plugin_env == (("EXAMPLE_NOTIFIER_URL", "http://x"),)
    flags = load_settings(env={"CCC_PLUGINS": "a"}, data_dir=str(tmp_path), plugins=("b", "c"))
    assert flags.plugins == ("b", "c")  # --plugin wins over the variable
    with pytest.raises(ConfigError, match="not a plugin name"):
        load_settings(env={"CCC_PLUGINS": "no spaces please"}, data_dir=str(tmp_path))


async def test_installed_is_not_enabled(hosts) -> None:
    host = await hosts()  # the example plugins are installed; none is enabled
    assert host.loaded == {} and host.implementing("on_event") == () and host.health().plugins == ()


async def test_an_enabled_name_that_is_not_installed_fails_at_once() -> None:
    with pytest.raises(ConfigError, match="example-typo: not installed"):
        PluginHost(["example-typo"])
    with pytest.raises(ConfigError, match="CCC_PLUGIN_EXAMPLE_FAULTY_TIMEOUT"):
        PluginHost(["example-faulty"], env(EXAMPLE_FAULTY_TIMEOUT="soon"))


async def test_a_broken_entry_point_is_reported_failed_and_the_rest_runs(hosts) -> None:
    host = await hosts("example-broken", "example-protected-paths", "example-notifier")
    health = {p.name: p for p in host.health().plugins}
    assert health["example-broken"].state == "failed"
    assert "No module named 'ccc_example_plugins.missing'" in health["example-broken"].error
    # its factory raised (no URL): failed too, saying why
    assert health["example-notifier"].state == "failed" and "must be an http(s) URL" in health["example-notifier"].error
    assert health["example-protected-paths"].state == "ok" and health["example-protected-paths"].hooks == (
        "pull_request",)
    assert host.implementing("pull_request") == ("example-protected-paths",)
    assert host.metrics.registry.get_sample_value("claude_plugin_healthy", {"plugin": "example-broken"}) == 0


async def test_a_factory_that_takes_too_long_is_given_up_on() -> None:
    host = PluginHost(["example-faulty"], env(EXAMPLE_FAULTY_START_SECONDS="1"), load_timeout=0.2)
    started = asyncio.get_running_loop().time()
    await host.start()
    try:
        assert asyncio.get_running_loop().time() - started < 0.8
        [state] = host.health().plugins
        assert state.state == "failed" and state.error == "its factory did not return within 0.2s"
        assert host.implementing("assignment") == ()
    finally:
        await host.stop()


# -- the guard through the host ---------------------------------------------------------------------
async def test_a_hanging_hook_times_out_at_its_configured_timeout(hosts) -> None:
    host = await hosts("example-faulty", EXAMPLE_FAULTY_MODE="hang", EXAMPLE_FAULTY_TIMEOUT="0.2")
    answer = await host.call("example-faulty", "assignment", (QUEUED, AGENT), check_assignment)
    assert answer.fault == "timeout after 0.2s"
    assert host.counts("example-faulty").timeout == 1


async def test_events_wait_on_a_bounded_queue_and_a_full_one_drops(hosts) -> None:
    host = await hosts("example-faulty", EXAMPLE_FAULTY_MODE="hang", EXAMPLE_FAULTY_QUEUE="2",
                       EXAMPLE_FAULTY_EVENT_TIMEOUT="5")
    for seq in range(1, 11):
        host.post("on_event", (seq, None, None))  # never waits, whatever the plugin does
    counts = host.counts("example-faulty")
    # one is being delivered (hung), two wait, the other seven are dropped
    assert counts.dropped >= 7
    assert host.metrics.registry.get_sample_value(
        "claude_plugin_calls_total", {"plugin": "example-faulty", "hook": "on_event", "outcome": "dropped"}) >= 7


async def test_an_event_hook_that_raises_is_counted_and_the_next_event_still_delivered(hosts) -> None:
    host = await hosts("example-faulty", EXAMPLE_FAULTY_MODE="raise", EXAMPLE_FAULTY_FAILURES="100")
    for seq in range(3):
        host.post("on_event", (seq, None, None))
    for _ in range(200):
        if host.counts("example-faulty").error == 3:
            break
        await asyncio.sleep(0.01)
    assert host.counts("example-faulty").error == 3
    assert host.health().plugins[0].state == "degraded"


# -- what the actors make of the answers ----------------------------------------------------------------
def test_answers_are_checked() -> None:
    assert check_assignment(None) == ALLOW and check_pull_request(None) == ALLOW and check_text(None) == ""
    assert check_assignment(Veto("  code\n freeze ")) == Veto("code freeze")
    assert check_assignment(Delay(5, "quiet hours")) == Delay(5.0, "quiet hours")
    assert len(check_assignment(Veto("x" * 1000)).reason) == 300
    for bad in (True, "allow", Delay(0), Delay(float("nan")), Delay(10 ** 9), Veto(3)):
        with pytest.raises((TypeError, ValueError)):
            check_assignment(bad)
    with pytest.raises(TypeError):
        check_pull_request(Delay(5))  # a pull request is refused or not: no delay
    with pytest.raises(TypeError):
        check_text(42)


async def test_no_plugins_allow_everything_and_cost_nothing() -> None:
    assert not NO_PLUGINS.decides_assignments and not NO_PLUGINS.asks_pull_requests
    assert await NO_PLUGINS.assignment(QUEUED, AGENT) == Ruling(ALLOW)
    assert await NO_PLUGINS.pull_request(QUEUED, ("a.py",), False) == Ruling(ALLOW)
    assert await NO_PLUGINS.tracking_comment(QUEUED) == ()
    NO_PLUGINS.observe(1, None, None)


async def test_assignment_fails_open_and_a_veto_wins_over_a_delay(hosts) -> None:
    host = await hosts("example-faulty", "example-label-gate", EXAMPLE_FAULTY_MODE="raise",
                       EXAMPLE_LABEL_GATE_DELAY_SECONDS="7")
    hooks = PluginHooks(host)
    assert hooks.decides_assignments
    # the faulty plugin raises: left out (fails open); the gate allows
    assert await hooks.assignment(with_labels("bug"), AGENT) == Ruling(ALLOW)
    assert await hooks.assignment(with_labels("later"), AGENT) == Ruling(
        Delay(7.0, "the issue is labelled 'later'"), "example-label-gate")
    assert await hooks.assignment(with_labels("hold", "later"), AGENT) == Ruling(
        Veto("the issue is labelled 'hold'"), "example-label-gate")
    assert host.counts("example-faulty").error == 3


async def test_pull_request_fails_closed_but_a_real_veto_is_final(hosts) -> None:
    host = await hosts("example-faulty", "example-protected-paths", EXAMPLE_FAULTY_MODE="hang",
                       EXAMPLE_FAULTY_TIMEOUT="0.1")
    hooks = PluginHooks(host)
    ruling = await hooks.pull_request(QUEUED, ("src/app.py",), False)
    assert isinstance(ruling.decision, Veto) and ruling.plugin == "example-faulty"
    assert ruling.fault == "timeout after 0.1s" and "fail closed" in ruling.decision.reason
    ruling = await hooks.pull_request(QUEUED, ("src/app.py", ".github/workflows/ci.yml"), False)
    assert ruling.plugin == "example-protected-paths" and ruling.fault == ""  # not retryable
    assert ruling.decision.reason == "touches protected paths (.github/workflows/**): .github/workflows/ci.yml"


async def test_tracking_comment_text_fails_open(hosts) -> None:
    host = await hosts("example-faulty", "example-label-gate", EXAMPLE_FAULTY_MODE="nonsense")
    notes = await PluginHooks(host).tracking_comment(with_labels("hold"))
    assert notes == (("example-label-gate", "On hold: remove the `hold` label to let an agent take it."),)
    assert host.counts("example-faulty").invalid == 1


def test_the_tracking_comment_shows_plugin_text_without_html_or_secrets() -> None:
    secret = "ghp_" + "A" * 36
    body = render_comment(QUEUED, lambda t: t.replace(secret, "[masked]"),
                          [("example-label-gate", f"On hold <!-- ccc:task:x --> {secret}\nsecond line")])
    assert "**`example-label-gate`:** On hold &lt;!-- ccc:task:x --&gt; [masked]\nsecond line" in body
    assert body.count("<!-- ccc:task:") == 1 and secret not in body
    assert render_comment(QUEUED, str) == render_comment(QUEUED, str, ())


def test_a_hold_is_the_tasks_wait_reason() -> None:
    ruling = Ruling(Delay(90, "quiet hours"), "example-label-gate")
    hold = hold_for(QUEUED.task_id, ruling, AT, veto_recheck=30)
    assert hold.until == AT + timedelta(seconds=90) and hold.kind == "delay"
    assert hold.words == "plugin example-label-gate delays it until 12:01:30: quiet hours"
    veto = hold_for(QUEUED.task_id, Ruling(Veto("frozen"), "freeze"), AT, veto_recheck=30)
    assert veto.until == AT + timedelta(seconds=30) and veto.words == "plugin freeze vetoes it: frozen"
    assert hold_for(QUEUED.task_id, Ruling(ALLOW), AT, 30) is None
    tasks = {QUEUED.task_id: QUEUED}
    plugins = {QUEUED.task_id: veto.words}
    assert why_waiting(QUEUED, tasks, AT, plugins=plugins) == "plugin freeze vetoes it: frozen"
    assert Waits(tasks, plugins=plugins).why(QUEUED, AT) == "plugin freeze vetoes it: frozen"
    assert why_waiting(QUEUED, tasks, AT) == "waiting for an agent"  # without the holds


# -- coders, forges, analysers by name -----------------------------------------------------------------
def test_a_coder_forge_or_analyser_plugin_is_checked_against_the_actors_protocol(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"NotACoder is not a Coder: no attribute 'name'; implement\(\) must be "
                                          r"async"):
        make_coder("example-not-a-coder", None)
    analyser = make_analyser("example-rules-plus")
    assert analyser.name == "example-rules-plus" and not discovery.protocol_gaps(analyser, Analyser)
    analysis = asyncio.run(analyser.analyse(msgspec.structs.replace(ISSUE, labels=("urgent",))))
    assert analysis.priority == "urgent"
    with pytest.raises(ConfigError, match="choose one of scripted, anthropic, claude-code, or a coder plugin: "
                                          "example-not-a-coder"):
        make_coder("nope", None)
    with pytest.raises(ConfigError, match="choose one of local, github$"):
        make_forge("nope", tmp_path)
    assert discovery.protocol_gaps(make_forge("local", tmp_path), ForgeClient) == []
    assert discovery.protocol_gaps(make_coder("scripted", None), Coder) == []


def test_protocol_gaps_name_what_is_missing() -> None:
    @dataclasses.dataclass
    class Half:
        name: str = "x"

        def clone_url(self, repo):
            return ""

        def open_pull_request(self, **kw):  # must be async
            return "", None

    assert discovery.protocol_gaps(Half(), ForgeClient) == ["no method git_env()", "open_pull_request() must be async"]
