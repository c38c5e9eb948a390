"""``ccc bench task`` end to end at the CI size: a real nats-server, the coordinator and
one real agent as ``ccc up`` composes them, tasks on a small and a large generated
repository, every phase read back from the log beside its raw floor. The figures are
not asserted beyond their sanity (this machine is shared and noisy); the 1 s target is
judged by the full-size run (README, "Per-task overhead")."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from infra.shell.bench.task import (
    APPENDS,
    EXCLUDED,
    QUICK,
    ROW_PHASES,
    SMALL,
    TaskBench,
    add_files,
    bench_files,
    run_task_bench,
)
from infra.shell.bench.workspace import generate_repo
from infra.shell.cli.main import cli

pytestmark = pytest.mark.timeout(300)

FLOORS = ("dispatch", "workspace", "analysis", "commit", "push", "pull request", "append", "rtt", "hop")


def test_the_bench_commit_adds_its_files_on_top_of_the_generated_history(tmp_path: Path) -> None:
    bare = tmp_path / "r.git"
    generate_repo(bare, files=40, commits=3)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(bare), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    before = git("rev-parse", "main")
    head = add_files(bare, bench_files(2), "bench files")
    assert git("rev-parse", "main") == head and git("rev-parse", "main^") == before
    listed = git("ls-tree", "-r", "--name-only", "main").splitlines()
    assert len(listed) == 40 + len(bench_files(2))
    assert git("show", "main:.ccc/test-command") == "true"
    assert json.loads(git("show", "main:.ccc/scripts/2.json"))["attempts"][0]["summary"]
    assert not (bare / "bench-index").exists()


def test_bench_task_quick_measures_every_phase_beside_its_floor(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", "task", "--quick", "--work-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    result = msgspec.convert(json.loads(r.output.strip().splitlines()[-1]), TaskBench)
    tasks = QUICK["tasks"]
    assert result.tasks_per_repo == tasks and result.target_s == 1.0 and result.security == "off"
    assert [(run.name, run.files, run.commits) for run in result.repos] == [
        ("small", SMALL["files"], SMALL["commits"]), ("large", QUICK["files"], QUICK["commits"])]
    for run in result.repos:
        # every task ran to a pull request on the forge, the first cold, the rest warm
        assert len(run.tasks) == tasks and run.prs_on_forge == tasks
        assert [t.warm for t in run.tasks] == [False] + [True] * (tasks - 1)
        for t in run.tasks:
            assert t.pr_url.startswith("file://") and t.branch.startswith("ccc/")
            assert list(t.phases) == list(ROW_PHASES) and list(t.appends) == list(APPENDS)
            assert all(v > 0 for v in t.phases.values()), t.phases
            assert all(v > 0 for v in t.appends.values()), t.appends
            # the phases and the appends are the task's whole time, measured from the log
            assert sum(t.phases.values()) + sum(t.appends.values()) == pytest.approx(t.total, abs=2e-3)
            assert t.overhead == pytest.approx(t.total - sum(t.phases[k] for k in EXCLUDED), abs=1e-3)
            assert 0 < t.test_command < t.phases["testing"]
            assert t.refill >= 0  # the background chores after the task, waited for off its path
        # the raw floors, measured in the same run on the same repository
        assert all(run.floors[k] > 0 for k in FLOORS), run.floors
        assert run.floors["dispatch"] == pytest.approx(2 * run.floors["hop"] + 3 * run.floors["rtt"], abs=5e-5)
        warm = [t for t in run.tasks if t.warm]
        assert run.overhead_warm == pytest.approx(statistics.median(t.overhead for t in warm), abs=1e-4)
        assert run.overhead_first == pytest.approx(run.tasks[0].overhead, abs=1e-4)
        rows = {row.name: row for row in run.rows}
        for name in ROW_PHASES:
            row = rows[name]
            assert row.warm == pytest.approx(statistics.median(t.phases[name] for t in warm), abs=1e-5)
            assert (row.kind == "excluded") == (name in EXCLUDED)
            if row.floor:
                assert row.ratio == pytest.approx(row.warm / row.floor, rel=0.02, abs=0.01)
        for name in APPENDS:
            row = rows[f"append agent.{name}"]
            assert row.floor == pytest.approx(run.floors["append"], abs=1e-5)
            assert row.ratio == pytest.approx(row.warm / row.floor, rel=0.02, abs=0.01)
        total = rows["overhead per task"]
        assert total.warm == pytest.approx(run.overhead_warm, abs=1e-4)
        assert total.floor == pytest.approx(run.floor_total, abs=1e-4) and total.floor > 0
        assert total.ratio == pytest.approx(total.warm / total.floor, rel=0.02, abs=0.01)
    assert result.overhead_warm_large == result.repos[-1].overhead_warm
    assert result.ok == (result.overhead_warm_large <= 1.0)
    for k in ("rtt", "stored", "hop"):
        assert 0 < result.nats[f"{k}_p50_ms"] <= result.nats[f"{k}_p99_ms"]
    assert len(result.loadavg) == 2 and result.cpus >= 1
    assert list(tmp_path.iterdir()) == []  # the run's server, repositories and workspaces are gone


def test_bench_task_prints_the_tables_and_the_verdict(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", "task", "--quick", "--files", "100", "--commits", "5", "--tasks", "2",
                                 "--work-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for needle in ("a task on the small repository", "a task on the large repository", "RAW FLOOR",
                   "git clone --shared (mirror), parallel checkout", "git ls-files", "git add -A + git commit",
                   "append agent.workspace_prepared", "coder (excluded)", "testing (excluded)",
                   "overhead per task, large repository, warm (median)", "<= 1 s", "raw NATS"):
        assert needle in r.output, needle
    assert "ok" in r.output or "MISSED" in r.output


def test_bench_task_refuses_a_single_task(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", "task", "--tasks", "1", "--work-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--tasks" in r.output


def test_bench_task_with_security_on_runs_every_part_as_its_own_user(tmp_path: Path) -> None:
    """Secured as `ccc up` secures it: the coordinator and the agent each connect as their
    own nkey user over mutual TLS, so a part that needed more than its role allows would
    fail its task here (a denied publish times out)."""
    r = CliRunner().invoke(cli, ["bench", "task", "--quick", "--files", "100", "--commits", "5", "--tasks", "2",
                                 "--security", "on", "--work-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    result = msgspec.convert(json.loads(r.output.strip().splitlines()[-1]), TaskBench)
    assert result.security == "on"
    for run in result.repos:
        assert len(run.tasks) == 2 and run.prs_on_forge == 2
        assert all(t.overhead > 0 and t.pr_url.startswith("file://") for t in run.tasks)
    assert list(tmp_path.iterdir()) == []


def test_bench_task_refuses_an_unknown_security_setting(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", "task", "--security", "maybe", "--work-dir", str(tmp_path)])
    assert r.exit_code == 2 and "'maybe' is not one of 'off', 'on'" in r.output
    with pytest.raises(ValueError, match="security must be off or on"):
        asyncio.run(run_task_bench(files=10, commits=1, tasks=2, security="maybe", work_dir=tmp_path))
