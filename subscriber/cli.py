"""`oneha subscribe` and `oneha reconcile`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from oneha.settings import ConfigError, Settings, load_settings


def settings_or_exit(config: Path | None) -> Settings:
    """Validated settings; any problem (file, values, oned credentials) -> message on stderr, exit 2."""
    try:
        settings = load_settings(config)
        _ = settings.oned_session  # fail at start, not at the first oned call
    except ConfigError as exc:
        click.echo(f"oneha: {exc}", err=True)
        sys.exit(2)
    return settings


config_option = click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="ONEHA_CONFIG",
                             help="TOML configuration file (default: $ONEHA_CONFIG).")


@click.command()
@config_option
def subscribe(config: Path | None) -> None:
    """Run the subscriber: ZeroMQ events, the hook bridge stream, the dispatcher and the reconciler."""
    settings = settings_or_exit(config)
    from subscriber.logs import configure
    from subscriber.service import Service

    configure()
    Service(settings).run_until_signalled()


@click.command()
@config_option
def reconcile(config: Path | None) -> None:
    """Run only the reconciler and the dispatcher (e.g. as a separate systemd unit)."""
    settings = settings_or_exit(config)
    from subscriber.logs import configure
    from subscriber.service import Service

    configure()
    Service(settings, components=("dispatcher", "reconciler")).run_until_signalled()
