"""``ccc bench workspace``: how long a task waits for its workspace on a large repository,
beside the raw git operations that could make one, measured in the same run.

The repository is generated once per run with ``git fast-import`` (30,000 files and
5,000 commits by default: one commit adds every file, each later one changes three) as a
bare repository of a local forge, so its clone URL is the ``file://`` URL agents get.
Before each round the forge's default branch moves by one commit (a busy repository:
every task has something to fetch). Each round then makes a workspace every way, in an
order that rotates from round to round (a machine that gets busier part way through
slows every method alike):

raw, plain git on the same repository:
  ``git clone <file:// URL>`` (what every task did before: the URL forces a transport
  that packs every object again), ``git clone <path>`` (a local clone: object files
  linked), ``git worktree add`` from a mirror, ``git clone --shared`` from a mirror (also
  with a parallel checkout, a process per CPU: how ours builds a checkout when none is
  warm),
  ``cp --reflink=auto -a`` of a warm checkout (a real copy where the filesystem has no
  reflinks; whether it has them is reported). The mirror and the warm checkout are
  brought up to date outside the timing. A hardlink copy (``cp -al``) is not measured:
  a file linked into a workspace can be rewritten in place through the link, so it is
  not an independent checkout.

ours, through :class:`~infra.adapters.git.workbench.GitWorkbench` (what the pipeline's
workspace phase calls: create the workspace, clone, the agent's own clone, the network
setting):
  *warm*: the agent's mirror exists and a warm checkout waits (the steady state: the
  refill after the previous task is done before the next task comes; its time is
  reported, it is off the task's path); *first*: a fresh agent, its first task on the
  repository (the mirror is cloned).

Targets: warm ≤ 0.3× the plain clone and ≤ 1.2× the fastest raw method; first ≤ the
plain clone. Also measured, beside their raw floors: the analysis phase (languages and
test command) against ``git ls-files``, the implement phase's git (commit, files, diff,
stat) against ``git add -A`` + ``git commit`` in a plain clone, and what a finished task
keeps on disk.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import string
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from infra.adapters.forge.local import LocalForge
from infra.adapters.git.sandbox import NoSandbox
from infra.adapters.git.workbench import GitWorkbench

REPO = "bench/big"
STEPS_PER_ROUND = 8  # the raw methods, ours warm, ours first
AGENT = "bench-agent"
WARM_X_PLAIN, WARM_X_FASTEST, FIRST_X_PLAIN = 0.3, 1.2, 1.0
FULL = {"files": 30_000, "commits": 5_000, "rounds": 5}
QUICK = {"files": 2_000, "commits": 200, "rounds": 2}
CHANGED_PER_COMMIT = 3
_AUTHOR = ("ccc bench", "bench@ccc.local")


class Method(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # "raw" | "ours"
    seconds: list[float]
    median: float
    x_plain: float  # median / the plain clone's median
    note: str = ""
    candidate: bool = True  # counts for the fastest raw method (an independent checkout)


class Phase(msgspec.Struct, kw_only=True):
    """A phase's git beside its raw floor, medians over the rounds."""

    name: str
    ours: float
    raw: float
    raw_what: str
    ratio: float


class WorkspaceBench(msgspec.Struct, kw_only=True):
    files: int
    commits: int
    rounds: int
    pack_bytes: int  # the forge's repository on disk
    checkout_bytes: int  # one workspace's checkout on disk, .git included
    generate_seconds: float
    reflink: bool  # the filesystem copies with reflinks (cp --reflink=always works)
    cpus: int
    loadavg: list[float]
    methods: list[Method]
    plain: float  # median of the plain clone
    fastest_raw: str
    fastest_raw_seconds: float
    warm: float
    first: float
    warm_x_plain: float
    warm_x_fastest: float
    first_x_plain: float
    refill: float  # median time of the background refill after a warm task (off the task's path)
    phases: list[Phase]
    finished_keeps_bytes: int  # what a finished task's directory keeps until the retention ends
    workspace_bytes: int  # the same directory before the task finished
    targets: dict[str, float]
    targets_met: bool


# -- the repository ------------------------------------------------------------------------
def _vocabulary(seed: int) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choices(string.ascii_lowercase, k=r.randint(3, 10))) for _ in range(4000)]


def _content(words: list[str], i: int, rev: int) -> bytes:
    r = random.Random(i * 1_000_003 + rev)
    lines = [f"# file {i} rev {rev}"]
    lines += [" ".join(r.choices(words, k=r.randint(3, 9))) for _ in range(r.randint(20, 60))]
    return ("\n".join(lines) + "\n").encode()


def _paths(files: int) -> list[str]:
    return [f"src/pkg{i // 100:04d}/mod{i % 100:03d}.py" for i in range(files)]


def generate_repo(bare: Path, *, files: int, commits: int, seed: int = 7) -> None:
    """A bare repository (``main``) of ``files`` files and ``commits`` commits, written by
    ``git fast-import`` (seconds, where committing file by file would take minutes)."""
    if files < CHANGED_PER_COMMIT or commits < 1:
        raise ValueError(f"need at least {CHANGED_PER_COMMIT} files and 1 commit")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    words, paths, rnd = _vocabulary(seed), _paths(files), random.Random(seed)
    proc = subprocess.Popen(["git", "fast-import", "--quiet"], stdin=subprocess.PIPE, cwd=bare)
    assert proc.stdin is not None
    w = proc.stdin.write
    for n in range(commits):
        changed = range(files) if n == 0 else rnd.sample(range(files), CHANGED_PER_COMMIT)
        msg = b"initial commit" if n == 0 else f"change {n}".encode()
        w(b"commit refs/heads/main\ncommitter Bench <bench@ccc.local> %d +0000\ndata %d\n%s\n"
          % (1_700_000_000 + n, len(msg), msg))
        for i in changed:
            data = _content(words, i, n)
            w(b"M 100644 inline %s\ndata %d\n%s\n" % (paths[i].encode(), len(data), data))
        w(b"\n")
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"git fast-import failed ({proc.returncode})")


def advance(bare: Path, n: int, files: int) -> str:
    """Move ``main`` by one commit changing a few files (plumbing only: no checkout)."""
    env = {**os.environ, "GIT_DIR": str(bare), "GIT_INDEX_FILE": str(bare / "bench-index"),
           "GIT_AUTHOR_NAME": _AUTHOR[0], "GIT_AUTHOR_EMAIL": _AUTHOR[1],
           "GIT_COMMITTER_NAME": _AUTHOR[0], "GIT_COMMITTER_EMAIL": _AUTHOR[1]}

    def git(*args: str, data: bytes | None = None) -> str:
        return subprocess.run(["git", *args], input=data, env=env, check=True,
                              capture_output=True).stdout.decode().strip()

    git("read-tree", "main")
    words, paths = _vocabulary(7), _paths(files)
    for i in random.Random(n).sample(range(files), CHANGED_PER_COMMIT):
        blob = git("hash-object", "-w", "--stdin", data=_content(words, i, 100_000 + n))
        git("update-index", "--cacheinfo", f"100644,{blob},{paths[i]}")
    commit = git("commit-tree", git("write-tree"), "-p", "main", "-m", f"bench round {n}")
    git("update-ref", "refs/heads/main", commit)
    (bare / "bench-index").unlink()
    return commit


# -- measuring -------------------------------------------------------------------------------
def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True).stdout.decode().strip()


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _du(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _reflink(tmp: Path) -> bool:
    src = tmp / "reflink-probe"
    src.write_bytes(b"x" * 4096)
    ok = subprocess.run(["cp", "--reflink=always", str(src), str(tmp / "reflink-probe.copy")],
                        capture_output=True, check=False).returncode == 0
    for p in (src, tmp / "reflink-probe.copy"):
        p.unlink(missing_ok=True)
    return ok


def _check(dest: Path, head: str, name: str) -> None:
    got = _git("rev-parse", "HEAD", cwd=dest)
    if got != head:
        raise RuntimeError(f"{name}: checked out {got[:12]}, not the forge's {head[:12]}")


class _Raw:
    """The raw methods' shared state: a mirror and a warm checkout, kept current outside
    the timing."""

    def __init__(self, tmp: Path, path: Path, url: str) -> None:
        self.tmp, self.path, self.url = tmp, path, url
        self.mirror = tmp / "raw-mirror.git"
        self.warm = tmp / "raw-warm"
        _git("clone", "-q", "--mirror", str(path), str(self.mirror))
        _git("clone", "-q", "--shared", str(self.mirror), str(self.warm))

    def update(self) -> None:
        _git("fetch", "-q", "--prune", "origin", cwd=self.mirror)
        _git("fetch", "-q", "origin", cwd=self.warm)
        _git("reset", "-q", "--hard", "origin/main", cwd=self.warm)

    def methods(self, dest: Path) -> dict[str, tuple[Callable[[], object], Callable[[], object], str, bool]]:
        """name -> (make ``dest``, clean up after it, note, candidate)."""
        def gone() -> None:
            shutil.rmtree(dest, ignore_errors=True)

        def unworktree() -> None:
            gone()
            _git("worktree", "prune", cwd=self.mirror)

        return {
            "git clone <file:// URL>": (lambda: _git("clone", "-q", self.url, str(dest)), gone,
                                        "the plain clone: every task's before", True),
            "git clone <path>": (lambda: _git("clone", "-q", str(self.path), str(dest)), gone,
                                 "local clone, object files linked", True),
            "git worktree add (mirror)": (
                lambda: _git("worktree", "add", "-q", "--detach", str(dest), "main", cwd=self.mirror), unworktree,
                "shares the mirror's refs: not independent", True),
            "git clone --shared (mirror)": (lambda: _git("clone", "-q", "--shared", str(self.mirror), str(dest)),
                                            gone, "borrows the mirror's objects", True),
            "git clone --shared, parallel checkout (mirror)": (
                lambda: _git("-c", f"checkout.workers={os.cpu_count() or 1}", "-c",
                             "checkout.thresholdForParallelism=100", "clone", "-q", "--shared", str(self.mirror),
                             str(dest)), gone, "how ours builds a checkout when none is warm", True),
            "cp --reflink=auto -a (warm checkout)": (
                lambda: subprocess.run(["cp", "--reflink=auto", "-a", str(self.warm), str(dest)], check=True),
                gone, "copies of every file (index stat data then stale)", True),
        }


def _ours_once(wb: GitWorkbench, task_id: str, url: str) -> tuple[float, Path]:
    """What the pipeline's workspace phase does, timed; the task's directory."""
    def make() -> None:
        ws = wb.create_workspace(AGENT, task_id, {"repo": REPO})
        wb.clone(url, ws.repo_dir)

    seconds = _timed(make)
    return seconds, wb.root / AGENT / "tasks" / f"task-{task_id}"


class _Run:
    """One bench run's repository, agents and samples."""

    def __init__(self, tmp: Path, bare: Path, url: str, files: int) -> None:
        self.tmp, self.bare, self.url, self.files = tmp, bare, url, files
        self.times: dict[str, list[float]] = {}
        self.notes: dict[str, tuple[str, bool]] = {
            "ours, warm": ("a warm checkout taken (mirror fetched, files brought to the new commit)", False),
            "ours, first task": ("a fresh agent: mirror cloned (local path), checkout built from it", False)}
        self.refills: list[float] = []
        self.phases: dict[str, tuple[list[float], list[float]]] = {ANALYSIS: ([], []), CHANGE: ([], [])}
        self.kept = self.before = self.checkout_bytes = 0
        self.raw = _Raw(tmp, bare, url)
        self.wb = GitWorkbench(tmp / "agents", sandbox=NoSandbox())
        self.wb.prepare()
        # the warm agent's first task: its mirror and a warm checkout (not measured)
        _ours_once(self.wb, "prime", url)
        self.wb.finish_workspace(AGENT, "prime", "done")
        self.wb.settle()

    def steps(self, r: int, head: str) -> list[Callable[[], None]]:
        dest = self.tmp / "dest"
        steps = []
        for name, (make, clean, note, candidate) in self.raw.methods(dest).items():
            self.notes[name] = (note, candidate)

            def one(name: str = name, make: Callable[[], object] = make, clean: Callable[[], object] = clean) -> None:
                self.times.setdefault(name, []).append(_timed(make))
                _check(dest, head, name)
                clean()
            steps.append(one)
        return [*steps, lambda: self.warm(r, head), lambda: self.first(r, head)]

    def warm(self, r: int, head: str) -> None:
        task = f"warm-{r}"
        seconds, task_dir = _ours_once(self.wb, task, self.url)
        self.times.setdefault("ours, warm", []).append(seconds)
        _check(task_dir / "repo", head, "ours, warm")
        self.refills.append(_timed(self.wb.settle))
        self.measure_phases(task_dir / "repo", r)
        self.before, self.checkout_bytes = _du(task_dir), _du(task_dir / "repo")
        self.wb.finish_workspace(AGENT, task, "done")
        self.kept = _du(task_dir)
        self.wb.settle()

    def first(self, r: int, head: str) -> None:
        fresh = GitWorkbench(self.tmp / f"first-{r}", sandbox=NoSandbox())
        fresh.prepare()
        seconds, task_dir = _ours_once(fresh, f"first-{r}", self.url)
        self.times.setdefault("ours, first task", []).append(seconds)
        _check(task_dir / "repo", head, "ours, first task")
        fresh.settle()
        shutil.rmtree(fresh.root)

    def measure_phases(self, repo: Path, r: int) -> None:
        """The analysis phase and the implement phase's git on our workspace, beside
        plain git in a plain clone."""
        wb = self.wb
        ours, raw = self.phases[ANALYSIS]
        ours.append(_timed(lambda: (wb.languages(repo), wb.detect_test_command(repo))))
        raw.append(_timed(lambda: _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo)))
        wb.create_branch(repo, wb.branch_name(f"warm-{r}", "bench"))
        rel = _paths(self.files)[(r * 7919) % self.files]
        (repo / rel).write_text((repo / rel).read_text() + f"# round {r}\n")
        ours, raw = self.phases[CHANGE]
        ours.append(_timed(lambda: (wb.commit_all(repo, "bench change", *_AUTHOR), wb.changed_files(repo),
                                    wb.diff(repo), wb.diff_stat(repo))))
        plain = self.tmp / "plain-change"
        _git("clone", "-q", str(self.bare), str(plain))
        (plain / rel).write_text((plain / rel).read_text() + f"# round {r}\n")
        identity = ("-c", f"user.name={_AUTHOR[0]}", "-c", f"user.email={_AUTHOR[1]}")
        raw.append(_timed(lambda: (_git("add", "-A", cwd=plain),
                                   _git(*identity, "commit", "-q", "-m", "bench change", cwd=plain))))
        shutil.rmtree(plain)


ANALYSIS = "analysis (languages + test command)"
CHANGE = "implement's git (commit, files, diff, stat)"
_RAW_OF = {ANALYSIS: "git ls-files --cached --others", CHANGE: "git add -A + git commit"}


def run_workspace_bench(*, files: int, commits: int, rounds: int,
                        progress: Callable[[int, int], None] | None = None,
                        work_dir: Path | str | None = None) -> WorkspaceBench:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ccc-bench-workspace-", dir=work_dir) as tmp_s:
        tmp = Path(tmp_s)
        forge = LocalForge(tmp / "forge")
        bare = forge.repo_path(REPO)
        bare.parent.mkdir(parents=True)
        generate_seconds = _timed(lambda: generate_repo(bare, files=files, commits=commits))
        run = _Run(tmp, bare, forge.clone_url(REPO), files)
        done = 0
        for r in range(rounds):
            head = advance(bare, r, files)
            run.raw.update()
            steps = run.steps(r, head)
            assert len(steps) == STEPS_PER_ROUND
            shift = r % len(steps)  # a rotating order: a machine getting busier slows every method alike
            for step in steps[shift:] + steps[:shift]:
                step()
                done += 1
                if progress is not None:
                    progress(done, rounds * STEPS_PER_ROUND)
        pack_bytes = _du(bare)
        reflink = _reflink(tmp)
    return _result(files=files, commits=commits, rounds=rounds, times=run.times, notes=run.notes,
                   refills=run.refills,
                   phases=[(name, ours, raw, _RAW_OF[name]) for name, (ours, raw) in run.phases.items()],
                   pack_bytes=pack_bytes, checkout_bytes=run.checkout_bytes, generate_seconds=generate_seconds,
                   reflink=reflink, kept=run.kept, before=run.before, load=[load_before, os.getloadavg()[0]])


def _result(*, files: int, commits: int, rounds: int, times: dict[str, list[float]],
            notes: dict[str, tuple[str, bool]], refills: list[float],
            phases: list[tuple[str, list[float], list[float], str]], pack_bytes: int, checkout_bytes: int,
            generate_seconds: float, reflink: bool, kept: int, before: int, load: list[float]) -> WorkspaceBench:
    med = {name: statistics.median(t) for name, t in times.items()}
    plain = med["git clone <file:// URL>"]
    methods = []
    for name, t in times.items():
        note, candidate = notes.get(name, ("", False))
        kind = "ours" if name.startswith("ours") else "raw"
        methods.append(Method(name=name, kind=kind, seconds=[round(s, 4) for s in t], median=round(med[name], 4),
                              x_plain=round(med[name] / plain, 3), note=note, candidate=kind == "raw" and candidate))
    raw = [m for m in methods if m.candidate]
    fastest = min(raw, key=lambda m: m.median)
    warm, first = med["ours, warm"], med["ours, first task"]
    ratios = {"warm_x_plain": warm / plain, "warm_x_fastest": warm / fastest.median, "first_x_plain": first / plain}
    targets = {"warm_x_plain": WARM_X_PLAIN, "warm_x_fastest": WARM_X_FASTEST, "first_x_plain": FIRST_X_PLAIN}
    return WorkspaceBench(
        files=files, commits=commits, rounds=rounds, pack_bytes=pack_bytes, checkout_bytes=checkout_bytes,
        generate_seconds=round(generate_seconds, 2), reflink=reflink, cpus=os.cpu_count() or 1,
        loadavg=[round(x, 2) for x in load], methods=methods, plain=round(plain, 4), fastest_raw=fastest.name,
        fastest_raw_seconds=fastest.median, warm=round(warm, 4), first=round(first, 4),
        warm_x_plain=round(ratios["warm_x_plain"], 3), warm_x_fastest=round(ratios["warm_x_fastest"], 3),
        first_x_plain=round(ratios["first_x_plain"], 3),
        refill=round(statistics.median(refills), 4) if refills else 0.0,
        phases=[Phase(name=n, ours=round(statistics.median(o), 4), raw=round(statistics.median(w), 4), raw_what=what,
                      ratio=round(statistics.median(o) / statistics.median(w), 2))
                for n, o, w, what in phases if o and w],
        finished_keeps_bytes=kept, workspace_bytes=before, targets=targets,
        targets_met=all(ratios[k] <= targets[k] for k in targets))


# -- showing it ---------------------------------------------------------------------------------
def rows(result: WorkspaceBench) -> list[tuple[str, ...]]:
    """method, median, min–max, × plain clone, note."""
    order = sorted(result.methods, key=lambda m: (m.kind != "raw", m.median))
    return [(m.name, f"{m.median:.3f} s", f"{min(m.seconds):.3f}–{max(m.seconds):.3f}", f"{m.x_plain:.2f}x",
             m.note + ("" if m.candidate or m.kind == "ours" else " (not a floor)")) for m in order]


def target_rows(result: WorkspaceBench) -> list[tuple[str, ...]]:
    def row(what: str, ratio: float, target: float) -> tuple[str, ...]:
        return (what, f"{ratio:.2f}x", f"<= {target:g}x", "ok" if ratio <= target else "MISSED")

    return [row("warm workspace / plain clone", result.warm_x_plain, WARM_X_PLAIN),
            row(f"warm workspace / fastest raw ({result.fastest_raw})", result.warm_x_fastest, WARM_X_FASTEST),
            row("first task / plain clone", result.first_x_plain, FIRST_X_PLAIN)]


def phase_rows(result: WorkspaceBench) -> list[tuple[str, ...]]:
    return [(p.name, f"{p.ours:.3f} s", f"{p.raw:.3f} s ({p.raw_what})", f"{p.ratio:.2f}x") for p in result.phases]


def footer(result: WorkspaceBench) -> list[str]:
    mb = 1024 * 1024
    return [
        (f"{result.files:,} files, {result.commits:,} commits (generated in {result.generate_seconds:.1f} s); "
         f"repository {result.pack_bytes / mb:.0f} MB, a checkout {result.checkout_bytes / mb:.0f} MB; "
         f"{result.rounds} rounds, medians, methods in rotating order; the forge moved one commit before each "
         "round"),
        (f"reflinks on this filesystem: {'yes' if result.reflink else 'no (cp --reflink=auto copies)'}; "
         f"{result.cpus} cpus, load {result.loadavg[0]:.1f} -> {result.loadavg[1]:.1f}"),
        f"refill of the warm checkout after a task (background, off the task's path): {result.refill:.3f} s",
        (f"a finished task keeps {result.finished_keeps_bytes / 1024:.0f} kB (metadata and logs) of the "
         f"{result.workspace_bytes / mb:.0f} MB its directory held"),
    ]
