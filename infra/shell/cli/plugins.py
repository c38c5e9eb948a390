"""``ccc plugins``: what is installed (the ``ccc.*`` entry points, each imported to see
that it loads), what this configuration enables, and — from the bus — how the running
processes' plugins fare (:mod:`infra.adapters.plugins.health`) and which queued tasks a
plugin holds back."""

from __future__ import annotations

from datetime import UTC, datetime

import click
import msgspec

from events.errors import CccError
from infra.adapters.plugins import discovery
from infra.adapters.plugins.health import ProcessHealth, read_health
from infra.shell.cli.output import emit_json, print_table

CHOSEN_BY = {"ccc.coders": "--coder", "ccc.forges": "--forge", "ccc.analysers": "--analyser"}


def _loads(entry: discovery.Installed) -> str:
    ep = discovery.find(entry.group, entry.name)
    if ep is None:
        return "gone"
    try:
        discovery.load(ep)
    except CccError as e:
        return f"broken: {str(e).split('): ', 1)[-1]}"
    return "ok"


def _enabled(entry: discovery.Installed, enabled: tuple[str, ...]) -> str:
    if entry.group == discovery.GROUPS["hook"]:
        return "yes" if entry.name in enabled else "no"
    return f"with {CHOSEN_BY[entry.group]} {entry.name}"


def _age(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    seconds = max(0, int((now - at).total_seconds()))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def _health_rows(records: list[ProcessHealth], now: datetime) -> list[tuple]:
    rows = []
    for r in records:
        for p in r.plugins:
            c = p.counts
            state = p.state + (f" ({p.open_for:.0f}s)" if p.state == "open" and p.open_for else "")
            rows.append((r.process, _age(r.updated_at, now), p.name, state, ",".join(p.hooks), c.calls, c.ok,
                         c.error + c.invalid, c.timeout, c.busy + c.open, c.dropped, p.error[:160]))
        if not r.plugins:
            rows.append((r.process, _age(r.updated_at, now), "(none enabled)", *[""] * 9))
    return rows


@click.command("plugins")
@click.option("--installed", "installed_only", is_flag=True,
              help="Only what is installed here (no health: does not talk to the cluster).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def plugins_cmd(obj, installed_only: bool, as_json: bool) -> None:
    """The plugins: installed here (entry point groups ccc.coders, ccc.forges,
    ccc.analysers, ccc.hooks; LOADS says whether each imports), enabled (hook plugins:
    CCC_PLUGINS / --plugin; the others when --coder/--forge/--analyser names them), and
    the health each running process reports for its own (calls by outcome, the circuit,
    the last error), with the queued tasks a plugin holds back.

    \b
    Columns of the health table: CALLS all calls; OK answered; ERRORS raised or returned
    a bad value; TIMEOUTS no answer in time; SKIPPED circuit open or too many calls
    pending; DROPPED events a full queue could not take."""
    settings = obj.settings()
    entries = discovery.installed()
    installed_rows = [(e.group, e.name, e.distribution, e.version, _enabled(e, settings.plugins), _loads(e))
                      for e in entries]
    not_installed = [n for n in settings.plugins if n not in {e.name for e in entries
                                                              if e.group == discovery.GROUPS["hook"]}]
    records: list[ProcessHealth] = []
    if not installed_only:
        async def go(nc):
            return await read_health(nc, obj.ns, timeout=settings.request_timeout)

        records = obj.run(go)
    now = datetime.now(UTC)
    holds = [(h.task_id, h.plugin, h.kind, h.words, r.process)
             for r in records for h in r.holds if h.until > now]
    if as_json:
        for row in installed_rows:
            emit_json(dict(zip(("group", "name", "distribution", "version", "enabled", "loads"), row)))
        for name in not_installed:
            emit_json({"group": discovery.GROUPS["hook"], "name": name, "enabled": "yes",
                       "loads": "not installed"})
        for r in records:
            emit_json({"process": msgspec.to_builtins(r)})
        return
    missing = [(discovery.GROUPS["hook"], n, "", "", "yes", "not installed") for n in not_installed]
    enabled = ",".join(settings.plugins) or "(none)"
    print_table(("GROUP", "NAME", "DISTRIBUTION", "VERSION", "ENABLED", "LOADS"), installed_rows + missing,
                title=f"Installed (enabled here: CCC_PLUGINS={enabled})",
                footer=[] if entries else ["no plugin installed (entry point groups: "
                                           + ", ".join(discovery.GROUPS.values()) + ")"])
    if installed_only:
        return
    click.echo()
    if not records:
        click.echo("Health: no running process reports plugins (its entry in the "
                   f"{obj.ns.prefix}_plugins bucket is rewritten every few seconds while it runs).")
        return
    print_table(("PROCESS", "UPDATED", "PLUGIN", "STATE", "HOOKS", "CALLS", "OK", "ERRORS", "TIMEOUTS",
                 "SKIPPED", "DROPPED", "LAST ERROR"), _health_rows(records, now),
                title="Health (from the running processes)")
    if holds:
        click.echo()
        print_table(("TASK", "PLUGIN", "KIND", "WAITING", "DECIDED BY"), holds,
                    title="Queued tasks held back by a plugin")
