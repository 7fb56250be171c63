"""The `oneha` command. Subcommands are imported only when run, so `oneha bridge` starts fast."""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" of a click command or group. Each lives beside the code it runs.
SUBCOMMANDS = {
    "lab": "oneha.lab.cli:lab",
    "subscribe": "oneha.subscriber.cli:subscribe",
    "reconcile": "oneha.subscriber.cli:reconcile",
    "bridge": "oneha.subscriber.bridge:bridge",
    "worker": "oneha.workers.cli:worker",
    "detect": "oneha.detect.cli:detect",
    "incidents": "oneha.incidents_cli:incidents",
    "config": "oneha.config_cli:config",
    "agent": "oneha.agent.cli:agent",
    "deploy": "oneha.deploy_cli:deploy",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command: Any = getattr(importlib.import_module(module_name), attr)
        return command


@click.group(cls=LazyGroup)
@click.version_option(package_name="oneha")
def main() -> None:
    """oneha: high availability for OpenNebula clouds."""
