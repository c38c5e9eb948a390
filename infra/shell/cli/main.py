"""``ccc``: the command line of claude-code-cluster. The group, its global options and
``main``; the commands live in one module per group (:mod:`.server`, :mod:`.issue`,
:mod:`.read`, :mod:`.forge`, :mod:`.cluster`, :mod:`.bench`, :mod:`.chaos`) and share
:mod:`.context` and :mod:`.output`.

The global options override settings whose environment variables are read in one
place, :mod:`infra.adapters.nats.settings` (the help names each variable).

Errors the project raises on purpose (:class:`CccError`) are printed as one line,
``error: <message>``, on stderr: exit 2 for bad settings or input, 1 for everything
else. Click's own usage errors keep click's format and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import sys

import click

from events.errors import CccError, ConfigError

from infra.adapters.obs.masking import mask
from infra.adapters.nats.settings import (
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_NAMESPACE,
    LOG_FORMATS,
    LOG_LEVELS,
    load_log_settings,
)
from infra.shell.cli.bench import bench_group, soak_cmd
from infra.shell.cli.chaos import chaos_cmd
from infra.shell.cli.cluster import CLUSTER_COMMANDS
from infra.shell.cli.context import INSECURE_WARNING, CliState
from infra.shell.cli.forge import FORGE_COMMANDS
from infra.shell.cli.issue import issue_group
from infra.shell.cli.budget import budget_group
from infra.shell.cli.plugins import plugins_cmd
from infra.shell.cli.read import READ_COMMANDS
from infra.shell.cli.schema import schema_cmd
from infra.shell.cli.secure import secure_group
from infra.shell.cli.server import server_cmd


class CccGroup(click.Group):
    """Turns the project's errors into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own (Exit and Abort are RuntimeErrors)
        except CccError as e:
            # the last line of defence for credentials (a NATS URL with a password, a
            # token in a server's answer): every error line goes through the masker
            click.echo(f"error: {mask(str(e))}", err=True)
            ctx.exit(2 if isinstance(e, ConfigError) else 1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `ccc events | head`: the reader left; not an error
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - nothing more to say
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            ctx.exit(0)
        except Exception as e:  # noqa: BLE001 - a bug or an unwrapped library error
            if isinstance(ctx.obj, CliState) and ctx.obj.log_level == "debug":
                raise
            click.echo(f"error: unexpected {type(e).__name__}: {mask(str(e))} (--log-level debug shows the "
                       "traceback)", err=True)
            ctx.exit(1)


class SettingOption(click.Option):
    """An option that overrides a setting: no default of its own (``None`` leaves it to
    the environment variable, then the setting's default), but its help shows that
    default as any option's would."""

    def __init__(self, *args, setting_default: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.setting_default = setting_default

    def get_help_extra(self, ctx: click.Context):
        return {**super().get_help_extra(ctx), "default": self.setting_default}


@click.group(cls=CccGroup, name="ccc", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats-url", metavar="URL",
              help="NATS server(s), comma-separated [env NATS_URL]. "
                   "Default: the embedded server of the data dir.")
@click.option("--data-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="State dir of the embedded server [env CCC_DATA_DIR].")
@click.option("--namespace", cls=SettingOption, setting_default=DEFAULT_NAMESPACE, metavar="NAME",
              help="Subject prefix / stream names: several clusters can share one NATS [env CCC_NAMESPACE].")
@click.option("--repos", cls=SettingOption, setting_default="all", metavar="OWNER/NAME,...",
              help="Repositories the cluster serves, 'owner/name' or 'owner/*', comma-separated; issue "
                   "facts about others are refused at intake and by the webhook [env CCC_REPOS].")
@click.option("--creds", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Connect with this credentials kit (user nkey, client certificate, CA; `ccc secure "
                   "add-agent` writes one) [env CCC_CREDS]. Default: the data dir's, for its secure server.")
@click.option("--insecure", is_flag=True, default=None,
              help="No TLS and no authentication for the embedded server: anyone who reaches its port "
                   "may read and write everything [env CCC_INSECURE=1].")
@click.option("--log-level", cls=SettingOption, setting_default=DEFAULT_LOG_LEVEL,
              type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="Log level (logs go to stderr) [env CCC_LOG_LEVEL].")
@click.option("--log-format", cls=SettingOption, setting_default=DEFAULT_LOG_FORMAT,
              type=click.Choice(LOG_FORMATS),
              help="auto: JSON lines unless stderr is a terminal [env CCC_LOG_FORMAT].")
@click.version_option(package_name="claude-code-cluster", prog_name="ccc")
@click.pass_context
def cli(ctx: click.Context, nats_url, data_dir, namespace, repos, creds, insecure, log_level, log_format) -> None:
    """claude-code-cluster: coding agents coordinated through an event log on NATS
    JetStream."""
    from infra.adapters.obs.logs import configure_logging
    from infra.adapters.obs.tracing import setup_tracing

    logs = load_log_settings(level=log_level, format=log_format)
    configure_logging(logs.level, json={"auto": None, "json": True, "console": False}[logs.format])
    # spans are always created (so context flows through NATS headers); exported only
    # when OTEL_* says where (OTLP endpoint, or console)
    setup_tracing(f"ccc-{ctx.invoked_subcommand or 'cli'}")
    ctx.obj = CliState(nats_url=nats_url, data_dir=data_dir, namespace=namespace, log_level=logs.level,
                       repos=repos, creds=creds, insecure=insecure)
    with contextlib.suppress(ConfigError):  # a bad setting is reported by the command itself
        if ctx.obj.settings().insecure:
            click.echo(INSECURE_WARNING, err=True)


for _command in (*READ_COMMANDS, *CLUSTER_COMMANDS, *FORGE_COMMANDS, budget_group, server_cmd, issue_group, bench_group, secure_group,
                 chaos_cmd, schema_cmd, plugins_cmd, soak_cmd):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ccc")


if __name__ == "__main__":
    main()
