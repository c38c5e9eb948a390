"""``ccc soak`` for about a minute (the CI-sized soak; the hour's figures are in the
README): a real ``ccc up`` process takes a steady stream of issues, every task
completes, the log shows nothing lost, duplicated or illegal, and every sampled metric
is flat enough after the warm-up (each slope within its printed limit)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from infra.shell.bench.soak import LIMITS, Sample, fit, least_squares, rolling_min
from infra.shell.cli.main import cli

pytestmark = pytest.mark.timeout(420)

MEMORY = ("up_rss", "nats_rss")  # resident sets of ccc up and of its nats-server


def test_least_squares_and_the_floor_of_counts():
    slope, intercept = least_squares([0, 1, 2, 3], [1, 3, 5, 7])
    assert (slope, intercept) == (2.0, 1.0)
    assert least_squares([5], [3]) == (0.0, 3)
    # a transient extra (a git command's pipes at one sample) is not a leak: the rolling
    # minimum drops it; a real leak raises the minimum too
    assert rolling_min([17, 17, 24, 17, 17], 3) == [17, 17, 17, 17, 17]
    assert rolling_min([17, 18, 19, 20, 21], 3) == [17, 17, 17, 18, 19]


def _sample(t: float, completed: int, **values) -> Sample:
    base = {"published": completed + 1, "in_flight": 1, "up_rss": 80.0, "nats_rss": 30.0, "up_fds": 17,
            "nats_fds": 33, "consumers": 14, "ephemeral": 3, "stream_mib": 0.1, "kv_mib": 0.01, "object_mib": 0.01,
            "workspace_mib": 1.0, "forge_mib": 0.2}
    return Sample(t=t, completed=completed, **{**base, **values})


def test_the_verdicts():
    """Per task for what grows with history by design, per hour for what must not grow."""
    flat = [_sample(t, t // 5, stream_mib=0.01 * (t // 5)) for t in range(0, 300, 5)]
    slopes, per_min, fitted = fit(flat, warmup_s=60)
    assert per_min == pytest.approx(12.0) and fitted == 48
    by = {s.metric: s for s in slopes}
    assert set(by) == set(LIMITS) and all(s.flat for s in slopes)
    assert by["stream_mib"].per_task == pytest.approx(0.01) and by["up_fds"].per_hour == 0
    leaking = [_sample(t, t // 5, up_fds=17 + t // 5) for t in range(0, 300, 5)]  # an fd per task
    by = {s.metric: s for s in fit(leaking, warmup_s=60)[0]}
    assert not by["up_fds"].flat and by["up_fds"].per_hour == pytest.approx(720, rel=0.1)


def test_a_minute_of_steady_load_is_flat_and_loses_nothing(tmp_path):
    result = CliRunner().invoke(cli, ["soak", "--minutes", "1", "--rate", "12", "--work-dir", str(tmp_path),
                                      "--json"], catch_exceptions=False)
    body = json.loads(result.output.splitlines()[-1])
    verdicts = {s["metric"]: (s["per_hour"], s["per_task"], s["limit"], s["limit_per"], s["flat"])
                for s in body["slopes"]}
    assert body["published"] >= 11 and body["completed"] == body["published"], body["final_states"]
    assert (body["lost"], body["duplicated"], body["illegal"]) == (0, 0, 0), body["violations"]
    assert body["violations"] == []
    assert set(verdicts) == set(LIMITS)
    # fds, consumers, the log, the buckets, the workspaces: flat within their limits
    assert all(v[-1] for m, v in verdicts.items() if m not in MEMORY), verdicts
    # Memory is judged by the hour (README): a minute fits ~10 tasks over the processes'
    # warm-up, and on a loaded machine fewer tasks share the same heap growth (nats-server
    # once showed 0.32 MiB/task here while a chaos run shared the cores). What a leak of a
    # task's clone or history would cost is still far above this bound.
    assert all(verdicts[m][1] < 1.0 for m in MEMORY), verdicts
    assert body["ok"] == all(v[-1] for v in verdicts.values())
    assert body["fit_samples"] >= 10 and body["tasks_per_min"] > 5
    assert result.exit_code == (0 if body["ok"] else 1)
    assert body["security"].startswith("on")
    samples = body["samples"]
    assert samples[-1]["up_rss"] > 0 and samples[-1]["nats_fds"] > 0 and samples[-1]["consumers"] > 0
    if body["ok"]:
        assert not list(tmp_path.iterdir())  # a run that passed leaves nothing behind (no --keep)
    else:
        assert list(tmp_path.iterdir())  # a failed run's directory is kept, to look into
