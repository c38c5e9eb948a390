"""Metrics scraped over HTTP after a real run equal what the event log says."""

from __future__ import annotations

import collections

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from events.subjects import Namespace
from infra.shell.app.demo import run_demo
from infra.adapters.nats.settings import load_settings

pytestmark = pytest.mark.timeout(120)


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_after_the_demo_match_the_event_log(tmp_path):
    settings = msgspec.structs.replace(load_settings(data_dir=str(tmp_path)), nats_url=None)
    seen: dict = {}

    async def inspect(cluster) -> None:
        async with httpx.AsyncClient() as client:
            # read-your-writes: the API's projection has applied the whole log
            await cluster.api.live.catch_up()
            r = await client.get(f"{cluster.api.url}/metrics")
            await client.get(f"{cluster.api.url}/api/v1/tasks")
            r2 = await client.get(f"{cluster.api.url}/metrics")
        counts: collections.Counter = collections.Counter()
        statuses: collections.Counter = collections.Counter()
        async for _, event in cluster.coordinator.store.read():
            counts[event.__struct_config__.tag] += 1
        for task in cluster.coordinator.model.tasks.values():
            statuses[(task.status, task.specialty)] += 1
        seen.update(metrics=scrape(r.text), after=scrape(r2.text), counts=counts, statuses=statuses,
                    content_type=r.headers["content-type"])

    ok, _, _ = await run_demo(settings, Namespace("obs"), api_port=0, before_stop=inspect)
    assert ok
    m = seen["metrics"]
    assert seen["content_type"].startswith("text/plain")
    for tag, n in seen["counts"].items():
        assert m[("claude_events_total", (("type", tag),))] == n, tag
    for (status, specialty), n in seen["statuses"].items():
        assert m[("claude_tasks_total", (("agent_type", specialty), ("status", status)))] == n
    assert m[("claude_event_log_lag", (("projection", "read_model"),))] == 0
    assert m[("claude_test_runs_total", (("outcome", "passed"),))] >= 4
    assert m[("claude_test_runs_total", (("outcome", "failed"),))] >= 1  # demo issue #4, attempt 1
    # the API counts its own requests, by route template
    key = ("claude_api_requests_total", (("endpoint", "/api/v1/tasks"), ("method", "GET"), ("status", "200")))
    assert seen["after"][key] == m.get(key, 0) + 1
