"""The sandbox every workspace command runs in: the coder's ``run_command``, the scripted
coder's steps, the repository's own tests and the Claude Code CLI with its Bash tool.

Why: those commands run code from the repository under change and commands a model
chose after reading text anyone can write (issues, comments). As the agent's own user
with a scrubbed environment they could still read the agent's secrets from
``/proc/$PPID/environ``, the data dir (``nats.url``, credentials), other tasks'
workspaces and ``~``; reach the NATS port; and outlive the task with ``setsid``.

Backends (``--sandbox`` / ``CCC_SANDBOX``):

``bwrap`` (default): bubblewrap. Each command gets new user, PID, network, IPC and UTS
  namespaces; a root built from an allow-list (``/usr``, ``/bin``, ``/lib*``, ``/etc``
  read-only; nothing else of the host, so the data dir, other workspaces, ``~`` and the
  agent's virtualenv are simply absent, wherever they live, and masked with an empty
  tmpfs should one lie under a system path); the task's ``repo``, ``home`` and ``tmp``
  as the only writable paths, a private ``/tmp``, its own ``/proc`` (only its own
  processes) and a minimal ``/dev``; the root remounted read-only. Limits (CPU seconds,
  address space, processes, file size) are set by ``prlimit`` *inside* the sandbox,
  after the user namespace exists: ``RLIMIT_NPROC`` counts per user and namespace, so
  set outside it would count every process of the agent's user on the host (and
  nothing at all for root). The wall time is the caller's timeout: killing bwrap kills
  the sandbox's PID 1 (``--die-with-parent``), and when PID 1 of a PID namespace ends
  the kernel ends everything in it, ``setsid`` daemons included.
``podman`` / ``docker``: a throw-away container per command (read-only root, the same
  writable paths, ``--network none``, ``--pids-limit``, ``--memory``, rlimits).
``none``: no sandbox (the operator's explicit choice; a warning at start, and
  ``sandbox: "none"`` on the agent's ``agent.registered`` event).

Fail closed: :meth:`Sandbox.check` probes once (a trivial command in a real sandbox);
when it fails, every command is refused with :class:`SandboxUnavailable`, which names
the cause and the two ways out (install bubblewrap, or ``--sandbox none``).

Network: none by default. :class:`NetworkPolicy` from the repository's
``.ccc/sandbox.toml`` (read from the clone's base commit, before anyone edits it):
``network = "none" | ["host", ...] | "full"``. A host list goes through the filtering
proxy of :mod:`infra.adapters.git.egress`; ``"full"`` (the host's network namespace,
its loopback included) only when the operator allows it (``--sandbox-network
allow-full``); ``--sandbox-network none`` refuses any network a repository asks for.

The environment reaches the command as bubblewrap's own environment, which is exactly
the workspace's scrubbed one: bwrap hands its environment to the command. Not as
``--setenv NAME VALUE``: a command line is readable by every user of the host
(``/proc/<pid>/cmdline``), and the Claude Code CLI's environment holds its API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import msgspec
import structlog

from events.errors import ConfigError

from infra.adapters.git.cgroups import PidsGroup, PidsLimiter
from infra.adapters.git.egress import FORWARDER, INNER_PORT, EgressProxy, check_host_entry
from infra.adapters.git.processes import die_with_parent

log = structlog.get_logger("ccc.sandbox")

__all__ = [
    "NETWORK_MODES",
    "NO_NETWORK",
    "SANDBOXES",
    "SANDBOX_FILES",
    "BwrapSandbox",
    "ContainerSandbox",
    "Launch",
    "Limits",
    "NetworkPolicy",
    "NoSandbox",
    "Sandbox",
    "SandboxUnavailable",
    "bwrap_argv",
    "container_argv",
    "default_hidden",
    "default_sandbox",
    "make_sandbox",
    "parse_limits",
    "parse_network",
    "parse_sandbox_file",
    "sandbox_python",
    "system_mounts",
]

SANDBOXES = ("bwrap", "podman", "docker", "none")
NETWORK_MODES = ("none", "allow-list", "allow-full")  # what the operator lets repositories ask for
SANDBOX_FILES = (".ccc/sandbox.toml", ".ccc/sandbox.json")  # the repository's own setting
MAX_SANDBOX_FILE = 16 * 1024
DEFAULT_IMAGE = "docker.io/library/python:3.11-slim"
# Read-only system paths of a bwrap sandbox. /bin, /lib, ... are symlinks into /usr on a
# merged-/usr system and are recreated as symlinks.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
SHIM_DIR = "/run/ccc/bin"  # `python`/`python3` -> the system Python visible in the sandbox
EGRESS_DIR = "/run/ccc/egress"  # where the proxy's socket directory is bound
PROXY_URL = f"http://127.0.0.1:{INNER_PORT}"


class SandboxUnavailable(ConfigError):
    """No sandbox can be created here, so no command runs (fail closed). Retryable: it
    is this agent's host that lacks one, another agent may take the task."""

    retryable = True


# -- what a command may do ------------------------------------------------------------------
class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Resource limits of one sandboxed command; None: not limited. CPU time and file size
    are per process (rlimits), processes per sandbox (its own user namespace), memory is
    address space per process (``RLIMIT_AS``). The output size is the runner's limit."""

    cpu_seconds: int | None = 1800
    memory_bytes: int | None = 8 << 30
    processes: int | None = 2048
    file_size_bytes: int | None = 2 << 30

    def prlimit_args(self) -> list[str]:
        pairs = (("as", self.memory_bytes), ("nproc", self.processes), ("fsize", self.file_size_bytes))
        args = [f"--{name}={value}" for name, value in pairs if value is not None]
        if self.cpu_seconds is not None:
            # soft below hard: SIGXCPU first (a death that says why), SIGKILL if it is caught
            args.insert(0, f"--cpu={self.cpu_seconds}:{self.cpu_seconds + 5}")
        return args

    def explain(self, exit_code: int) -> str:
        """Why a command that ended with ``exit_code`` ended, when a limit did it. A signal
        shows as ``-N`` from a plain process and as ``128+N`` through bwrap or a shell."""
        signo = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
        if signo == signal.SIGXCPU and self.cpu_seconds is not None:
            return f"stopped by the sandbox's CPU time limit ({self.cpu_seconds} s per process)"
        if signo == signal.SIGXFSZ and self.file_size_bytes is not None:
            return f"stopped by the sandbox's file size limit ({_size(self.file_size_bytes)} per file)"
        return ""


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


_LIMIT_KEYS = {"cpu": "cpu_seconds", "memory": "memory_bytes", "procs": "processes", "file": "file_size_bytes"}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_limits(text: str, source: str = "CCC_SANDBOX_LIMITS", base: Limits | None = None) -> Limits:
    """``cpu=600,memory=4G,procs=512,file=1G`` (``off`` lifts one): the defaults for
    what is not named."""
    values = msgspec.structs.asdict(base or Limits())
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, raw = item.partition("=")
        field = _LIMIT_KEYS.get(key.strip().lower())
        raw = raw.strip().lower()
        if field is None or not raw:
            raise ConfigError(f"{source}: {item!r} (use cpu=SECONDS, memory=SIZE, procs=N, file=SIZE; "
                              "sizes like 512M or 4G; off for no limit)")
        if raw in ("off", "none", "unlimited"):
            values[field] = None
            continue
        m = re.fullmatch(r"(\d+)([kmgt]?)(i?b)?", raw)
        if not m or (field in ("cpu_seconds", "processes") and (m.group(2) or m.group(3))):
            raise ConfigError(f"{source}: {item!r}: expected a number" +
                              (" with an optional K/M/G suffix" if field.endswith("bytes") else ""))
        n = int(m.group(1)) * _UNITS[m.group(2)]
        if n < 1:
            raise ConfigError(f"{source}: {item!r} must be at least 1")
        values[field] = n
    return Limits(**values)


class NetworkPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a sandboxed command may reach. ``hosts``: allow-list entries (``host``,
    ``host:port``, ``*.domain``); ``trusted``: entries an operator named (the coder's
    model API), which may resolve to private addresses."""

    mode: Literal["none", "hosts", "full"] = "none"
    hosts: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()

    def union(self, other: NetworkPolicy) -> NetworkPolicy:
        if "full" in (self.mode, other.mode):
            return NetworkPolicy(mode="full")
        hosts = tuple(dict.fromkeys(self.hosts + other.hosts))
        trusted = tuple(dict.fromkeys(self.trusted + other.trusted))
        return NetworkPolicy(mode="hosts", hosts=hosts, trusted=trusted) if hosts else NO_NETWORK

    def setting(self) -> str | list[str]:
        """As written in ``.ccc/sandbox.toml`` (and kept in the workspace's metadata)."""
        return list(self.hosts) if self.mode == "hosts" else self.mode


NO_NETWORK = NetworkPolicy()


def parse_network(value: object, source: str) -> NetworkPolicy:
    if value == "none" or value == []:
        return NO_NETWORK
    if value == "full":
        return NetworkPolicy(mode="full")
    if isinstance(value, list) and value:
        return NetworkPolicy(mode="hosts", hosts=tuple(dict.fromkeys(check_host_entry(v, source) for v in value)))
    raise ConfigError(f'{source}: network must be "none", "full" or a list of host names '
                      f'(e.g. network = ["pypi.org", "files.pythonhosted.org"]), got {value!r}')


def parse_sandbox_file(text: str, name: str) -> NetworkPolicy:
    """A repository's ``.ccc/sandbox.toml`` (or ``.json``). Unknown keys are an error: a
    typo must not silently mean "no network" (or anything else)."""
    try:
        data = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{name}: not valid {'JSON' if name.endswith('.json') else 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table with a network key")
    unknown = sorted(set(data) - {"network"})
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)} (known: network)")
    return parse_network(data.get("network", "none"), f"{name}: network")


# -- one prepared command ----------------------------------------------------------------------
class Launch:
    """A command ready to start: ``argv`` and ``env`` for the process, ``preexec`` for the
    child between fork and exec, and what to say afterwards about how the sandbox ended
    it (limits hit, hosts refused)."""

    def __init__(self, argv: list[str], env: dict[str, str], limits: Limits | None = None,
                 proxy: EgressProxy | None = None, preexec: Callable[[], None] = die_with_parent) -> None:
        self.argv, self.env, self.limits, self.proxy, self.preexec = argv, env, limits, proxy, preexec

    def notes(self, exit_code: int | None) -> list[str]:
        out = []
        why = self.limits.explain(exit_code) if self.limits is not None and exit_code is not None else ""
        if why:
            out.append(why)
        if self.proxy is not None:
            out += [f"network refused: {r}" for r in self.proxy.refused]
        return out


class Sandbox:
    """The interface (and the ``none`` backend's behaviour where it is shared)."""

    name: str = "none"

    def __init__(self, *, network_mode: str = "allow-list", limits: Limits | None = None) -> None:
        if network_mode not in NETWORK_MODES:
            raise ConfigError(f"sandbox network: {network_mode!r} (use {', '.join(NETWORK_MODES)})")
        self.network_mode = network_mode
        self.limits = limits or Limits()

    def check(self) -> None:
        """Raise :class:`SandboxUnavailable` when commands cannot run sandboxed here."""

    def admit(self, network: NetworkPolicy, source: str = "the repository") -> None:
        """Refuse (clearly, before any work) network the operator does not allow."""
        if network.mode == "full" and self.network_mode != "allow-full":
            raise ConfigError(f'{source} asks for network = "full" ({SANDBOX_FILES[0]}), which this agent does '
                              "not allow: start it with --sandbox-network allow-full, or list the hosts the "
                              "repository needs")
        if network.mode == "hosts" and self.network_mode == "none":
            raise ConfigError(f"{source} asks for network access to {', '.join(network.hosts)} "
                              f"({SANDBOX_FILES[0]}), which this agent does not allow (--sandbox-network none)")

    @contextlib.asynccontextmanager
    async def launch(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                     writable: Sequence[Path], read_only: Sequence[Path] = (), hide: Sequence[Path] = (),
                     network: NetworkPolicy = NO_NETWORK, limits: Limits | None = None) -> AsyncIterator[Launch]:
        """Prepare ``argv`` to run in the sandbox, for the duration of the ``async with``
        (a proxy or a container may live that long)."""
        yield Launch(list(argv), dict(env))


class NoSandbox(Sandbox):
    """Commands run as the agent's user, as they are (``--sandbox none``)."""

    name = "none"


# -- bubblewrap ------------------------------------------------------------------------------------
def system_mounts(paths: Iterable[str] = SYSTEM_PATHS) -> list[tuple[str, str | None]]:
    """``(path, symlink target or None)`` for the system paths that exist here."""
    out = []
    for p in paths:
        if os.path.islink(p):
            out.append((p, os.readlink(p)))
        elif os.path.isdir(p):
            out.append((p, None))
    return out


def _under(path: Path, base: Path) -> bool:
    return path == base or path.is_relative_to(base)


def bwrap_argv(
    command: Sequence[str], *, bwrap: str, cwd: Path, writable: Sequence[Path], system: Sequence[tuple[str, str | None]],
    read_only: Sequence[Path] = (), hide: Sequence[Path] = (), network: NetworkPolicy = NO_NETWORK,
    limits: Limits | None = None, prlimit: str = "/usr/bin/prlimit", python: str | None = None,
    egress_dir: Path | None = None, disable_userns: bool = True,
) -> list[str]:
    """The bubblewrap command line for ``command`` (pure: everything it depends on is an
    argument, so it is tested as such). Order matters: a later mount covers an earlier
    one, so the masks come after the system binds and the workspace after ``/tmp``."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--hostname", "ccc-sandbox"]
    if disable_userns:  # no nested user namespace to build another world from inside
        argv.append("--disable-userns")
    if network.mode == "full":
        argv.append("--share-net")
    mounted: list[Path] = []
    for path, target in system:
        if target is None:
            argv += ["--ro-bind", path, path]
            mounted.append(Path(path))
        else:
            argv += ["--symlink", target, path]
    for h in sorted({Path(p) for p in hide}):
        # only what would otherwise be visible: a hidden path under a bound system path
        if any(_under(h, m) and h != m for m in mounted) and h.exists():
            argv += ["--tmpfs", str(h)] if h.is_dir() else ["--ro-bind", "/dev/null", str(h)]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    if network.mode == "full" and os.path.isdir("/run/systemd/resolve"):
        argv += ["--ro-bind", "/run/systemd/resolve", "/run/systemd/resolve"]  # resolv.conf's target
    if python:
        argv += ["--dir", SHIM_DIR, "--symlink", python, f"{SHIM_DIR}/python",
                 "--symlink", python, f"{SHIM_DIR}/python3"]
    for p in read_only:
        argv += ["--ro-bind", str(p), str(p)]
    for p in writable:
        argv += ["--bind", str(p), str(p)]
    if egress_dir is not None:
        argv += ["--ro-bind", str(egress_dir), EGRESS_DIR]
    argv += ["--remount-ro", "/", "--chdir", str(cwd), "--"]
    inner = [prlimit, *(limits or Limits()).prlimit_args(), "--", *command]
    if network.mode == "hosts":
        if python is None:
            raise SandboxUnavailable("a network allow-list needs a python3 under /usr inside the sandbox "
                                     "(its proxy forwarder); none was found")
        # start the forwarder (it returns once its port is bound), then become the command
        inner = ["/bin/sh", "-c", '"$1" -I -S -c "$2" "$3" "$4" || exit 125; shift 4; exec "$@"', "ccc-sandbox",
                 python, FORWARDER, f"{EGRESS_DIR}/proxy.sock", str(INNER_PORT), *inner]
    return argv + inner


def sandbox_python(system: Sequence[tuple[str, str | None]], hide: Sequence[Path] = ()) -> str | None:
    """A Python the sandbox can run: the agent's own base interpreter when it lives under
    a bound system path (same version as the agent), else the system's ``python3``."""
    mounted = [Path(p) for p, target in system if target is None]
    candidates = [os.path.realpath(sys.executable), os.path.realpath(getattr(sys, "_base_executable", "")),
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        p = Path(c)
        if c and os.access(c, os.X_OK) and any(_under(p, m) for m in mounted) \
                and not any(_under(p, Path(h)) for h in hide):
            return str(p)
    return None


def default_hidden() -> list[Path]:
    """What a sandbox never shows, wherever it lies: the agent's home and its virtualenv."""
    hidden = [Path.home()]
    if sys.prefix != sys.base_prefix:  # a virtualenv: the agent's packages and entry points
        hidden.append(Path(sys.prefix))
    return [h.resolve() for h in hidden]


class BwrapSandbox(Sandbox):
    name = "bwrap"

    def __init__(self, executable: str = "bwrap", *, hide: Iterable[Path | str] = (),
                 read_only: Iterable[Path | str] = (), network_mode: str = "allow-list",
                 limits: Limits | None = None) -> None:
        super().__init__(network_mode=network_mode, limits=limits)
        self.executable = executable
        self.hide = [*default_hidden(), *(Path(h).resolve() for h in hide)]
        self.read_only = [Path(p).resolve() for p in read_only]
        self._error: str | None = None
        self._checked = False
        self._exe = self._prlimit = ""
        self._disable_userns = False
        self._system: list[tuple[str, str | None]] = []
        self._python: str | None = None
        self._pids: PidsLimiter | None = None

    def check(self) -> None:
        if not self._checked:
            self._error = self._probe()
            self._checked = True
            if self._error:
                log.error("sandbox.unavailable", sandbox=self.name, reason=self._error)
        if self._error:
            raise SandboxUnavailable(self._error)

    def _probe(self) -> str | None:
        how = ("install it (bash .ci/system-deps.sh, or apt-get install bubblewrap) or run the agent with "
               "--sandbox none (commands then run unsandboxed)")
        if not sys.platform.startswith("linux"):
            return "bubblewrap needs Linux: use --sandbox podman or docker (or --sandbox none)"
        exe = shutil.which(self.executable)
        if exe is None:
            return f"no sandbox: bubblewrap ({self.executable}) not found: {how}"
        self._exe = exe
        self._system = system_mounts()
        prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
        if prlimit is None:
            return "no sandbox: prlimit (util-linux) not found in /usr/bin: it sets the sandbox's limits"
        self._prlimit = prlimit
        self._python = sandbox_python(self._system, self.hide)
        try:
            help_text = subprocess.run([exe, "--help"], check=False, capture_output=True, text=True,
                                       timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"no sandbox: cannot run {exe}: {exc}: {how}"
        self._disable_userns = "--disable-userns" in help_text
        with tempfile.TemporaryDirectory(prefix="ccc-probe-") as tmp:
            argv = self._argv(["/bin/true"], cwd=Path(tmp), writable=[Path(tmp)])
            try:
                r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=20,
                                   env={"PATH": "/usr/bin:/bin"})
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"no sandbox: {exe} did not run: {exc}: {how}"
        if os.geteuid() == 0 and self.limits.processes is not None:
            self._pids = PidsLimiter.find()
            if self._pids is None:
                log.warning("sandbox.process_limit_unenforced", reason="the agent runs as root, which "
                            "RLIMIT_NPROC exempts, and no writable pids cgroup was found: a fork bomb is "
                            "bounded by the wall time only; run agents as an unprivileged user")
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip()[-500:] or f"exit code {r.returncode}"
            return (f"no sandbox: bubblewrap cannot create one on this host ({why}); unprivileged user "
                    f"namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, "
                    f"user.max_user_namespaces, an AppArmor policy, a container's seccomp profile): fix "
                    f"that, or run the agent with --sandbox none")
        return None

    def _argv(self, command: Sequence[str], *, cwd: Path, writable: Sequence[Path],
              read_only: Sequence[Path] = (), hide: Sequence[Path] = (), network: NetworkPolicy = NO_NETWORK,
              limits: Limits | None = None, egress_dir: Path | None = None) -> list[str]:
        hidden = [*self.hide, *(Path(h).resolve() for h in hide)]
        extra = [*self.read_only, *(Path(p).resolve() for p in read_only)]
        for p in extra:  # a read-only bind must not bring a hidden path back into view
            for h in hidden:
                if _under(h, p):
                    raise ConfigError(f"sandbox: cannot show {p} read-only: it contains {h}, which commands "
                                      "must not see")
        return bwrap_argv(command, bwrap=self._exe, cwd=cwd, writable=writable, system=self._system,
                          read_only=extra, hide=hidden, network=network, limits=limits or self.limits,
                          prlimit=self._prlimit, python=self._python, egress_dir=egress_dir,
                          disable_userns=self._disable_userns)

    @contextlib.asynccontextmanager
    async def launch(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                     writable: Sequence[Path], read_only: Sequence[Path] = (), hide: Sequence[Path] = (),
                     network: NetworkPolicy = NO_NETWORK, limits: Limits | None = None) -> AsyncIterator[Launch]:
        self.check()
        limits = limits or self.limits
        env = dict(env)
        env.pop("VIRTUAL_ENV", None)  # the agent's virtualenv: not in the sandbox
        if self._python:
            env["PATH"] = f"{SHIM_DIR}:{env.get('PATH') or '/usr/bin:/bin'}"
        group: PidsGroup | None = None
        if self._pids is not None and limits.processes is not None:
            # +3: the outer bwrap, the sandbox's init and the forwarder are counted too
            # (a few small cgroupfs calls: not worth a thread hop)
            group = self._pids.group(limits.processes + 3)
        preexec = group.preexec() if group is not None else die_with_parent
        try:
            if network.mode != "hosts":
                yield Launch(self._argv(argv, cwd=cwd, writable=writable, read_only=read_only, hide=hide,
                                        network=network, limits=limits), env, limits, preexec=preexec)
                return
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[name] = PROXY_URL
            for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
                env.pop(name, None)  # everything goes through the proxy; nothing else is reachable
            async with EgressProxy(network.hosts, network.trusted) as proxy:
                assert proxy.dir is not None
                yield Launch(self._argv(argv, cwd=cwd, writable=writable, read_only=read_only, hide=hide,
                                        network=network, limits=limits, egress_dir=proxy.dir), env, limits,
                             proxy, preexec=preexec)
        finally:
            if group is not None:
                group.close()


# -- containers --------------------------------------------------------------------------------------
def container_argv(
    command: Sequence[str], *, engine: str, kind: str, name: str, image: str, cwd: Path,
    writable: Sequence[Path], env_names: Iterable[str], read_only: Sequence[Path] = (),
    network: NetworkPolicy = NO_NETWORK, limits: Limits | None = None, uid: int | None = None,
    gid: int | None = None,
) -> list[str]:
    """The ``podman``/``docker run`` command line for ``command`` (pure). Variables are
    passed by name (``-e NAME``: the engine copies the value from its own environment),
    so no value is ever on a command line."""
    limits = limits or Limits()
    if network.mode == "hosts":
        raise SandboxUnavailable(f"a network allow-list is not supported with --sandbox {kind}: use "
                                 "--sandbox bwrap, or network = \"full\"")
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    argv = [engine, "run", "--rm", "--name", name, "--init", "--read-only",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--tmpfs", "/tmp:rw,nosuid,nodev", "--user", f"{uid}:{gid}"]
    if network.mode == "none":  # "full": the engine's default network (not the host's loopback)
        argv += ["--network", "none"]
    if kind == "podman":
        argv += ["--userns", "keep-id"]  # rootless: files written keep the agent's owner
    if limits.processes is not None:
        argv += ["--pids-limit", str(limits.processes)]
    if limits.memory_bytes is not None:
        argv += ["--memory", str(limits.memory_bytes)]
    if limits.cpu_seconds is not None:
        argv += ["--ulimit", f"cpu={limits.cpu_seconds}:{limits.cpu_seconds}"]
    if limits.file_size_bytes is not None:
        argv += ["--ulimit", f"fsize={limits.file_size_bytes}:{limits.file_size_bytes}"]
    for p in read_only:
        argv += ["-v", f"{p}:{p}:ro"]
    for p in writable:
        argv += ["-v", f"{p}:{p}:rw"]
    for n in sorted(env_names):
        if n != "PATH":  # the image's own PATH: the host's names directories the image lacks
            argv += ["-e", n]
    return [*argv, "-w", str(cwd), image, *command]


class ContainerSandbox(Sandbox):
    """One throw-away container per command (``podman`` or ``docker``), from ``image``:
    the repository's toolchain comes from the image, not from the host."""

    def __init__(self, kind: Literal["podman", "docker"], *, executable: str | None = None,
                 image: str = DEFAULT_IMAGE, network_mode: str = "allow-list", limits: Limits | None = None,
                 read_only: Iterable[Path | str] = ()) -> None:
        super().__init__(network_mode=network_mode, limits=limits)
        self.name = kind
        self.kind = kind
        self.executable = executable or kind
        self.image = image
        self.read_only = [Path(p) for p in read_only]
        self._exe: str | None = None

    def check(self) -> None:
        if self._exe is None:
            exe = shutil.which(self.executable)
            if exe is None:
                raise SandboxUnavailable(f"no sandbox: {self.kind} ({self.executable}) not found: install it, "
                                         "choose --sandbox bwrap, or run with --sandbox none")
            self._exe = exe

    def admit(self, network: NetworkPolicy, source: str = "the repository") -> None:
        super().admit(network, source)
        if network.mode == "hosts":
            raise ConfigError(f"{source} asks for a network allow-list, which --sandbox {self.kind} does not "
                              "support: use --sandbox bwrap")

    @contextlib.asynccontextmanager
    async def launch(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
                     writable: Sequence[Path], read_only: Sequence[Path] = (), hide: Sequence[Path] = (),
                     network: NetworkPolicy = NO_NETWORK, limits: Limits | None = None) -> AsyncIterator[Launch]:
        self.check()
        assert self._exe is not None
        limits = limits or self.limits
        name = f"ccc-{uuid.uuid4().hex[:12]}"
        full = container_argv(argv, engine=self._exe, kind=self.kind, name=name, image=self.image, cwd=cwd,
                              writable=writable, env_names=env, read_only=[*self.read_only, *read_only],
                              network=network, limits=limits)
        # the engine's client is what the runner kills on timeout; the container itself
        # belongs to the engine's daemon and is removed here, however the command ended
        client_env = {**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for var in ("DOCKER_HOST", "XDG_RUNTIME_DIR", "CONTAINER_HOST"):
            if var in os.environ:
                client_env[var] = os.environ[var]
        try:
            yield Launch(full, client_env, limits)
        finally:
            with contextlib.suppress(OSError, TimeoutError):
                proc = await asyncio.create_subprocess_exec(
                    self._exe, "rm", "-f", name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.wait_for(proc.wait(), 30)


# -- choosing one --------------------------------------------------------------------------------------
def make_sandbox(kind: str, *, executable: str | None = None, image: str | None = None,
                 network_mode: str = "allow-list", limits: Limits | None = None,
                 hide: Iterable[Path | str] = (), read_only: Iterable[Path | str] = ()) -> Sandbox:
    """The sandbox of that kind (``--sandbox``), not probed yet (:meth:`Sandbox.check`)."""
    if kind == "bwrap":
        return BwrapSandbox(executable or "bwrap", hide=hide, read_only=read_only, network_mode=network_mode,
                            limits=limits)
    if kind in ("podman", "docker"):
        return ContainerSandbox(kind, executable=executable, image=image or DEFAULT_IMAGE,  # type: ignore[arg-type]
                                network_mode=network_mode, limits=limits, read_only=read_only)
    if kind == "none":
        return NoSandbox(network_mode=network_mode, limits=limits)
    raise ConfigError(f"--sandbox {kind!r}: choose one of {', '.join(SANDBOXES)}")


_default: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """The process's default sandbox for workspaces built without one: bubblewrap with the
    default limits, probed on first use. Fail closed: code that forgets to choose gets a
    sandbox, never none."""
    global _default
    if _default is None:
        _default = BwrapSandbox()
    return _default
