"""What the modules of ``ccc chaos`` share: the options of a suite run
(:class:`ChaosOptions`), what a fault injector reports (:class:`Fault`), and the
results of one run and of one scenario (:class:`RunResult`, :class:`ScenarioResult`)."""

from __future__ import annotations

import msgspec

from infra.shell.chaos.checks import Check, Mark


class ChaosOptions(msgspec.Struct, kw_only=True):
    quick: bool = False
    tasks: int | None = None  # issues per run (default: 12 quick, 40 full)
    runs: int | None = None  # runs per scenario (default: per scenario)
    seed: int | None = None
    keep: bool = False  # keep every sandbox (failed runs are always kept)
    work_dir: str | None = None
    agents: int = 3
    capacity: int = 2
    heartbeat_timeout: float = 2.0
    work_seconds: float = 2.5  # each recorded session sleeps this long: tasks stay in flight
    run_timeout: float | None = None
    # no TLS, no users, no encryption: the suite as it ran before issue 10 (secure by default)
    insecure: bool = False

    @property
    def n_tasks(self) -> int:
        return self.tasks or (12 if self.quick else 40)

    @property
    def timeout(self) -> float:
        return self.run_timeout or (60.0 if self.quick else 240.0)

    # a run whose log has not grown for this long (after the faults) is stuck: longer
    # than a consumer's ack wait (30 s), after which an unacknowledged message comes back
    stall: float = 40.0


class Fault:
    """What a fault injector reports back: how many faults, how to read each recovery
    time from the log, and extra checks over the log."""

    def __init__(self) -> None:
        self.count = 0
        self.marks: list[Mark] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.violations: list[str] = []
        self.injected: set[int] = set()  # poison written to the events stream on purpose
        self.end: float | None = None  # when the harness began stopping the actors


class RunResult(msgspec.Struct, kw_only=True):
    scenario: str
    run: int
    tasks: int
    lost: int
    duplicated: int
    other: int  # illegal histories, stale transitions, unmet scenario expectations
    recoveries: list[float] = []
    faults: int = 0
    seconds: float = 0.0
    final_states: dict[str, int] = {}
    notes: list[str] = []
    violations: list[str] = []
    sandbox: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.other == 0


class ScenarioResult(msgspec.Struct, kw_only=True):
    scenario: str
    runs: int
    tasks: int
    lost: int
    duplicated: int
    other: int
    faults: int
    recovery_p50: float | None
    recovery_max: float | None
    recovery_target: float | None
    recovery_what: str
    seconds: float
    ok: bool
    target_met: bool | None
    expected_failure: str = ""  # a known bug, reported loudly; see Spec in .scenarios
    secure: bool = True  # run with TLS, users and an encrypted store (False: --insecure)
    notes: list[str] = []
    violations: list[str] = []
    sandboxes: list[str] = []
