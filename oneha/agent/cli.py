"""`oneha agent`: needs neither oned nor Redis (it reads only the `[agent]` section)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from oneha.clikit import config_option, settings_or_exit


@click.command()
@config_option
@click.option("--check", is_flag=True, help="Run the start-up check (settings, timing rule, detector.json) and exit.")
def agent(config: Path | None, check: bool) -> None:
    """The host-side agent: storage heartbeat and watchdog (docs/agent.md). Runs as root on each hypervisor."""
    from oneha.agent.service import StartRefused, check_start, serve  # lazy: `oneha` starts fast

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="oneha-agent: %(levelname)s %(message)s")
    settings = settings_or_exit(config).agent
    if check:
        try:
            _, _, rule = check_start(settings)
        except StartRefused as exc:
            click.echo(f"oneha agent: refusing to start: {exc}", err=True)
            sys.exit(2)
        click.echo(f"oneha agent: configuration ok; {rule}")
        return
    sys.exit(serve(settings))
