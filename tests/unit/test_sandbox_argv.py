"""The sandbox's pure parts: the bubblewrap and container command lines, the limits, the
network policy (a repository's ``.ccc/sandbox.toml``, the operator's modes, the proxy's
allow-list matching) and the settings. The real sandbox: tests/integration/test_sandbox.py."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from events.errors import ConfigError
from infra.adapters.git.egress import FORWARDER, check_host_entry, host_allowed
from infra.adapters.git.sandbox import (
    NO_NETWORK,
    Limits,
    NetworkPolicy,
    NoSandbox,
    SandboxUnavailable,
    bwrap_argv,
    container_argv,
    make_sandbox,
    parse_limits,
    parse_network,
    parse_sandbox_file,
)
from infra.adapters.nats.settings import load_settings

SYSTEM = [("/usr", None), ("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/etc", None)]
WS = Path("/data/ws/agent-1/tasks/task-a_b-1")
WRITABLE = [WS / "repo", WS / "home", WS / "tmp"]


def pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == flag]


def argv_for(**kw) -> list[str]:
    base = {"bwrap": "/usr/bin/bwrap", "cwd": WS / "repo", "writable": WRITABLE, "system": SYSTEM,
            "python": "/usr/bin/python3"}
    return bwrap_argv(["make", "test"], **{**base, **kw})


def test_bwrap_namespaces_mounts_and_limits_in_order():
    argv = argv_for(limits=Limits(cpu_seconds=60, memory_bytes=1 << 30, processes=100, file_size_bytes=1 << 20))
    sep = argv.index("--")
    outer, inner = argv[:sep], argv[sep + 1:]
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns"):
        assert flag in outer
    assert "--share-net" not in outer  # no network unless asked for
    assert pairs(outer, "--ro-bind")[:2] == [("/usr", "/usr"), ("/etc", "/etc")]
    assert pairs(outer, "--symlink")[:2] == [("usr/bin", "/bin"), ("usr/lib", "/lib")]
    assert pairs(outer, "--bind") == [(str(p), str(p)) for p in WRITABLE]  # the only writable paths
    assert ("--proc", "/proc") == tuple(outer[outer.index("--proc"):outer.index("--proc") + 2])
    assert ["--dev", "/dev"] == outer[outer.index("--dev"):outer.index("--dev") + 2]
    # a private /tmp before the workspace (which may live under /tmp), then the root read-only
    assert outer.index("/tmp") < outer.index("--bind")
    assert outer[-4:] == ["--remount-ro", "/", "--chdir", str(WS / "repo")]
    assert "--clearenv" not in outer and "--setenv" not in outer  # values never on a command line
    assert inner == ["/usr/bin/prlimit", "--cpu=60:65", f"--as={1 << 30}", "--nproc=100", f"--fsize={1 << 20}",
                     "--", "make", "test"]
    # the shims: `python` is the system's Python inside
    assert pairs(outer, "--symlink")[-2:] == [("/usr/bin/python3", "/run/ccc/bin/python"),
                                              ("/usr/bin/python3", "/run/ccc/bin/python3")]


def test_only_system_paths_are_shown_and_hidden_paths_under_them_are_masked(tmp_path):
    etc_secret_dir = tmp_path / "etc" / "ccc"
    etc_secret_dir.mkdir(parents=True)
    creds = tmp_path / "etc" / "agent.creds"
    creds.write_text("x")
    elsewhere = tmp_path / "home" / "agent"
    system = [("/usr", None), (str(tmp_path / "etc"), None)]
    argv = argv_for(system=system, hide=[etc_secret_dir, creds, elsewhere, tmp_path / "etc" / "missing"])
    assert pairs(argv, "--ro-bind")[0] == ("/usr", "/usr")
    assert ["--tmpfs", str(etc_secret_dir)] == argv[argv.index(str(etc_secret_dir)) - 1:][:2]
    assert ("/dev/null", str(creds)) in pairs(argv, "--ro-bind")  # a file is covered by an empty one
    # not under a bound path: absent anyway, nothing to mask (and no bind of it anywhere)
    assert str(elsewhere) not in argv and str(tmp_path / "etc" / "missing") not in argv
    # a mask comes after the system binds it covers
    assert argv.index(str(etc_secret_dir)) > argv.index(str(tmp_path / "etc"))


def test_network_full_shares_the_hosts_namespace_and_hosts_go_through_the_forwarder():
    assert "--share-net" in argv_for(network=NetworkPolicy(mode="full"))
    argv = argv_for(network=NetworkPolicy(mode="hosts", hosts=("pypi.org",)), egress_dir=Path("/tmp/ccc-egress-x"))
    assert "--share-net" not in argv
    assert ("/tmp/ccc-egress-x", "/run/ccc/egress") in pairs(argv, "--ro-bind")
    inner = argv[argv.index("--") + 1:]
    assert inner[:2] == ["/bin/sh", "-c"] and "/usr/bin/python3" in inner and FORWARDER in inner
    assert inner[inner.index(FORWARDER) + 1:inner.index(FORWARDER) + 3] == ["/run/ccc/egress/proxy.sock", "3128"]
    assert inner[-3:] == ["--", "make", "test"] and "/usr/bin/prlimit" in inner
    with pytest.raises(SandboxUnavailable, match="python3"):
        argv_for(network=NetworkPolicy(mode="hosts", hosts=("pypi.org",)), python=None)


def test_container_argv_passes_values_by_name_and_limits():
    argv = container_argv(["pytest"], engine="/usr/bin/podman", kind="podman", name="ccc-1", image="img:1",
                          cwd=WS / "repo", writable=WRITABLE, env_names=["HOME", "PATH", "SECRET_LOOKING"],
                          read_only=[Path("/opt/tool")], limits=Limits(cpu_seconds=9, memory_bytes=1 << 30,
                                                                        processes=50, file_size_bytes=1 << 20),
                          uid=1000, gid=1000)
    assert argv[:4] == ["/usr/bin/podman", "run", "--rm", "--name"]
    assert ["--network", "none"] == argv[argv.index("--network"):argv.index("--network") + 2]
    for flag, value in (("--pids-limit", "50"), ("--memory", str(1 << 30)), ("--user", "1000:1000"),
                        ("--userns", "keep-id"), ("-w", str(WS / "repo"))):
        assert argv[argv.index(flag) + 1] == value
    assert "--read-only" in argv and ["--cap-drop", "ALL"] == argv[argv.index("--cap-drop"):][:2]
    assert pairs(argv, "--ulimit") == [("cpu=9:9", "--ulimit"), (f"fsize={1 << 20}:{1 << 20}", "-v")]
    assert f"{WS / 'repo'}:{WS / 'repo'}:rw" in argv and "/opt/tool:/opt/tool:ro" in argv
    envs = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert envs == ["HOME", "SECRET_LOOKING"]  # names only; PATH is the image's
    assert argv[-2:] == ["img:1", "pytest"]
    docker = container_argv(["true"], engine="docker", kind="docker", name="n", image="i", cwd=WS, writable=[],
                            env_names=[], network=NetworkPolicy(mode="full"))
    assert "--network" not in docker and "--userns" not in docker
    with pytest.raises(SandboxUnavailable, match="allow-list is not supported"):
        container_argv(["true"], engine="docker", kind="docker", name="n", image="i", cwd=WS, writable=[],
                       env_names=[], network=NetworkPolicy(mode="hosts", hosts=("a.org",)))


def test_a_missing_container_engine_is_a_clear_error():
    sb = make_sandbox("podman", executable="/nonexistent/podman")
    with pytest.raises(SandboxUnavailable, match=r"podman \(/nonexistent/podman\) not found.*--sandbox none"):
        sb.check()
    with pytest.raises(ConfigError, match="--sandbox 'chroot'"):
        make_sandbox("chroot")


def test_limits_parse_and_explain():
    assert parse_limits("") == Limits()
    lim = parse_limits("cpu=600, memory=4G, procs=512, file=512M")
    assert lim == Limits(cpu_seconds=600, memory_bytes=4 << 30, processes=512, file_size_bytes=512 << 20)
    assert parse_limits("memory=off").memory_bytes is None and parse_limits("memory=off").processes == 2048
    for bad in ("cpu", "cpu=10s", "procs=1k", "disk=1G", "memory=-1", "file=0"):
        with pytest.raises(ConfigError, match="CCC_SANDBOX_LIMITS"):
            parse_limits(bad)
    lim = Limits(cpu_seconds=5, file_size_bytes=1 << 20)
    assert "CPU time limit (5 s" in lim.explain(128 + signal.SIGXCPU)
    assert "file size limit (1 MiB" in lim.explain(-signal.SIGXFSZ)
    assert lim.explain(1) == "" and lim.explain(137) == ""


@pytest.mark.parametrize("text,name,expected", [
    ('network = "none"', ".ccc/sandbox.toml", NO_NETWORK),
    ("", ".ccc/sandbox.toml", NO_NETWORK),
    ('network = "full"', ".ccc/sandbox.toml", NetworkPolicy(mode="full")),
    ('network = ["PyPI.org", "files.pythonhosted.org:443", "*.npmjs.org", "pypi.org"]', ".ccc/sandbox.toml",
     NetworkPolicy(mode="hosts", hosts=("pypi.org", "files.pythonhosted.org:443", "*.npmjs.org"))),
    ('{"network": ["registry.npmjs.org"]}', ".ccc/sandbox.json",
     NetworkPolicy(mode="hosts", hosts=("registry.npmjs.org",))),
])
def test_the_repositorys_setting(text, name, expected):
    assert parse_sandbox_file(text, name) == expected


@pytest.mark.parametrize("text,match", [
    ('network = "some"', 'network must be "none", "full" or a list'),
    ("network = 1", 'network must be "none", "full" or a list'),
    ('network = ["https://pypi.org/simple"]', "is not a host name"),
    ('network = ["pypi.org:99999"]', "port must be"),
    ('network = [""]', "must be a host name"),
    ('netwrok = "full"', r"unknown setting\(s\) netwrok"),
    ("network = [", "not valid TOML"),
])
def test_a_bad_repository_setting_is_a_clear_error(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_sandbox_file(text, ".ccc/sandbox.toml")
    assert str(e.value).startswith(".ccc/sandbox.toml")


def test_the_operator_decides_what_a_repository_may_ask_for():
    hosts, full = NetworkPolicy(mode="hosts", hosts=("pypi.org",)), NetworkPolicy(mode="full")
    NoSandbox().admit(hosts)
    with pytest.raises(ConfigError, match="--sandbox-network allow-full"):
        NoSandbox().admit(full)
    NoSandbox(network_mode="allow-full").admit(full)
    with pytest.raises(ConfigError, match=r"pypi\.org.*--sandbox-network none"):
        NoSandbox(network_mode="none").admit(hosts)
    NoSandbox(network_mode="none").admit(NO_NETWORK)
    with pytest.raises(ConfigError, match="sandbox network"):
        NoSandbox(network_mode="open")


def test_policies_combine_and_round_trip_through_the_metadata():
    api = NetworkPolicy(mode="hosts", hosts=("api.anthropic.com:443",), trusted=("api.anthropic.com:443",))
    both = parse_network(["pypi.org"], "x").union(api)
    assert both.hosts == ("pypi.org", "api.anthropic.com:443") and both.trusted == ("api.anthropic.com:443",)
    assert NO_NETWORK.union(NO_NETWORK) == NO_NETWORK
    assert NetworkPolicy(mode="full").union(api).mode == "full"
    for p in (NO_NETWORK, NetworkPolicy(mode="full"), parse_network(["a.org"], "x")):
        assert parse_network(p.setting(), "x") == p


def test_allow_list_matching():
    entries = ("pypi.org", "*.githubusercontent.com", "localhost:8123")
    assert host_allowed("pypi.org", 443, entries) == "pypi.org"
    assert host_allowed("PyPI.org.", 80, entries) == "pypi.org"
    assert host_allowed("pypi.org", 22, entries) is None  # a bare name: HTTPS and HTTP only
    assert host_allowed("raw.githubusercontent.com", 443, entries) == "*.githubusercontent.com"
    assert host_allowed("githubusercontent.com", 443, entries) is None
    assert host_allowed("evilgithubusercontent.com", 443, entries) is None
    assert host_allowed("pypi.org.evil.com", 443, entries) is None
    assert host_allowed("localhost", 8123, entries) == "localhost:8123"
    assert host_allowed("localhost", 443, entries) is None
    assert check_host_entry(" Example.COM:8080 ", "x") == "example.com:8080"
    for bad in ("a b", "http://x", "x/y", "*", "*.", "-a.org", "a..org"):
        with pytest.raises(ConfigError):
            check_host_entry(bad, "x")


def test_settings(tmp_path):
    base = {"CCC_DATA_DIR": str(tmp_path)}
    s = load_settings(base)
    assert (s.sandbox, s.sandbox_network, s.sandbox_bin, s.sandbox_limits) == ("bwrap", "allow-list", None, "")
    s = load_settings({**base, "CCC_SANDBOX": "none", "CCC_SANDBOX_NETWORK": "allow-full",
                       "CCC_SANDBOX_BIN": "/opt/bwrap", "CCC_SANDBOX_LIMITS": "procs=64"}, sandbox="podman")
    assert (s.sandbox, s.sandbox_network, s.sandbox_bin, s.sandbox_limits) == ("podman", "allow-full",
                                                                             "/opt/bwrap", "procs=64")
    assert load_settings({**base, "CCC_SANDBOX_READ_ONLY": f"{tmp_path}, /usr"}).sandbox_read_only == (
        str(tmp_path), "/usr")
    for env, match in (({"CCC_SANDBOX_READ_ONLY": "relative/dir"}, "CCC_SANDBOX_READ_ONLY"),
                       ({"CCC_SANDBOX_READ_ONLY": "/no/such/dir"}, "CCC_SANDBOX_READ_ONLY"),
                       ({"CCC_SANDBOX": "chroot"}, "CCC_SANDBOX"), ({"CCC_SANDBOX_NETWORK": "open"},
                                                                   "CCC_SANDBOX_NETWORK"),
                       ({"CCC_SANDBOX_LIMITS": "cpu=x"}, "CCC_SANDBOX_LIMITS")):
        with pytest.raises(ConfigError, match=match):
            load_settings({**base, **env})


def test_the_claude_cli_gets_the_model_api_and_its_installation():
    from infra.adapters.coders.claude_cli import model_api_network

    assert model_api_network(None) == NetworkPolicy(mode="hosts", hosts=("api.anthropic.com:443",),
                                                    trusted=("api.anthropic.com:443",))
    local = model_api_network("http://127.0.0.1:8089/anthropic")
    assert local.hosts == local.trusted == ("127.0.0.1:8089",)  # the operator's: a private address is fine
    assert model_api_network("https://gateway.example.com").hosts == ("gateway.example.com:443",)


def test_install_dirs_show_the_package_and_an_interpreter_outside_the_system(tmp_path):
    from infra.adapters.coders.claude_cli import install_dirs

    pkg = tmp_path / "lib" / "node_modules" / "claude-code"
    pkg.mkdir(parents=True)
    node_prefix = tmp_path / "nvm" / "v22"
    (node_prefix / "bin").mkdir(parents=True)
    (node_prefix / "bin" / "nodexyz").write_text("#!/bin/sh\n")
    (node_prefix / "bin" / "nodexyz").chmod(0o755)
    cli = pkg / "cli.js"
    cli.write_text("#!/usr/bin/env -S nodexyz --no-warnings\n")
    assert install_dirs(str(cli), str(node_prefix / "bin")) == [pkg, node_prefix]
    cli.write_text("#!/usr/bin/env sh\n")  # an interpreter the system has: nothing more to show
    assert install_dirs(str(cli), str(node_prefix / "bin")) == [pkg]
    native = tmp_path / "versions" / "2.0.0"
    native.parent.mkdir()
    native.write_bytes(b"\x7fELF...")
    assert install_dirs(str(native), "/usr/bin") == [native.parent]
    assert install_dirs("/usr/bin/true", "/usr/bin") == []
