"""`oneha incidents [list [--all] [--json]] | show ID [--json] | approve ID | pause --reason TEXT | resume`:
what the subscriber and workers did, and the operator's levers on it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from oneha.incidents import Incident, IncidentStore, as_dict


def _store(config: Path | None) -> IncidentStore:

    from oneha import redisconn
    from oneha.clikit import settings_or_exit
    from oneha.keys import Keys

    settings = settings_or_exit(config)
    client = redisconn.connect(settings.redis, socket_timeout=5, socket_connect_timeout=2)
    return IncidentStore(client, Keys(settings.redis.key_prefix), settings.audit.retention_s,
                         settings.audit.max_incidents)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"oneha incidents: {message}", err=True)
    sys.exit(code)


@click.group(invoke_without_command=True)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="ONEHA_CONFIG")
@click.pass_context
def incidents(ctx: click.Context, config: Path | None) -> None:
    """Open and recent incidents (default: list the open ones)."""
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@incidents.command("list")
@click.option("--all", "show_all", is_flag=True, help="Recent closed incidents too.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=50, show_default=True)
@click.pass_obj
def list_cmd(config: Path | None, show_all: bool = False, as_json: bool = False, limit: int = 50) -> None:
    """List incidents, newest first."""
    import redis

    store = _store(config)
    try:
        found = store.recent(limit) if show_all else store.open_incidents()[:limit]
    except redis.RedisError as exc:
        _fail(f"cannot read incidents: {type(exc).__name__}: {exc}")
        return
    if as_json:
        click.echo(json.dumps([as_dict(i) for i in found], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="incidents" if show_all else "open incidents")
    for col in ("id", "kind", "resource", "cluster", "status", "reports", "source", "opened", "due", "detail"):
        table.add_column(col)
    for inc in found:
        table.add_row(str(inc.id), inc.kind.value, str(inc.resource_id), str(inc.cluster_id), inc.status.value,
                      str(inc.reports), inc.source, _when(inc.opened_at), _when(inc.due_at), inc.detail[:60])
    console = Console()
    console.print(table)
    pause = store.paused()
    if pause is not None:
        console.print(f"[bold red]RECOVERY PAUSED[/] since {_when(pause.get('at'))}: {pause.get('reason', '')} "
                      "(`oneha incidents resume` to act again)")
    console.print(_alive(store), highlight=False)


def _alive(store: IncidentStore) -> str:
    """Who is up, from the heartbeats: a silent subscriber or an empty worker pool is worth seeing here."""
    from oneha import heartbeat

    kinds = [name.split(":", 1)[0] for name in heartbeat.alive(store.r, store.keys)]
    return (f"alive (heartbeat within {3 * heartbeat.INTERVAL_S:.0f}s): {kinds.count('subscriber')} subscriber(s), "
            f"{kinds.count('worker')} worker(s)")


@incidents.command()
@click.argument("incident_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(config: Path | None, incident_id: int, as_json: bool) -> None:
    """One incident with its per-VM records and audit log."""
    store = _store(config)
    inc = store.get(incident_id)
    if inc is None:
        _fail(f"no incident {incident_id}")
        return
    vms, entries = store.vm_records(incident_id), store.log(incident_id)
    if as_json:
        click.echo(json.dumps({"incident": as_dict(inc), "vms": vms, "log": entries}, indent=2, default=str))
        return
    _print_incident(inc, vms, entries)


def _print_incident(inc: Incident, vms: dict[int, dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=f"incident {inc.id}", show_header=False)
    for name, value in as_dict(inc).items():
        shown = _when(value) if name.endswith("_at") and isinstance(value, float) else value
        head.add_row(name, str(shown))
    console.print(head)
    if vms:
        table = Table(title="VMs")
        cols = sorted({k for rec in vms.values() for k in rec})
        for col in ("vm", *cols):
            table.add_column(col)
        for vid, rec in sorted(vms.items()):
            table.add_row(str(vid), *(str(rec.get(c, "")) for c in cols))
        console.print(table)
    log = Table(title="audit log")
    for col in ("time", "event", "details"):
        log.add_column(col)
    for entry in entries:
        rest = {k: v for k, v in entry.items() if k not in ("t", "event")}
        log.add_row(_when(entry.get("t")), str(entry.get("event", "")), json.dumps(rest, default=str))
    console.print(log)


@incidents.command()
@click.argument("incident_id", type=int)
@click.pass_obj
def approve(config: Path | None, incident_id: int) -> None:
    """Approve a held incident (storm guard): it is dispatched again at once."""
    store = _store(config)
    try:
        inc = store.approve(incident_id)
    except KeyError:
        _fail(f"no incident {incident_id}")
        return
    except ValueError as exc:
        _fail(str(exc))
        return
    click.echo(f"incident {inc.id} approved ({inc.status.value})")


@incidents.command()
@click.option("--reason", required=True, help="Why (shown in `oneha incidents` and in every held incident).")
@click.pass_obj
def pause(config: Path | None, reason: str) -> None:
    """Pause all recovery (maintenance): failures still open incidents, nothing is fenced or recovered."""
    store = _store(config)
    store.pause(reason)
    click.echo("recovery paused: incidents open and wait; workers fence and recover nothing (within "
               "a second) until `oneha incidents resume`")


@incidents.command()
@click.pass_obj
def resume(config: Path | None) -> None:
    """Lift a pause: held and interrupted incidents are dispatched again at once."""
    store = _store(config)
    was = store.paused()
    ready = store.resume()
    state = "recovery resumed" if was is not None else "recovery was not paused"
    click.echo(f"{state}; {len(ready)} open incident(s) due now")
