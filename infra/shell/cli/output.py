"""How ``ccc`` prints: tables, JSON lines, styled lines and times.

Output has two forms. Human: a rich table on a terminal, plain aligned text otherwise
(stable columns, no colour codes, safe to grep). ``--json``: exactly one JSON object
per line (msgspec encoding of the events and states themselves).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import click
import msgspec

_json = msgspec.json.Encoder()


def is_terminal() -> bool:
    return sys.stdout.isatty()


def console(stderr: bool = False):
    from rich.console import Console  # rich is only imported when a terminal needs it

    return Console(stderr=stderr, highlight=False)


def emit_json(obj: object) -> None:
    click.echo(_json.encode(obj).decode())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
                title: str | None = None, footer: Sequence[str] = ()) -> None:
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    if is_terminal():
        from rich.table import Table

        table = Table(*headers, title=title, title_justify="left", header_style="bold")
        for row in cells:
            table.add_row(*row)
        con = console()
        con.print(table)
        for line in footer:
            con.print(line, markup=False)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        click.echo(title)
    for row in [list(headers), *cells]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for line in footer:
        click.echo(line)


def print_line(text: str, style: str | None = None) -> None:
    if style and is_terminal():
        console().print(text, style=style, markup=False, soft_wrap=True)
    else:
        click.echo(text)


def fmt_time(at: datetime | None) -> str:
    if at is None:
        return "-"
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
