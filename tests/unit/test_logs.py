"""Logs: every line passes one masking processor. The leak test below pushes each kind
of secret through each way a value reaches a log line and checks none comes out."""

from __future__ import annotations

import io
import json
import logging

import nkeys
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.adapters.obs.logs import bind, configure_logging
from infra.adapters.obs.masking import add_secrets, mask
from infra.adapters.obs.tracing import setup_tracing
from tests.support.logs import restore_logging  # noqa: F401 - fixture

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("restore_logging")]

ENV_SECRETS = {
    "ANTHROPIC_API_KEY": "sk-" "ant-api03-Zx9kQ2mW7pL4vB8nR1tY6uE3oI5aS0dF-abcdef",
    "GITHUB_TOKEN": "gh" "p_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "CCC_WEBHOOK_SECRET": "webhook shared secret 8f3c",  # no token shape: only the env knows
    "NATS_TOKEN": "s3cr3t-nats-t0ken",
    "NATS_NKEY": "plain-nkey-value-42",  # not *_KEY: listed explicitly
    "DEPLOY_PASSWORD": "correct horse battery",  # any secret-looking name
}
CONFIGURED = "configured-secret-Qw8"  # passed to configure_logging(secrets=...)
SHAPES = {  # known token shapes, masked even when nobody configured them
    "anthropic": "sk-" "ant-api03-NotInEnvButLooksLikeAKey_123456",
    "github_classic": "ghp_" + "Z" * 36,
    "github_fine": "github" "_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    # made at run time: no credential-shaped literal in the source (scanners flag them)
    "nats_jwt": "ey" "J0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.ey" "JqdGkiOiJBQkNERUZHIn0.c2lnbmF0dXJl",
    "nats_seed": nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER).decode(),
}
URL_PASSWORD = "pa55w0rd-in-url"
ALL = [*ENV_SECRETS.values(), CONFIGURED, *SHAPES.values(), URL_PASSWORD]


@pytest.fixture
def env(monkeypatch):
    for k, v in ENV_SECRETS.items():
        monkeypatch.setenv(k, v)


def _leak_everything(log) -> None:
    """Every secret through every channel."""
    for name, secret in [*ENV_SECRETS.items(), ("configured", CONFIGURED), *SHAPES.items()]:
        log.warning(f"message with {secret} inside")  # the message itself
        log.info("kw", value=secret, named=name)  # a keyword value
        log.info("nested", cfg={"outer": {"list": [1, f"x{secret}y", ("t", secret)]}, "n": 3})
        try:
            raise RuntimeError(f"failed with credential {secret}")
        except RuntimeError as e:
            log.error("caught", exc_info=True)  # noqa: G201 - the traceback text, as kw
            log.exception("caught again")
            log.info("as value", error=e)  # the exception object as a value
        logging.getLogger("nats").warning("nats said %s", secret)  # a stdlib logger, %-args
        try:
            raise ConnectionError(f"nats://{secret}@nats.internal:4222 refused")
        except ConnectionError:
            logging.getLogger("uvicorn.error").exception("stdlib exception")
        with bind(task_id="acme_app-1", leaky=secret):  # a bound context value
            log.info("bound")
    url = f"https://deploy:{URL_PASSWORD}@git.example.com/acme/app.git"
    log.info("cloning", url=url)
    log.info(f"cloning {url}")
    log.info("query", url=f"https://api.example.com/x?access_token={URL_PASSWORD}&page=2")
    logging.getLogger("git").info("push to %s", url)
    log.info("header", headers={"Authorization": f"Bearer {URL_PASSWORD}"},
             line=f"Authorization: Bearer {URL_PASSWORD}")


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "console"])
def test_no_secret_leaks_through_any_channel(env, as_json):
    out = io.StringIO()
    configure_logging("debug", json=as_json, stream=out, secrets=[CONFIGURED])
    log = structlog.get_logger("ccc.leaktest")
    _leak_everything(log)
    text = out.getvalue()
    assert text.count("\n") > 100 and "***" in text
    leaked = [s for s in ALL if s in text]
    assert not leaked, f"leaked: {leaked}"
    for fragment in ("pa55w0rd", "Zx9kQ2mW7pL4", "A1b2C3d4E5", "s3cr3t-nats", "correct horse"):
        assert fragment not in text
    # ...while ordinary text survives
    assert "nats.internal:4222" in text and "git.example.com/acme/app.git" in text
    assert "failed with credential" in text and "RuntimeError" in text
    if as_json:
        for line in text.splitlines():
            json.loads(line)


def test_secrets_added_at_run_time_are_masked():
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    add_secrets("installation-token-abc123")
    structlog.get_logger("ccc.x").info("got token", token="installation-token-abc123")
    assert "installation-token-abc123" not in out.getvalue()
    assert mask({"a": ["installation-token-abc123"]}) == {"a": ["***"]}


def test_mask_keeps_ordinary_text():
    ordinary = ("task acme_app-7 queued", "input_tokens=1200 output_tokens=300", "Bearer of bad news",
                "https://github.com/acme/app/pull/3", "nats://127.0.0.1:4222", "sha256:" + "ab" * 32,
                "SELECT * FROM tasks")
    for text in ordinary:
        assert mask(text) == text
    assert mask({"tokens": 12, "max_input_tokens": 3, "ok": True, "none": None}) == {
        "tokens": 12, "max_input_tokens": 3, "ok": True, "none": None}
    assert mask("curl -H 'Authorization: Bearer abcdefgh12345'") == "curl -H 'Authorization: ***'"
    assert mask("Bearer abcdefgh12345") == "Bearer ***"
    assert mask({"password": "short", "X-Api-Key": "k", "cfg": {"github_token": "abc"}}) == {
        "password": "***", "X-Api-Key": "***", "cfg": {"github_token": "***"}}
    assert mask("nats://tok3n@host:4222 and tls://user:pw@host") == "nats://***@host:4222 and tls://***@host"


def test_json_lines_carry_bound_ids_and_trace_ids():
    out = io.StringIO()
    configure_logging("info", stream=out)  # StringIO is not a terminal: JSON by default
    log = structlog.get_logger("ccc.agent")
    memory = InMemorySpanExporter()
    tracer = setup_tracing("t", exporter=memory, set_global=False).get_tracer("t")
    with bind(task_id="acme_app-7", agent_id="agent-a", correlation_id="acme_app-7"):
        with tracer.start_as_current_span("phase") as span:
            log.info("pipeline.phase_done", phase="testing", count=3)
            logging.getLogger("nats.aio.client").warning("reconnecting")
        log.info("after the span")
    log.info("outside")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == [
        "pipeline.phase_done", "reconnecting", "after the span", "outside"]
    first, stdlib, after, outside = lines
    ctx = span.get_span_context()
    for line in (first, stdlib):
        assert line["task_id"] == "acme_app-7" and line["agent_id"] == "agent-a"
        assert line["correlation_id"] == "acme_app-7"
        assert line["trace_id"] == format(ctx.trace_id, "032x")
        assert line["span_id"] == format(ctx.span_id, "016x")
    assert first["level"] == "info" and first["logger"] == "ccc.agent" and first["count"] == 3
    assert stdlib["level"] == "warning" and stdlib["logger"] == "nats.aio.client"
    assert after["task_id"] == "acme_app-7" and "trace_id" not in after
    assert "task_id" not in outside
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_rendering_on_a_terminal(env):
    out = FakeTty()
    configure_logging("info", stream=out)
    log = structlog.get_logger("ccc.cli")
    with bind(task_id="acme_app-2"):
        log.info("task.queued", priority="high", token=ENV_SECRETS["GITHUB_TOKEN"])
    text = out.getvalue()
    assert "task.queued" in text and "acme_app-2" in text and "priority" in text
    assert "\x1b[" in text  # colours on a terminal
    assert ENV_SECRETS["GITHUB_TOKEN"] not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_levels_filter_ours_and_the_libraries(capsys):
    configure_logging("warning", json=True)  # no stream: sys.stderr at each write
    structlog.get_logger("ccc.x").info("quiet")
    logging.getLogger("nats").info("quiet too")
    structlog.get_logger("ccc.x").warning("loud")
    logging.getLogger("nats").error("loud too")
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert events == ["loud", "loud too"]


def test_reconfiguring_replaces_the_handler():
    a, b = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=a)
    configure_logging("info", json=True, stream=b)
    logging.getLogger("litestar").warning("once")
    assert a.getvalue() == "" and b.getvalue().count("once") == 1
    assert sum(getattr(h, "_ccc", False) for h in logging.getLogger().handlers) == 1


def test_library_loggers_are_taken_back_and_litestar_must_not_configure_logging():
    from litestar import Litestar

    logging.getLogger("uvicorn.access").addHandler(logging.NullHandler())
    logging.getLogger("uvicorn.access").propagate = False
    out = io.StringIO()
    configure_logging("info", json=True, stream=out)
    Litestar([], logging_config=None)  # how the status API must be built: root handler kept
    logging.getLogger("uvicorn.access").info("GET /health 200")
    logging.getLogger("litestar").warning("from litestar")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "GET /health 200", "from litestar"]
