"""What every `oneha` command shares: the --config option and loading settings or exiting with code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from oneha.settings import ConfigError, Settings, load_settings

config_option = click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="ONEHA_CONFIG",
                             help="TOML configuration file (default: $ONEHA_CONFIG).")


def settings_or_exit(config: Path | str | None, need_oned: bool = False) -> Settings:
    """Validated settings; any problem (file, values, oned credentials if needed) -> message on stderr, exit 2.

    With `need_oned` (the long-running services) oned is asked once: credentials it refuses are a permanent error
    too, while an oned that cannot be reached is only a warning (the services retry on their own)."""
    try:
        settings = load_settings(config)
        if need_oned:
            from oneha.preflight import check_oned_at_start

            _ = settings.oned_session  # fail at start, not at the first oned call
            warning = check_oned_at_start(settings)
            if warning:
                click.echo(f"oneha: warning: {warning}", err=True)
    except ConfigError as exc:
        click.echo(f"oneha: {exc}", err=True)
        sys.exit(2)
    return settings
