"""`oneha subscribe` and `oneha reconcile`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from oneha.clikit import config_option, settings_or_exit


@click.command()
@config_option
def subscribe(config: Path | None) -> None:
    """Run the subscriber: ZeroMQ events, the hook bridge stream, the dispatcher and the reconciler."""
    settings = settings_or_exit(config, need_oned=True)
    from oneha.subscriber.logs import configure
    from oneha.subscriber.service import Service

    configure()
    sys.exit(Service(settings).run_until_signalled())


@click.command()
@config_option
def reconcile(config: Path | None) -> None:
    """Run only the reconciler and the dispatcher (e.g. as a separate systemd unit)."""
    settings = settings_or_exit(config, need_oned=True)
    from oneha.subscriber.logs import configure
    from oneha.subscriber.service import Service

    configure()
    sys.exit(Service(settings, components=("dispatcher", "reconciler")).run_until_signalled())
