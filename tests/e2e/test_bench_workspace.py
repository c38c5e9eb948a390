"""``ccc bench workspace`` end to end at a tiny size: it generates its repository, measures
every raw method and ours in the same run, and reports them with their ratios, the
phases beside their floors and what a finished task keeps. The figures themselves are
not asserted beyond their sanity (this machine is shared and noisy); the targets are
judged by the full-size run (README, "Warm repositories")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from infra.shell.bench.workspace import (
    WorkspaceBench,
    advance,
    footer,
    generate_repo,
    phase_rows,
    rows,
    target_rows,
)
from infra.shell.cli.main import cli

pytestmark = pytest.mark.timeout(180)

RAW = {"git clone <file:// URL>", "git clone <path>", "git worktree add (mirror)", "git clone --shared (mirror)",
       "git clone --shared, parallel checkout (mirror)", "cp --reflink=auto -a (warm checkout)"}


def test_the_generated_repository_has_the_files_and_commits_asked_for(tmp_path: Path) -> None:
    bare = tmp_path / "big.git"
    generate_repo(bare, files=250, commits=12)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(bare), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    assert git("rev-list", "--count", "main") == "12"
    assert len(git("ls-tree", "-r", "--name-only", "main").splitlines()) == 250
    before = git("rev-parse", "main")
    after = advance(bare, 0, 250)
    assert git("rev-parse", "main^") == before and git("rev-parse", "main") == after
    assert len(git("diff", "--name-only", before, after).splitlines()) == 3
    with pytest.raises(ValueError):
        generate_repo(tmp_path / "none.git", files=1, commits=1)


def test_bench_workspace_quick_reports_every_method_beside_ours(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", "workspace", "--quick", "--files", "300", "--commits", "20",
                                 "--rounds", "2", "--work-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output.strip().splitlines()[-1])
    result = msgspec.convert(data, WorkspaceBench)
    assert (result.files, result.commits, result.rounds) == (300, 20, 2)
    methods = {m.name: m for m in result.methods}
    assert set(methods) == RAW | {"ours, warm", "ours, first task"}
    for m in methods.values():
        assert len(m.seconds) == 2 and all(s > 0 for s in m.seconds) and m.median > 0
        assert m.candidate == (m.name in RAW)
    assert methods["git clone <file:// URL>"].x_plain == 1.0
    assert result.fastest_raw in RAW and result.fastest_raw_seconds == min(methods[n].median for n in RAW)
    assert result.warm_x_plain > 0 and result.warm_x_fastest > 0 and result.first_x_plain > 0
    assert result.refill > 0 and result.checkout_bytes > 0 and result.pack_bytes > 0
    # a finished task keeps its metadata and logs only
    assert 0 < result.finished_keeps_bytes < result.workspace_bytes / 4
    assert [p.name for p in result.phases] == ["analysis (languages + test command)",
                                               "implement's git (commit, files, diff, stat)"]
    assert all(p.ours > 0 and p.raw > 0 for p in result.phases)
    assert list(tmp_path.iterdir()) == []  # the run's repositories are gone
    # the tables: every method, the three targets, the phases, the footer
    assert len(rows(result)) == 8 and len(target_rows(result)) == 3 and len(phase_rows(result)) == 2
    assert any("finished task keeps" in line for line in footer(result))
    text = CliRunner().invoke(cli, ["bench", "workspace", "--quick", "--files", "100", "--commits", "5",
                                    "--rounds", "1", "--work-dir", str(tmp_path)])
    assert text.exit_code == 0, text.output
    for needle in ("ours, warm", "ours, first task", "git worktree add (mirror)", "warm workspace / plain clone",
                   "first task / plain clone", "analysis (languages + test command)", "reflinks on this filesystem"):
        assert needle in text.output
