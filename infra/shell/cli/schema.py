"""``ccc schema``: the event contract (:mod:`events.contract`) — every message type with its
subject and the roles that write it, one type's JSON Schema, the AsyncAPI document, and
(for developers) ``--write``, which regenerates the committed files.

The writer and reader roles are derived here, where the roles' NATS permissions are
known (:mod:`infra.adapters.nats.permissions`): each subject pattern is matched against
each role's publish allow and deny lists. Nothing here connects to NATS.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import click

from events.contract import (
    CONTRACT_VERSION,
    PARAMETERS,
    SAMPLE_AGENT,
    SCHEMAS_DIR,
    Contract,
    asyncapi_document,
    committed,
    committed_versions,
    evolution_problems,
    generate,
    writer_label,
)
from events.errors import ConfigError
from events.subjects import DEFAULT_NS, Namespace
from infra.adapters.nats.permissions import CI_CONSUMER, ROLES, Permissions, permissions_for
from infra.shell.cli.context import CliState
from infra.shell.cli.output import emit_json, print_table

EXTRA_SAMPLES: dict[str, tuple[str, ...]] = {"consumer": (CI_CONSUMER,)}
"""Parameter values the roles' permissions single out (the CI may park dead letters under
its own consumer's name only), so the writers are derived over them too."""


def contract_grants(ns: Namespace = DEFAULT_NS) -> dict[str, Permissions]:
    """Every role's permissions in ``ns`` (the agent's for :data:`~events.contract.SAMPLE_AGENT`)."""
    return {role: permissions_for(role, ns, SAMPLE_AGENT if role == "agent" else None) for role in ROLES}


def current_contract(ns: Namespace = DEFAULT_NS) -> Contract:
    """The contract as the code states it now (what ``--write`` commits, for the default namespace)."""
    return generate(contract_grants(ns), ns=ns, samples=EXTRA_SAMPLES)


def unknown_type(name: str, known: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    near += [k for k in known if name and name.lower() in k.lower() and k not in near][: 5 - len(near)]
    hint = f"did you mean {', '.join(near)}?" if near else "`ccc schema` lists them"
    return ConfigError(f"unknown event type {name!r}: {hint}")


def write_contract(contract: Contract, root: Path = SCHEMAS_DIR) -> tuple[Path, list[str]]:
    """Write ``contract`` as ``root/v<N>/``, after checking the evolution rules against
    every committed version (:class:`ConfigError` listing what breaks them; the files of
    ``contract``'s own version are rewritten even when they no longer load, a released
    version's never). Returns the directory and the files that changed."""
    versions = {}
    for v in committed_versions(root):
        try:
            versions[v] = committed(v, root)
        except ValueError as e:
            if v != contract.version:
                raise ConfigError(f"committed contract v{v} (a baseline) is broken: {e}") from None
    problems = evolution_problems(contract, versions)
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError("the event types break the evolution rules (README, \"Event schemas and "
                          "evolution\"); nothing written: " + "; ".join(problems[:10]) + more)
    directory = root / f"v{contract.version}"
    directory.mkdir(parents=True, exist_ok=True)
    files = contract.files()
    changed = []
    for name, text in files.items():
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    for stale in sorted({p.name for p in directory.glob("*.json")} - set(files)):
        (directory / stale).unlink()
        changed.append(stale)
    return directory, changed


@click.command("schema")
@click.argument("type_name", required=False, metavar="[TYPE]")
@click.option("--asyncapi", "as_asyncapi", is_flag=True, help="Print the AsyncAPI 3.0 document of the subjects.")
@click.option("--write", "write", is_flag=True,
              help=f"Regenerate the committed schemas (events/schemas/v{CONTRACT_VERSION}/), for developers.")
@click.option("--json", "as_json", is_flag=True, help="The list as JSON lines (one per type).")
@click.pass_obj
def schema_cmd(obj: CliState, type_name: str | None, as_asyncapi: bool, write: bool, as_json: bool) -> None:
    """The event contract: every message type with its subject pattern and the roles that
    write it; with TYPE (`task.assigned`, `issue.opened`, `heartbeat`, ...) that type's JSON
    Schema. Subjects are shown in the cluster's namespace (--namespace)."""
    if sum(map(bool, (type_name, as_asyncapi, write))) > 1:
        raise click.UsageError("give one of TYPE, --asyncapi and --write")
    if write:
        directory, changed = write_contract(current_contract())
        click.echo(f"{directory}: {len(changed)} file(s) written" + (f" ({', '.join(changed)})" if changed else
                                                                    ", already up to date"))
        return
    contract = current_contract(obj.ns)
    if as_asyncapi:
        click.echo(json.dumps(asyncapi_document(contract), indent=2, ensure_ascii=False))
        return
    if type_name:
        if type_name not in contract.schemas:
            raise unknown_type(type_name, list(contract.schemas))
        click.echo(json.dumps(contract.schemas[type_name], indent=2, ensure_ascii=False))
        return
    types = contract.index["types"]
    if as_json:
        for t in types:
            emit_json({k: t[k] for k in ("type", "kind", "subject", "stream", "format_version", "writers", "readers")})
        return
    params = ", ".join(f"{{{p}}}" for p in PARAMETERS)
    footer = (f"contract v{contract.version}: {len(types)} types; parameters {params}; "
              f"{', '.join(contract.index['superusers'])} may write anything. "
              "`ccc schema TYPE` prints one's JSON Schema, `ccc schema --asyncapi` the AsyncAPI document.")
    print_table(("TYPE", "SUBJECT", "STREAM", "WRITERS"),
                [(t["type"], t["subject"], t["stream"], ", ".join(map(writer_label, t["writers"])) or "-")
                 for t in types],
                footer=(footer,))
