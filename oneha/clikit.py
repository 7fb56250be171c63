"""What every `oneha` command shares: the --config option and loading settings or exiting with code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from oneha.settings import ConfigError, Settings, load_settings

config_option = click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="ONEHA_CONFIG",
                             help="TOML configuration file (default: $ONEHA_CONFIG).")


def settings_or_exit(config: Path | str | None, need_oned: bool = False) -> Settings:
    """Validated settings; any problem (file, values, oned credentials if needed) -> message on stderr, exit 2."""
    try:
        settings = load_settings(config)
        if need_oned:
            _ = settings.oned_session  # fail at start, not at the first oned call
    except ConfigError as exc:
        click.echo(f"oneha: {exc}", err=True)
        sys.exit(2)
    return settings
