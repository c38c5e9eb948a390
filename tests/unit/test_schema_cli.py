"""``ccc schema``: the list, one type's schema, the AsyncAPI document, a clear error for an
unknown type, and ``--write`` (tried on a copy of the committed files: a test never
rewrites the tree it checks). Nothing here needs NATS."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from events.contract import CONTRACT_VERSION, SCHEMAS_DIR, Contract, committed, wire_types
from events.errors import ConfigError
from infra.shell.cli.main import cli
from infra.shell.cli.schema import current_contract, write_contract


def ccc(tmp_path, *args: str):
    return CliRunner().invoke(cli, ["--data-dir", str(tmp_path), *args])


def test_the_list_names_every_type_with_its_subject_and_writers(tmp_path) -> None:
    result = ccc(tmp_path, "schema")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in result.stdout.splitlines()[1:-1]}
    assert set(rows) == {t.name for t in wire_types()}
    assert rows["task.assigned"] == ["ccc.task.{task_id}.assigned.{agent_id}", "CCC_EVENTS", "coordinator"]
    assert rows["issue.opened"][2] == "webhook (source=github), cli (source=local)"
    assert rows["heartbeat"][:2] == ["ccc.hb.{agent_id}", "CCC_HEARTBEATS"]
    assert f"contract v{CONTRACT_VERSION}" in result.stdout.splitlines()[-1]


def test_the_list_follows_the_namespace_and_has_a_json_form(tmp_path) -> None:
    result = ccc(tmp_path, "--namespace", "staging", "schema", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(wire_types())
    assert all(line["subject"].startswith("staging.") for line in lines)
    dlq = next(line for line in lines if line["type"] == "dead_letter")
    assert dlq["stream"] == "STAGING_DLQ" and {"role": "ci", "only": {"consumer": ["forge-ci"]}} in dlq["writers"]


def test_one_type_prints_its_committed_schema(tmp_path) -> None:
    result = ccc(tmp_path, "schema", "task.assigned")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == committed().schemas["task.assigned"]


def test_an_unknown_type_is_one_line_naming_the_near_ones(tmp_path) -> None:
    result = ccc(tmp_path, "schema", "task.asigned")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown event type 'task.asigned': did you mean task.assigned")
    result = ccc(tmp_path, "schema", "checks")
    assert "issue.checks_completed" in result.stderr and "task.checks_failed" in result.stderr
    result = ccc(tmp_path, "schema", "zzz")
    assert result.exit_code == 2 and "`ccc schema` lists them" in result.stderr


def test_asyncapi_prints_the_document(tmp_path) -> None:
    result = ccc(tmp_path, "schema", "--asyncapi")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["asyncapi"] == "3.0.0" and set(doc["channels"]) == {t.name for t in wire_types()}


def test_options_do_not_mix(tmp_path) -> None:
    result = ccc(tmp_path, "schema", "task.assigned", "--write")
    assert result.exit_code == 2 and "give one of TYPE, --asyncapi and --write" in result.output


def test_write_rewrites_what_differs_and_refuses_to_break_the_rules(tmp_path) -> None:
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, root)
    contract = current_contract()
    directory, changed = write_contract(contract, root)
    assert directory == root / f"v{CONTRACT_VERSION}" and changed == []

    (directory / "task.merged.json").unlink()
    (directory / "task.teleported.json").write_text("{}\n")
    (directory / "index.json").write_text("{}\n")
    _, changed = write_contract(contract, root)
    assert sorted(changed) == ["index.json", "task.merged.json", "task.teleported.json"]
    assert (directory / "index.json").read_text() == contract.files()["index.json"]
    assert not (directory / "task.teleported.json").exists()

    index = {**contract.index, "types": [t for t in contract.index["types"] if t["type"] != "task.merged"]}
    shrunk = Contract(index, {k: v for k, v in contract.schemas.items() if k != "task.merged"})
    with pytest.raises(ConfigError, match=r"evolution rules.*nothing written.*task.merged: type removed"):
        write_contract(shrunk, root)
    assert (directory / "task.merged.json").is_file()
