"""The container image and the Kubernetes manifests (deploy/), checked offline: every YAML
document parses and has the fields its kind needs (the parts of the Kubernetes and KEDA
schemas that matter here), every command a container runs and the image's
ENTRYPOINT/CMD is a real ``ccc`` subcommand whose options parse (click, no Docker, no
cluster), and the pieces fit together (selectors, Services, ScaledObjects, grace periods)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from events.subjects import Namespace
from events.task import SPECIALTIES
from infra.adapters.nats.provisioning import demand_consumer, demand_consumer_configs, stream_configs
from infra.shell.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # an RFC 1123 label: what names must be
REQUIRED_TRIGGER = ("natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold")


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


DOCS = documents()


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d.get("kind") == kind]


def containers() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], c) for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


# -- parse and structure -------------------------------------------------------------------
def test_there_are_manifests_and_each_is_a_kubernetes_object():
    assert {f.name for f in K8S.glob("*.yaml")} >= {"coordinator.yaml", "api.yaml", "agents.yaml", "keda.yaml"}
    assert DOCS
    for file, d in DOCS:
        assert isinstance(d, dict), file
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), file
        assert NAME.match(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= 63, (file, d["metadata"])
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "ccc", (file, d["metadata"]["name"])
            assert isinstance(d.get("spec"), dict), file
    kinds = {(d["apiVersion"], d["kind"]) for _, d in DOCS}
    assert kinds <= {("v1", "Namespace"), ("apps/v1", "Deployment"), ("v1", "Service"),
                     ("keda.sh/v1alpha1", "ScaledObject")}, kinds
    names = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(names) == len(set(names)), "duplicate objects"


def test_deployments_are_well_formed():
    for d in of_kind("Deployment"):
        spec, name = d["spec"], d["metadata"]["name"]
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 0, name
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), f"{name}: the selector must match the pod labels"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert NAME.match(c["name"]), name
            assert isinstance(c["image"], str) and ":" in c["image"] and not c["image"].endswith(":latest"), name
            assert isinstance(c["command"], list) and all(isinstance(a, str) for a in c["command"]), name
            for env in c.get("env", []):
                assert re.match(r"^[A-Z_][A-Z0-9_]*$", env["name"]), (name, env)
                assert ("value" in env) != ("valueFrom" in env), (name, env)
                if "value" in env:
                    assert isinstance(env["value"], str), (name, env)  # numbers must be quoted
                else:
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] and ref["key"], (name, env)
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes and m["mountPath"].startswith("/"), (name, m)
            for p in c.get("ports", []):
                assert 0 < p["containerPort"] < 65536 and NAME.match(p["name"]), (name, p)


def test_every_role_is_deployed_and_every_specialty_has_an_agent_deployment():
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    assert {"ccc-coordinator", "ccc-api"} <= deployments.keys()
    for sp in SPECIALTIES:
        d = deployments[f"ccc-agent-{sp}"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        cmd = c["command"]
        assert cmd[:2] == ["ccc", "agent"] and cmd[cmd.index("--specialty") + 1] == sp
    agent_deployments = [n for n in deployments if n.startswith("ccc-agent-")]
    assert sorted(agent_deployments) == sorted(f"ccc-agent-{sp}" for sp in SPECIALTIES)


def test_the_api_service_selects_the_api_pods_and_targets_a_declared_port():
    (service,) = of_kind("Service")
    api = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "ccc-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for c in api["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in ports or p["targetPort"] in ports.values()
    (c,) = api["spec"]["template"]["spec"]["containers"]
    # bound beyond localhost the API requires a token: the Deployment must give it one
    assert "CCC_API_TOKEN" in {e["name"] for e in c["env"]}
    assert str(ports["http"]) == c["command"][c["command"].index("--port") + 1]


def test_each_agent_deployment_has_a_keda_scaled_object_on_the_nats_jetstream_scaler():
    deployments = {d["metadata"]["name"] for d in of_kind("Deployment")}
    targets = []
    for so in of_kind("ScaledObject"):
        spec, name = so["spec"], so["metadata"]["name"]
        ref = spec["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in deployments, name
        targets.append(ref["name"])
        lo, hi = spec.get("minReplicaCount", 0), spec["maxReplicaCount"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1, name
        for key in ("pollingInterval", "cooldownPeriod"):
            assert isinstance(spec.get(key, 30), int) and spec.get(key, 30) > 0, name
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "nats-jetstream", name
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), f"{name}: KEDA metadata values are strings"
        for key in REQUIRED_TRIGGER:
            assert meta.get(key), f"{name}: trigger metadata {key} missing"
        assert re.match(r"^[a-z0-9.-]+:\d+$", meta["natsServerMonitoringEndpoint"]), name
        assert int(meta["lagThreshold"]) >= 1, name
        assert int(meta.get("activationLagThreshold", "0")) >= 0
        assert meta.get("useHttps", "false") in ("true", "false")
    assert sorted(targets) == sorted(f"ccc-agent-{sp}" for sp in SPECIALTIES)


def cluster_namespace() -> Namespace:
    """The namespace the coordinator runs (and so provisions) the cluster in."""
    coordinator = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "ccc-coordinator")
    (c,) = coordinator["spec"]["template"]["spec"]["containers"]
    return Namespace(next(e["value"] for e in c["env"] if e["name"] == "CCC_NAMESPACE"))


def test_each_scaled_object_reads_the_demand_consumer_provisioning_makes_for_its_specialty():
    """KEDA's nats-jetstream scaler looks the stream and the consumer up by name in
    /jsz?acc=<account>&consumers=true&config=true and reports num_pending + num_ack_pending;
    a consumer it does not find silently becomes the stream's last sequence. So the names
    must be exactly what provisioning creates (actors.demand keeps the stream)."""
    ns = cluster_namespace()
    (demand_stream,) = [c for c in stream_configs(ns) if c.name == ns.demand_stream]
    consumers = {c.durable_name: c for c in demand_consumer_configs(ns)}
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    agent_options = {p.name: p for p in cli.commands["agent"].params}
    for so in of_kind("ScaledObject"):
        name, meta = so["metadata"]["name"], so["spec"]["triggers"][0]["metadata"]
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        (c,) = target["spec"]["template"]["spec"]["containers"]
        sp = c["command"][c["command"].index("--specialty") + 1]
        assert meta["stream"] == demand_stream.name, name
        assert meta["consumer"] == demand_consumer(sp) and meta["consumer"] in consumers, name
        consumer = consumers[meta["consumer"]]
        assert consumer.filter_subject == ns.demand_filter(sp), name
        assert any(consumer.filter_subject.startswith(s.removesuffix(">")) for s in demand_stream.subjects), name
        assert meta["account"] == "$G", name  # the cluster's users are in the global account
        # replicas = ceil(pending / lagThreshold): one agent per `--capacity` tasks of it
        env_ns = next(e["value"] for e in c["env"] if e["name"] == "CCC_NAMESPACE")
        assert env_ns == ns.prefix, name
        capacity = int(c["command"][c["command"].index("--capacity") + 1]) if "--capacity" in c["command"] \
            else agent_options["capacity"].default
        assert int(meta["lagThreshold"]) == capacity, name


def test_an_agent_pod_outlives_its_own_shutdown_grace():
    """SIGTERM on scale-down: the agent drains and hands back within --shutdown-grace;
    Kubernetes must not SIGKILL it before (terminationGracePeriodSeconds, default 30)."""
    for d in of_kind("Deployment"):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if "--shutdown-grace" in c["command"]:
                grace = float(c["command"][c["command"].index("--shutdown-grace") + 1])
                assert pod.get("terminationGracePeriodSeconds", 30) >= grace + 15, d["metadata"]["name"]


def test_the_readme_names_the_official_nats_helm_chart():
    text = (K8S / "README.md").read_text()
    assert "nats-io.github.io/k8s/helm/charts" in text and "nats/nats" in text
    assert "config.jetstream.enabled=true" in text


# -- the commands are real ccc commands ----------------------------------------------------
def _split(argv: list[str]) -> list[str]:
    """The arguments after the ``ccc`` executable (``tini -- ccc ...`` included)."""
    assert "ccc" in argv, argv
    return argv[argv.index("ccc") + 1:]


def dockerfile_exec(instruction: str) -> list[str]:
    lines = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith(instruction + " ")]
    assert len(lines) == 1, f"one {instruction} in the Dockerfile"
    value = json.loads(lines[0][len(instruction) + 1:])  # exec form: a JSON array
    assert isinstance(value, list) and all(isinstance(a, str) for a in value)
    return value


def parse_cli(args: list[str]) -> None:
    """Parse ``ccc <args>`` as click would run it, without running it: the group's options,
    then the subcommand's (choices, ranges, required options, unknown options)."""
    try:
        ctx = cli.make_context("ccc", list(args), resilient_parsing=False)
    except click.exceptions.Exit as e:  # `ccc --help` / `--version`: valid, and done
        assert e.exit_code == 0
        return
    sub_args = _rest(ctx)
    if not sub_args:
        return
    name, cmd, rest = cli.resolve_command(ctx, sub_args)
    assert cmd is not None, f"no ccc subcommand {sub_args[0]!r}"
    with ctx:
        sub = cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)
        if isinstance(cmd, click.Group) and _rest(sub):
            cmd.resolve_command(sub, _rest(sub))


def _rest(ctx: click.Context) -> list[str]:
    """A group's unparsed tokens: the subcommand and its arguments (click 8.2 deprecates
    ``protected_args``, click 9 puts everything in ``args``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [*getattr(ctx, "protected_args", ()), *ctx.args]


def commands() -> list[tuple[str, list[str]]]:
    out = [(f"{name}/{c['name']}", _split(c["command"])) for name, c in containers()]
    entry, default = dockerfile_exec("ENTRYPOINT"), dockerfile_exec("CMD")
    out.append(("Dockerfile ENTRYPOINT+CMD", _split(entry + default)))
    return out


@pytest.mark.parametrize("where,args", commands(), ids=[w for w, _ in commands()])
def test_every_command_is_a_real_ccc_subcommand_with_valid_options(where, args):
    parse_cli(args)  # raises click's UsageError / BadParameter / NoSuchOption with the reason
    sub = [a for a in args if not a.startswith("-")][:1]
    result = CliRunner().invoke(cli, [*sub, "--help"])
    assert result.exit_code == 0, (where, result.output)
    assert "Usage: ccc" in result.output


def test_the_check_itself_refuses_bad_commands():
    with pytest.raises(click.UsageError):
        parse_cli(["agent", "--specialty", "backend", "--no-such-flag"])
    with pytest.raises(click.BadParameter):
        parse_cli(["agent", "--specialty", "backend", "--coder", "gpt"])
    with pytest.raises(click.UsageError):
        parse_cli(["agent"])  # --specialty is required
    with pytest.raises(click.UsageError, match="No such command 'coordinate'"):
        parse_cli(["coordinate"])


def test_the_image_builds_from_the_package_with_what_agents_need():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    assert re.search(r"pip (wheel|install)[^\n]* \.$", text, re.MULTILINE), "builds from the package in the checkout"
    for tool in ("bubblewrap", "git", "ripgrep"):
        assert re.search(rf"apt-get install[^\n]*\b{tool}\b", text), tool
    assert dockerfile_exec("ENTRYPOINT")[-1] == "ccc"
    assert re.search(r"^USER \d+", text, re.MULTILINE), "runs unprivileged"
    # everything the wheel needs is copied into the build stage
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE))
    sources = {part for line in copied for part in line.split()}
    for package in ("events", "projections", "actors", "infra", "pyproject.toml", "nats-server.conf"):
        assert package in sources, package
