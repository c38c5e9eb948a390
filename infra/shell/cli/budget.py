"""``ccc budget``: the spend ledger (:mod:`events.spend`) — spend and headroom per scope —
and ``ccc budget set`` to change the caps while the cluster runs (every agent and the
scheduler see a change at once: they follow the ``budget`` key of ``<ns>_config``)."""

from __future__ import annotations

import time

import click

from events.spend import Book, Caps, Row, dollars, next_reset, parse_caps, period_of
from infra.shell.cli.output import emit_json, print_table


def budget_flags(fn):
    """The caps as flags (``ccc up`` and ``ccc budget set``)."""
    fn = click.option("--budget-author", "budget_author", multiple=True, metavar="USD|LOGIN=USD",
                      help="Cap per issue author per UTC day (repeat; LOGIN=USD for one; 'off' removes).")(fn)
    fn = click.option("--budget-repo", "budget_repo", multiple=True, metavar="USD|OWNER/NAME=USD",
                      help="Cap per repository per UTC day (repeat; OWNER/NAME=USD for one; 'off' removes).")(fn)
    fn = click.option("--budget-day", "budget_day", metavar="USD|off",
                      help="Cap on the whole cluster's model spend per UTC day.")(fn)
    fn = click.option("--budget-task", "budget_task", metavar="USD|off",
                      help="Cap per task over its life (all attempts and rounds).")(fn)
    return fn


def caps_from_flags(base: Caps | None, budget_task, budget_day, budget_repo, budget_author) -> Caps | None:
    """The caps with the flags applied on ``base``; None when no flag was given."""
    if budget_task is None and budget_day is None and not budget_repo and not budget_author:
        return None
    try:
        return parse_caps(task=budget_task, day=budget_day, repo=budget_repo, author=budget_author, base=base)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _cell(micro: int | None) -> str:
    return "-" if micro is None else dollars(micro)


def _row_json(r: Row) -> dict:
    return {"scope": r.scope, "kind": r.kind, "period": r.period or None,
            "cap": None if r.cap is None else r.cap / 1e6, "spent": r.spent / 1e6,
            "reserved": r.reserved / 1e6, "headroom": None if r.headroom is None else r.headroom / 1e6,
            "calls": r.calls, "exhausted": r.exhausted}


def show_book(book: Book, *, as_json: bool, tasks: bool, now: float | None = None) -> None:
    now = time.time() if now is None else now
    rows = [r for r in book.rows(now) if tasks or r.kind != "task" or r.cap is not None and r.exhausted]
    if as_json:
        for r in rows:
            emit_json(_row_json(r))
        return
    table = [(r.scope, _cell(r.cap), dollars(r.spent), dollars(r.reserved), _cell(r.headroom), r.calls,
              "EXHAUSTED" if r.exhausted else "ok") for r in rows]
    c = book.caps
    caps = ", ".join(f"{k} {dollars(int(v * 1e6))}" for k, v in
                     (("task", c.task), ("repo", c.repo), ("author", c.author), ("day", c.day)) if v is not None)
    footer = [f"day {period_of(now)} (UTC); daily scopes reset at {next_reset(now).strftime('%Y-%m-%d %H:%M UTC')}",
              f"caps: {caps or 'none'}"
              + (f"; per repository: {', '.join(f'{k} {v:g}' for k, v in sorted(c.repos.items()))}" if c.repos else "")
              + (f"; per author: {', '.join(f'{k} {v:g}' for k, v in sorted(c.authors.items()))}" if c.authors else "")]
    if not tasks:
        hidden = sum(1 for r in book.rows(now) if r.kind == "task") - sum(1 for r in rows if r.kind == "task")
        if hidden:
            footer.append(f"{hidden} task scopes not shown (--tasks shows them)")
    print_table(("SCOPE", "CAP", "SPENT", "RESERVED", "HEADROOM", "CALLS", "STATE"), table, footer=footer)


@click.group("budget", invoke_without_command=True)
@click.option("--tasks", is_flag=True, help="Also every task's scope (by default only exhausted ones).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scope (dollars as numbers).")
@click.pass_context
def budget_group(ctx, tasks, as_json) -> None:
    """Spend and headroom per scope: the day, each repository and author (today, UTC) and
    each task; `ccc budget set` changes the caps.

    Every model call reserves its maximum cost in each scope before it starts and settles
    the real cost after; a scope whose cap is spent refuses new calls everywhere (running
    tasks stop at their next call with a draft pull request; queued ones wait
    `budget:<scope>`) until the day resets or the cap is raised."""
    if ctx.invoked_subcommand is not None:
        return
    from infra.adapters.nats.spend_ledger import read_book

    async def go(nc):
        return await read_book(nc, ctx.obj.ns)

    book = ctx.obj.run(go)
    assert isinstance(book, Book)
    show_book(book, as_json=as_json, tasks=tasks)


@budget_group.command("set")
@budget_flags
@click.option("--clear", is_flag=True, help="Remove every cap first (then apply the flags given).")
@click.pass_obj
def budget_set_cmd(obj, budget_task, budget_day, budget_repo, budget_author, clear) -> None:
    """Change the caps (dollars; 'off' removes one). Takes effect at once: queued tasks of
    a scope that has room again are assigned, and agents reserve against the new caps.

    \b
      ccc budget set --budget-day 200 --budget-repo 50 --budget-repo acme/app=80
      ccc budget set --budget-author alice=off"""
    if not clear and caps_from_flags(Caps(), budget_task, budget_day, budget_repo, budget_author) is None:
        raise click.UsageError("nothing to set: give a --budget-* flag (or --clear)")
    from infra.adapters.nats.cluster_config import BUDGET, update_setting

    def change(current: Caps | None) -> Caps:
        base = Caps() if clear or current is None else current
        return caps_from_flags(base, budget_task, budget_day, budget_repo, budget_author) or base

    async def go(nc):
        return await update_setting(nc, obj.ns, BUDGET, Caps, change)

    caps = obj.run(go)
    assert isinstance(caps, Caps)
    click.echo("caps: " + (", ".join(f"{k}={v}" for k, v in
                                     (("task", caps.task), ("repo", caps.repo), ("author", caps.author),
                                      ("day", caps.day), ("repos", caps.repos), ("authors", caps.authors))
                                     if v not in (None, {})) or "none"))
