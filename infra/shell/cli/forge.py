"""``ccc`` commands that act on tasks and the local forge: ``tasks cancel``,
``pr merge|close|approve``, ``repo import|list``, ``dead-letters``. Each publishes a fact (as a
forge webhook would) or reads the log; none writes task events itself."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone

import click
import structlog

from events.codec import encode
from events.errors import ConfigError
from events.issue import (
    IssueCancelRequested,
    IssuePullRequestApproved,
    IssuePullRequestClosed,
)
from events.subjects import check_id
from events.task_state import PR_OPEN
from events.trust import OPERATOR
from projections.read_model import ReadModel

from infra.shell.cli.read import emit_json, print_table, tasks_cmd
from infra.adapters.forge.errors import ForgeError
from infra.adapters.forge.local import LocalForge, merged_fact

log = structlog.get_logger("ccc.cli")


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- ccc tasks cancel / ccc pr merge|close ---------------------------------------------
async def _task_of(obj, nc, task_id: str):
    model = ReadModel(obj.ns.prefix)
    await obj.store(nc).replay(model.apply, filter_subject=obj.ns.task_filter(check_id(task_id, "task id")))
    task = model.tasks.get(task_id)
    if task is None:
        raise ConfigError(f"no task {task_id}")
    return task


async def _publish(nc, ns, event) -> int:
    ack = await nc.jetstream().publish(ns.subject(event.rel_subject), encode(event),
                                       headers={"Nats-Msg-Id": event.event_id})
    return ack.seq


@tasks_cmd.command("cancel")
@click.argument("task_id")
@click.option("--reason", default="cancelled by user", show_default=True)
@click.pass_obj
def tasks_cancel(obj, task_id, reason) -> None:
    """Cancel a task; an agent working on it stops first."""
    async def go(nc) -> None:
        task = await _task_of(obj, nc, task_id)
        if task.final:
            raise ConfigError(f"task {task_id} is already {task.status}")
        seq = await _publish(nc, obj.ns, IssueCancelRequested(
            event_id=f"cli:{task_id}:cancel:{uuid.uuid4().hex}", source=task.issue.source,
            repo=task.issue.repo, number=task.issue.number, occurred_at=_now(), reason=reason,
            actor="cli", author="cli", author_association=OPERATOR))  # the operator: trusted by role
        click.echo(f"cancellation of {task_id} requested (seq {seq})")

    obj.run(go)


@click.group("pr")
def pr_group() -> None:
    """Pull requests on the local forge: approve, merge or close (reject)."""


def _open_pr(task, task_id: str) -> None:
    if task.status not in PR_OPEN or not task.branch:
        raise ConfigError(f"task {task_id} has no open pull request (it is {task.status})")


@pr_group.command("merge")
@click.argument("task_id")
@click.pass_obj
def pr_merge(obj, task_id) -> None:
    """Merge the task's branch into the default branch; the task completes."""
    async def go(nc) -> None:
        task = await _task_of(obj, nc, task_id)
        _open_pr(task, task_id)
        forge = LocalForge(obj.settings().data_dir / "forge")
        sha = await asyncio.to_thread(forge.merge, task.issue.repo, task.branch,
                                      message=f"Merge {task.branch}: {task.issue.title}")
        seq = await _publish(nc, obj.ns, merged_fact(task, _now()))
        click.echo(f"merged {task.branch} into {task.issue.repo} ({sha[:12]}); seq {seq}")

    obj.run(go)


@pr_group.command("close")
@click.argument("task_id")
@click.option("--reason", default="pull request closed without merging", show_default=True)
@click.pass_obj
def pr_close(obj, task_id, reason) -> None:
    """Reject the pull request: the task fails and the retry policy applies."""
    async def go(nc) -> None:
        task = await _task_of(obj, nc, task_id)
        _open_pr(task, task_id)
        seq = await _publish(nc, obj.ns, IssuePullRequestClosed(
            event_id=f"local:{task.issue.repo}#{task.issue.number}:closed:{task.attempt}",
            source=task.issue.source, repo=task.issue.repo, number=task.issue.number,
            occurred_at=_now(), pr_number=task.pr_number, branch=task.branch, reason=reason))
        click.echo(f"closed the pull request of {task_id}; seq {seq}")

    obj.run(go)


@pr_group.command("approve")
@click.argument("task_id")
@click.pass_obj
def pr_approve(obj, task_id) -> None:
    """Approve the task's pull request (as a reviewer would): with the merge queue on for
    its repository, a green pull request enters the queue."""
    async def go(nc) -> None:
        task = await _task_of(obj, nc, task_id)
        _open_pr(task, task_id)
        seq = await _publish(nc, obj.ns, IssuePullRequestApproved(
            event_id=f"cli:{task_id}:approve:{uuid.uuid4().hex}", source=task.issue.source,
            repo=task.issue.repo, number=task.issue.number, occurred_at=_now(), pr_number=task.pr_number,
            branch=task.branch, actor="cli", author="cli", author_association=OPERATOR))
        click.echo(f"approved the pull request of {task_id}; seq {seq}")

    obj.run(go)


# -- ccc dead-letters ------------------------------------------------------------------------
@click.command("dead-letters")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def dead_letters_cmd(obj, as_json) -> None:
    """Messages actors could not process, parked with the reason and original sequence."""
    from events.dead_letter import dead_letter_decoder

    async def go(nc) -> None:
        js = nc.jetstream()
        info = await js.stream_info(obj.ns.dlq_stream)
        letters = []
        for seq in range(info.state.first_seq or 1, info.state.last_seq + 1):
            try:
                letters.append(dead_letter_decoder.decode((await js.get_msg(obj.ns.dlq_stream, seq)).data))
            except Exception as e:  # noqa: BLE001 - a damaged letter is still listed
                log.warning("dlq.unreadable", seq=seq, error=str(e))
        if as_json:
            for d in letters:
                emit_json(d)
            return
        print_table(("STREAM", "SEQ", "SUBJECT", "CONSUMER", "REASON", "ERROR"),
                    [(d.stream, d.seq, d.subject, d.consumer, d.reason, d.error[:80]) for d in letters],
                    footer=[f"{len(letters)} dead letters"])

    obj.run(go)


# -- ccc repo -------------------------------------------------------------------------------
@click.group("repo")
def repo_group() -> None:
    """Repositories of the local forge (bare git repos under <data-dir>/forge)."""


@repo_group.command("import")
@click.argument("repo")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.pass_obj
def repo_import(obj, repo, source) -> None:
    """Make SOURCE (a git work tree) the origin of OWNER/NAME in the local forge."""
    forge = LocalForge(obj.settings().data_dir / "forge")
    try:
        path = forge.import_repo(repo, source)
    except ForgeError as e:  # a bad name, a source that is no repository, a repo that exists
        raise ConfigError(str(e)) from None
    click.echo(f"{repo} -> {path}")


@repo_group.command("list")
@click.pass_obj
def repo_list(obj) -> None:
    root = obj.settings().data_dir / "forge"
    rows = [(f"{p.parent.name}/{p.name[:-4]}", str(p)) for p in sorted(root.glob("*/*.git"))]
    print_table(("REPO", "PATH"), rows)


FORGE_COMMANDS = (pr_group, repo_group, dead_letters_cmd)
