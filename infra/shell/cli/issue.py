"""``ccc issue``: issue facts for the local forge, as a webhook would deliver them."""

from __future__ import annotations

import sys

import click

from infra.shell.cli.context import CliState
from infra.shell.cli.output import emit_json


@click.group("issue")
def issue_group() -> None:
    """Issue facts for the local forge.

    What a webhook would deliver for a GitHub repository."""


@issue_group.command("publish")
@click.option("--repo", required=True, metavar="OWNER/NAME", help="Repository: 'owner/name' or 'name'.")
@click.option("--title", required=True, help="Issue title (non-empty).")
@click.option("--body", default="", help="Issue body; '-' reads it from stdin.")
@click.option("--label", "labels", multiple=True, metavar="LABEL", help="A label (repeatable).")
@click.option("--number", type=click.IntRange(min=1), default=None,
              help="Issue number; default: the next free one for the repo. A repeat is a no-op.")
@click.option("--source", default="local", show_default=True, help="Where the issue lives.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def issue_publish(obj: CliState, repo, title, body, labels, number, source, as_json) -> None:
    """Publish an IssueOpened to the intake stream.

    Prints its subject, stream sequence and the id of the task it becomes."""
    from infra.adapters.nats.issue_publisher import new_issue, open_issue

    if body == "-":
        body = sys.stdin.read()
    new_issue(repo=repo, title=title, body=body, labels=labels, number=number or 1, source=source)
    ns = obj.ns
    timeout = obj.settings().request_timeout
    published = obj.run(lambda nc: open_issue(
        nc, ns, repo=repo.strip(), title=title, body=body, labels=labels, number=number,
        source=source, timeout=timeout,
    ))
    e = published.event
    if as_json:
        emit_json({"subject": published.subject, "stream": published.stream, "seq": published.seq,
                   "duplicate": published.duplicate, "source": e.source, "repo": e.repo,
                   "number": e.number, "event_id": e.event_id, "task_id": published.task_id})
        return
    what = f"{e.source}:{e.repo}#{e.number}"
    if published.duplicate:
        click.echo(f"duplicate: {what} was already published; nothing new written")
    else:
        click.echo(f"opened {what}: {e.title}")
    click.echo(f"  subject  {published.subject}")
    click.echo(f"  seq      {published.seq} ({published.stream})")
    click.echo(f"  task id  {published.task_id}")
