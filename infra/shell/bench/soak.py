"""``ccc soak``: a steady stream of tasks through ``ccc up`` for N minutes, and whether
what the cluster holds stays flat.

The run: a real ``ccc up`` process (its embedded nats-server, secured as by default,
the coordinator, the agents and the status API), the scripted coder, a small
repository on the local forge. The harness publishes issues at a fixed rate (open
loop: on schedule, whatever the cluster's pace), plays the reviewer (merges every
pull request whose checks are green, as ``ccc pr merge`` does, so tasks complete),
reads the status API as a dashboard would (its health, the newest page of the board,
the agents; any answer but 200 fails the run) and, every few seconds, samples:

* the resident memory (RSS) and open file descriptors of ``ccc up`` and of its
  nats-server (``/proc``);
* the consumers on the namespace's streams, and the bytes of its event streams, its KV
  buckets and its object stores (JetStream's own stream info);
* the disk the agents' task workspaces use, and the forge's (for reference).

After a warm-up, each metric gets a least-squares slope over time, also read per task
(slope / completion rate), and a verdict against its limit (:data:`LIMITS`). Two kinds
of limit, because two kinds of growth exist:

* *per hour* for what must not grow at all while the load is steady: file descriptors,
  durable consumers;
* *per task* for what grows with history by design: the log is the database (every
  task adds its events), every projection holds every task (a few KB each), a finished
  workspace is kept for its retention (24 h, longer than any soak). Flat here means a
  constant, small cost per task — a leak (a clone, a subprocess, a consumer, a response
  cache per task) costs far more than the limit.

Nothing lost: after the stream stops and the tasks in flight drain, the log is read
back and judged by the chaos suite's invariants (:func:`infra.shell.chaos.checks.check_log`):
every issue has exactly one task, every history folds, every task completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
from nats.aio.client import Client

from events.codec import encode
from events.subjects import Namespace, repo_token, task_id_for

from infra.adapters.forge.local import LocalForge, merged_fact
from infra.adapters.nats.connection import connect_when_admitted, embedded_url_file, kit_for
from infra.adapters.nats.issue_publisher import new_issue
from infra.adapters.nats.settings import load_settings
from infra.shell.chaos.checks import check_log, read_log
from infra.shell.chaos.processes import CCC, READY, Proc, clean_env, process_tree
from infra.shell.chaos.sandbox import TEST, Tracker

REPO = "soak/calc"
NAMESPACE = "soak"
# each issue writes one of SLOTS modules (features/slot<k>.py): after the first SLOTS
# tasks the checkout stays the same size however long the run, and two tasks in flight
# never touch the same file (the previous user of a slot was published SLOTS tasks
# earlier and is merged by then)
SLOTS = 40
REPO_FILES = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    "features/__init__.py": "",
    "tests/__init__.py": "",
    "tests/test_calc.py": TEST,
    ".ccc/test-command": "python3 -m unittest discover -s tests\n",
}
MiB = 1024 * 1024

# metric -> (unit, limit, "task" | "hour", why). A metric is flat when its slope after the
# warm-up stays within the limit: per task completed, or per hour of steady load.
LIMITS: dict[str, tuple[str, float, str, str]] = {
    "up_rss": ("MiB", 0.25, "task", "every projection in ccc up holds every task (a few copies of a few KB)"),
    "nats_rss": ("MiB", 0.25, "task", "nats-server indexes every message it stores"),
    "up_fds": ("fds", 5.0, "hour", "sockets, pipes and files are closed after each task"),
    "nats_fds": ("fds", 5.0, "hour", "clients and store files are a fixed set"),
    "consumers": ("consumers", 2.0, "hour", "durable consumers: a fixed set per actor"),
    "stream_mib": ("MiB", 0.25, "task", "the log is the database: a task's events, a few KB"),
    "kv_mib": ("MiB", 0.05, "task", "one entry per task and agent, history bounded"),
    "object_mib": ("MiB", 0.5, "task", "each task's artifacts (diff, test log), bounded in size"),
    "workspace_mib": ("MiB", 0.5, "task", ("a finished workspace is kept for its retention (24 h): what "
                                          "debugging needs, not more than a checkout of this small repository "
                                          "(~0.25 MiB of 4 KiB blocks) and its logs")),
}
METRIC_WORDS = {
    "up_rss": "RSS of ccc up", "nats_rss": "RSS of nats-server", "up_fds": "open fds of ccc up",
    "nats_fds": "open fds of nats-server", "consumers": "durable consumers on the namespace's streams",
    "stream_mib": "event and issue streams", "kv_mib": "KV buckets", "object_mib": "object stores",
    "workspace_mib": "task workspaces on disk",
}


class SoakOptions(msgspec.Struct, frozen=True, kw_only=True):
    minutes: float = 60.0
    rate: float = 12.0  # issues published per minute
    agents: int = 3
    capacity: int = 1
    sample_every: float | None = None  # seconds; default 5 (2 for runs under 5 minutes)
    warmup: float | None = None  # seconds; default a quarter of the run, 20 s to 10 min
    drain: float = 180.0  # seconds the tasks in flight get to complete after the last issue
    work_dir: str | None = None
    keep: bool = False
    insecure: bool = False

    def validate(self) -> None:
        if self.minutes <= 0 or self.rate <= 0:
            raise ValueError("--minutes and --rate must be > 0")
        if self.agents < 1 or self.capacity < 1:
            raise ValueError("--agents and --capacity must be >= 1")
        if self.warmup is not None and self.warmup >= self.minutes * 60:
            raise ValueError(f"the warm-up ({self.warmup:g} s) must be shorter than the run "
                             f"({self.minutes * 60:g} s)")

    @property
    def interval(self) -> float:
        if self.sample_every is not None:
            return self.sample_every
        return 2.0 if self.minutes < 5 else 5.0

    @property
    def warmup_s(self) -> float:
        if self.warmup is not None:
            return self.warmup
        return min(600.0, max(20.0, self.minutes * 60 / 4))


class Sample(msgspec.Struct, kw_only=True):
    t: float  # seconds since the first issue
    published: int
    completed: int
    in_flight: int  # published, not completed
    up_rss: float  # MiB
    nats_rss: float
    up_fds: int
    nats_fds: int
    consumers: int  # durable
    ephemeral: int  # ephemeral consumers (reported, not judged: they come and go with reads)
    stream_mib: float
    kv_mib: float
    object_mib: float
    workspace_mib: float
    forge_mib: float


class Slope(msgspec.Struct, kw_only=True):
    metric: str
    unit: str
    first: float  # fitted value at the window's start
    last: float  # ... and at its end
    per_hour: float
    per_task: float
    limit: float
    limit_per: str  # "task" | "hour"
    flat: bool
    why: str = ""


class SoakResult(msgspec.Struct, kw_only=True):
    minutes: float
    rate: float
    agents: int
    capacity: int
    published: int
    completed: int
    tasks_per_min: float  # completions per minute in the fit window
    warmup_s: float
    fit_samples: int
    slopes: list[Slope]
    lost: int
    duplicated: int
    illegal: int
    final_states: dict[str, int]
    violations: list[str]
    samples: list[Sample]
    security: str
    work_dir: str = ""  # kept (--keep, or the run failed)
    ok: bool = False

    @property
    def flat(self) -> bool:
        return all(s.flat for s in self.slopes)


# -- measuring -------------------------------------------------------------------------------
def rss_mib(pid: int | None) -> float:
    """Resident set size (``VmRSS``), MiB; 0 if the process is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def open_fds(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def disk_mib(root: Path) -> float:
    """Disk blocks used under ``root`` (as ``du`` counts them, hard links once), MiB."""
    total, seen = 0, set()
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
        except OSError:
            continue
    return total / MiB


async def jetstream_sizes(nc: Client) -> dict[str, float]:
    """Consumers and MiB of the server's streams (the soak's server holds one namespace),
    by kind: KV buckets (``KV_*``), object stores (``OBJ_*``), the rest (events, issues,
    heartbeats, dead letters, demand). Consumers are counted durable (what an actor
    keeps) apart from ephemeral (ordered consumers of one read, the harness's own
    tracker among them; the server removes them when their reader is gone)."""
    js = nc.jetstream(timeout=10)
    out = {"consumers": 0.0, "ephemeral": 0.0, "stream_mib": 0.0, "kv_mib": 0.0, "object_mib": 0.0}
    for s in await js.streams_info():
        name = s.config.name or ""
        kind = "kv_mib" if name.startswith("KV_") else "object_mib" if name.startswith("OBJ_") else "stream_mib"
        out[kind] += (s.state.bytes or 0) / MiB
        if s.state.consumer_count:
            durable = sum(1 for c in await js.consumers_info(name) if c.config.durable_name)
            out["consumers"] += durable
            out["ephemeral"] += s.state.consumer_count - durable
    return out


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    n = len(xs)
    if n < 2:
        return 0.0, ys[0] if ys else 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# counts whose samples catch transient extras (a git command's pipes, a reader's socket):
# fitted on their rolling minimum, which a leak raises too but a passing spike does not
FLOORED = frozenset({"up_fds", "nats_fds", "consumers"})


def rolling_min(values: list[float], k: int) -> list[float]:
    return [min(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def fit(samples: list[Sample], warmup_s: float) -> tuple[list[Slope], float, int]:
    """Each metric's least-squares slope after the warm-up, judged against
    :data:`LIMITS` (counts in :data:`FLOORED` on their rolling minimum over a tenth of
    the window); returns the slopes, the completion rate in the window (tasks per
    minute) and the samples fitted."""
    window = [s for s in samples if s.t >= warmup_s]
    if len(window) < 3:
        window = samples[len(samples) // 2:]  # a run too short for its warm-up: its second half
    if len(window) < 2:
        return [], 0.0, len(window)
    ts = [s.t for s in window]
    per_s, _ = least_squares(ts, [float(s.completed) for s in window])  # tasks per second
    out = []
    for metric, (unit, limit, per, why) in LIMITS.items():
        ys = [float(getattr(s, metric)) for s in window]
        if metric in FLOORED:
            ys = rolling_min(ys, max(3, len(ys) // 10))
        slope, b = least_squares(ts, ys)  # units per second
        per_task = slope / per_s if per_s > 0 else float("inf") if slope > 0 else 0.0
        value = per_task if per == "task" else slope * 3600
        out.append(Slope(metric=metric, unit=unit, first=round(b + slope * ts[0], 3),
                         last=round(b + slope * ts[-1], 3), per_hour=round(slope * 3600, 3),
                         per_task=round(per_task, 4), limit=limit, limit_per=per, flat=value <= limit, why=why))
    return out, round(per_s * 60, 2), len(window)


# -- the run -----------------------------------------------------------------------------------
def write_script(scripts: Path, number: int) -> None:
    """The recorded session of issue ``number``: rewrite its slot's module."""
    slot = number % SLOTS
    body = {"attempts": [{"steps": [{"write": {"path": f"features/slot{slot}.py",
                                               "content": f"VALUE = {number}  # issue {number}\n"}}],
                          "summary": f"set slot {slot} to {number}"}]}
    (scripts / f"{repo_token(REPO)}-{number}.json").write_text(json.dumps(body))


class Soak:
    """One run: its directory, the ``ccc up`` process, the harness's connection."""

    def __init__(self, root: Path, options: SoakOptions) -> None:
        self.root, self.options = root, options
        self.ns = Namespace(NAMESPACE)
        self.data_dir = root / "data"
        self.scripts = root / "scripts"
        self.forge_root = root / "forge"
        for d in (self.data_dir, self.scripts):
            d.mkdir(parents=True, exist_ok=True)
        self.forge = LocalForge(self.forge_root)
        self.forge.create_repo(REPO, REPO_FILES)
        self.issues: dict[str, tuple[str, int]] = {}
        self.merged: set[tuple[str, int]] = set()
        self.merge_errors: list[str] = []
        o = options
        argv = [*CCC, "--data-dir", str(self.data_dir), "--namespace", self.ns.prefix, "--log-level", "warning",
                *(["--insecure"] if o.insecure else []),
                "up", "--agents", str(o.agents), "--capacity", str(o.capacity), "--specialties", "backend",
                "--api-port", "0", "--script-dir", str(self.scripts), "--forge-root", str(self.forge_root),
                "--heartbeat-timeout", "10", "--retry-base", "1", "--max-attempts", "5", "--shutdown-grace", "5"]
        self.up = Proc("ccc-up", argv, root, clean_env())
        self.nc: Client | None = None
        self.nats_pid: int | None = None
        self.api = ""  # the status API of ccc up, read at every sample as a dashboard would
        self.api_errors: list[str] = []

    async def start(self) -> None:
        self.up.start()
        await self.up.wait_for_output(READY["up"], timeout=120)
        found = re.search(r"status API\s+(http://\S+?)/api/v1/tasks", self.up.output())
        if found is None:
            raise RuntimeError(f"ccc up did not say where its status API is: {self.up.output()[-300:]!r}")
        self.api = found.group(1)
        url = embedded_url_file(self.data_dir).read_text().strip()
        settings = load_settings({}, data_dir=self.data_dir, namespace=self.ns.prefix,
                                 insecure=self.options.insecure)
        self.nc = await connect_when_admitted(url, name="ccc-soak", settings=settings,
                                              kit=kit_for(settings, "admin", url))
        for pid in process_tree(self.up.pid or 0):
            with contextlib.suppress(OSError):
                if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    self.nats_pid = pid
        if self.nats_pid is None:
            raise RuntimeError("ccc up runs no nats-server of its own")

    async def publish(self, number: int) -> None:
        assert self.nc is not None
        write_script(self.scripts, number)
        slot = number % SLOTS
        event = new_issue(repo=REPO, title=f"Set slot {slot} to {number}", number=number,
                          body=f"features/slot{slot}.py should hold VALUE = {number}.",
                          labels=("backend",), actor="soak")
        self.issues[task_id_for(REPO, number)] = (REPO, number)
        await self.nc.jetstream(timeout=10).publish(self.ns.subject(event.rel_subject), encode(event),
                                                    headers={"Nats-Msg-Id": event.event_id},
                                                    stream=self.ns.issues_stream)

    async def review(self, tracker: Tracker) -> None:
        """Merge every pull request whose checks are green (``ccc pr merge``)."""
        assert self.nc is not None
        for tid in list(self.issues):
            t = tracker.model.tasks.get(tid)
            if t is None or t.status != "review" or not t.branch or (tid, t.attempt) in self.merged:
                continue
            self.merged.add((tid, t.attempt))
            try:
                await asyncio.to_thread(self.forge.merge, t.issue.repo, t.branch,
                                        message=f"Merge {t.branch}: {t.issue.title}")
            except Exception as e:  # noqa: BLE001 - reported; the task then stays in review (lost)
                self.merge_errors.append(f"{tid}: merge failed: {e}")
                continue
            event = merged_fact(t, datetime.now(UTC))
            await self.nc.jetstream(timeout=10).publish(self.ns.subject(event.rel_subject), encode(event),
                                                        headers={"Nats-Msg-Id": event.event_id})

    async def read_api(self, http: httpx.AsyncClient, published: int) -> None:
        """What a dashboard asks at every refresh: the health, the newest page of the board."""
        for path in ("/health", f"/api/v1/tasks?limit=50&offset={max(0, published - 50)}", "/api/v1/agents"):
            try:
                r = await http.get(self.api + path)
                if r.status_code != 200:
                    self.api_errors.append(f"api: GET {path} answered {r.status_code}: {r.text[:160]}")
            except httpx.HTTPError as e:
                self.api_errors.append(f"api: GET {path} failed: {type(e).__name__}: {e}")

    async def sample(self, t: float, tracker: Tracker, published: int) -> Sample:
        assert self.nc is not None
        sizes = await jetstream_sizes(self.nc)
        tasks = tracker.model.tasks
        completed = sum(1 for tid in self.issues if (s := tasks.get(tid)) and s.status == "completed")
        workspace, forge = await asyncio.to_thread(
            lambda: (disk_mib(self.data_dir / "workspaces"), disk_mib(self.forge_root)))
        return Sample(
            t=round(t, 2), published=published, completed=completed, in_flight=published - completed,
            up_rss=round(rss_mib(self.up.pid), 2), nats_rss=round(rss_mib(self.nats_pid), 2),
            up_fds=open_fds(self.up.pid), nats_fds=open_fds(self.nats_pid), consumers=int(sizes["consumers"]),
            ephemeral=int(sizes["ephemeral"]),
            stream_mib=round(sizes["stream_mib"], 4), kv_mib=round(sizes["kv_mib"], 4),
            object_mib=round(sizes["object_mib"], 4), workspace_mib=round(workspace, 3), forge_mib=round(forge, 3))

    async def close(self) -> list[str]:
        notes = []
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        code = await self.up.stop(timeout=30)
        if code not in (None, 0):
            notes.append(f"ccc up exited with {code}: {self.up.stderr_tail(3)}")
        return notes


async def run_soak(options: SoakOptions, progress: Callable[[str], None] | None = None) -> SoakResult:
    """The whole run (see the module's doc). ``progress`` gets a line now and then."""
    options.validate()
    say = progress or (lambda line: None)
    base = Path(options.work_dir) if options.work_dir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ccc-soak-", dir=base))
    soak = Soak(root, options)
    samples: list[Sample] = []
    violations: list[str] = []
    ok = False
    http = httpx.AsyncClient(timeout=10)
    tracker: Tracker | None = None
    try:
        await soak.start()
        say(f"ccc up is running (pid {soak.up.pid}, nats-server {soak.nats_pid}); "
            f"{options.rate:g} issues/min for {options.minutes:g} min")
        assert soak.nc is not None
        tracker = Tracker(soak.nc, soak.ns)
        tracker.start()
        duration, gap = options.minutes * 60, 60.0 / options.rate
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        published, next_sample, next_note = 0, 0.0, 60.0
        while (now := loop.time() - t0) < duration:
            while published * gap <= now and published * gap < duration:  # open loop: on schedule
                published += 1
                await soak.publish(published)
            await soak.review(tracker)
            if now >= next_sample:
                await soak.read_api(http, published)
                samples.append(await soak.sample(now, tracker, published))
                next_sample += options.interval
            if now >= next_note:
                s = samples[-1]
                say(f"{now / 60:.0f} min: {s.published} published, {s.completed} completed; ccc up "
                    f"{s.up_rss:.0f} MiB / {s.up_fds} fds, nats-server {s.nats_rss:.0f} MiB, "
                    f"{s.consumers} consumers, workspaces {s.workspace_mib:.1f} MiB")
                next_note += 60.0
            await asyncio.sleep(min(0.2, gap / 4))
        say(f"stream stopped after {published} issues; draining")
        drain_until = loop.time() + options.drain
        while loop.time() < drain_until and not tracker.all_in(soak.issues, ("completed",)):
            await soak.review(tracker)
            await asyncio.sleep(0.2)
        await tracker.stop()
        records = await read_log(soak.nc, soak.ns)
        verdict = check_log(records, soak.issues, expected_final=("completed",), prefix=soak.ns.prefix)
        final = {r.seq: getattr(r.item, "event_id", None) for r in records}
        vanished = [s for s, eid in tracker.seen.items() if final.get(s, "missing") != eid]
        violations = list(verdict.violations) + soak.merge_errors + soak.api_errors[:10]
        if vanished:
            violations.append(f"lost: {len(vanished)} events seen during the run are not in the final log")
        violations += await soak.close()
        slopes, per_min, fitted = fit(samples, options.warmup_s)
        result = SoakResult(
            minutes=options.minutes, rate=options.rate, agents=options.agents, capacity=options.capacity,
            published=published, completed=verdict.final_states.get("completed", 0), tasks_per_min=per_min,
            warmup_s=options.warmup_s, fit_samples=fitted, slopes=slopes, lost=verdict.lost + len(vanished),
            duplicated=verdict.duplicated, illegal=verdict.illegal, final_states=verdict.final_states,
            violations=violations[:50], samples=samples,
            security="off (--insecure)" if options.insecure else "on (mutual TLS, nkey users, encrypted store)")
        result.ok = ok = (result.lost == 0 and result.duplicated == 0 and result.illegal == 0
                          and not soak.merge_errors and not soak.api_errors and result.flat)
        if options.keep or not ok:
            result.work_dir = str(root)
        return result
    finally:
        if tracker is not None:
            await tracker.stop()
        await http.aclose()
        await soak.close()
        if not ok and not options.keep:
            say(f"kept the run's directory: {root}")
        elif not options.keep:
            shutil.rmtree(root, ignore_errors=True)
