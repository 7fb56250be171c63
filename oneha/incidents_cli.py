"""`oneha incidents [list [--all]] | show ID | approve ID | pause --reason TEXT | resume`, each with `--config FILE`
and `--json`, given before or after the subcommand: what the subscriber and workers did, and the operator's levers.

Every subcommand answers in one line when Redis cannot be reached (these are the emergency commands). Times are
local dates with how long ago (or until); durations read as such. Tables on a terminal; tab-separated plain text
when the output is a pipe or a file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import redis

from oneha.incidents import Incident, IncidentStore, as_dict


def _store(ctx: click.Context) -> IncidentStore:
    from oneha import redisconn
    from oneha.clikit import settings_or_exit
    from oneha.keys import Keys

    settings = settings_or_exit(ctx.obj["config"])
    client = redisconn.client(settings.redis)
    ctx.obj["redis_url"] = settings.redis.url
    return IncidentStore(client, Keys(settings.redis.key_prefix), settings.audit.retention_s,
                         settings.audit.max_incidents)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"oneha incidents: {message}", err=True)
    sys.exit(code)


# -- how times and durations read -----------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    s = abs(seconds)
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def when(ts: float | None, now: float | None = None) -> str:
    """A local date, and how long ago (or until)."""
    if not ts:
        return "-"
    now = time.time() if now is None else now
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    delta = now - ts
    return f"{date} ({duration(delta)} ago)" if delta >= 0 else f"{date} (in {duration(delta)})"


def readable(name: str, value: Any) -> Any:
    """An epoch (`*_at`, `t`) as a date, seconds (`*_s`) as a duration; anything else as it is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if name.endswith("_at") or name == "t":
            return when(float(value))
        if name.endswith("_s"):
            return duration(float(value))
    return value


# -- output: a table on a terminal, tab-separated text otherwise ------------------------------------------------------

def emit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> None:
    if not sys.stdout.isatty():
        click.echo(f"# {title}")
        if header:
            click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=header)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


# -- the command group: options before or after the subcommand ------------------------------------------------------

class _Group(click.Group):
    """Redis unreachable is one line, whatever the subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            where = (ctx.obj or {}).get("redis_url", "Redis")
            _fail(f"cannot reach Redis at {_redacted(where)}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def _redacted(url: str) -> str:
    from oneha.subscriber.bridge import redacted

    return redacted(url)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config and --json on a subcommand; a value given there wins over the group's."""
    fn = click.option("--json", "as_json", is_flag=True, default=None, help="JSON for tools.")(fn)
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="TOML configuration file (default: $ONEHA_CONFIG).")(fn)


def _merge(ctx: click.Context, config: Path | None, as_json: bool | None) -> bool:
    if config is not None:
        ctx.obj["config"] = config
    return bool(ctx.obj["json"] if as_json is None else as_json)


@click.group(cls=_Group, invoke_without_command=True)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="ONEHA_CONFIG",
              help="TOML configuration file (default: $ONEHA_CONFIG).")
@click.option("--json", "as_json", is_flag=True, help="JSON for tools.")
@click.pass_context
def incidents(ctx: click.Context, config: Path | None, as_json: bool) -> None:
    """Open and recent incidents (default: list the open ones)."""
    ctx.obj = {"config": config, "json": as_json}
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@incidents.command("list")
@click.option("--all", "show_all", is_flag=True, help="Recent closed incidents too.")
@click.option("--limit", default=50, show_default=True)
@_common
@click.pass_context
def list_cmd(ctx: click.Context, show_all: bool = False, limit: int = 50, config: Path | None = None,
             as_json: bool | None = None) -> None:
    """List incidents, newest first."""
    json_out = _merge(ctx, config, as_json)
    store = _store(ctx)
    found = store.recent(limit) if show_all else store.open_incidents()[:limit]
    if json_out:
        click.echo(json.dumps([as_dict(i) for i in found], indent=2))
        return
    now = time.time()
    rows = [(i.id, i.kind.value, i.resource_id, i.cluster_id, i.status.value, i.reports, i.source,
             when(i.opened_at, now), when(i.due_at, now) if i.closed_at is None else "-",
             duration((i.closed_at or now) - i.opened_at), i.detail[:60]) for i in found]
    emit_table("incidents" if show_all else "open incidents",
               ("id", "kind", "resource", "cluster", "status", "reports", "source", "opened", "due", "age",
                "detail"), rows)
    if not found:
        click.echo("no incidents" if show_all else "no open incidents")
    pause = store.paused()
    if pause is not None:
        click.echo(f"RECOVERY PAUSED since {when(pause.get('at'))}: {pause.get('reason', '')} "
                   "(`oneha incidents resume` to act again)")
    click.echo(_alive(store))


def _alive(store: IncidentStore) -> str:
    """Who is up, from the heartbeats: a silent subscriber or an empty worker pool is worth seeing here."""
    from oneha import heartbeat

    kinds = [name.split(":", 1)[0] for name in heartbeat.alive(store.r, store.keys)]
    return (f"alive (heartbeat within {3 * heartbeat.INTERVAL_S:.0f}s): {kinds.count('subscriber')} subscriber(s), "
            f"{kinds.count('worker')} worker(s)")


@incidents.command()
@click.argument("incident_id", type=int)
@_common
@click.pass_context
def show(ctx: click.Context, incident_id: int, config: Path | None = None, as_json: bool | None = None) -> None:
    """One incident with its per-VM records and audit log."""
    json_out = _merge(ctx, config, as_json)
    store = _store(ctx)
    inc = store.get(incident_id)
    if inc is None:
        _fail(f"no incident {incident_id}")
        return
    vms, entries = store.vm_records(incident_id), store.log(incident_id)
    if json_out:
        click.echo(json.dumps({"incident": as_dict(inc), "vms": vms, "log": entries}, indent=2, default=str))
        return
    _print_incident(inc, vms, entries)


def _print_incident(inc: Incident, vms: dict[int, dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    head = [(name, readable(name, value)) for name, value in as_dict(inc).items()]
    head.append(("age", duration((inc.closed_at or time.time()) - inc.opened_at)))
    emit_table(f"incident {inc.id}", ("field", "value"), head, header=False)
    if vms:
        cols = sorted({k for rec in vms.values() for k in rec})
        rows = [(vid, *(readable(c, rec.get(c, "")) for c in cols)) for vid, rec in sorted(vms.items())]
        click.echo("")
        emit_table("VMs", ("vm", *cols), rows)
    log_rows = []
    for entry in entries:
        rest = {k: readable(k, v) for k, v in entry.items() if k not in ("t", "event")}
        log_rows.append((when(entry.get("t")), entry.get("event", ""), json.dumps(rest, default=str)))
    click.echo("")
    emit_table("audit log", ("time", "event", "details"), log_rows)


@incidents.command()
@click.argument("incident_id", type=int)
@_common
@click.pass_context
def approve(ctx: click.Context, incident_id: int, config: Path | None = None, as_json: bool | None = None) -> None:
    """Approve a held incident (storm guard): it is dispatched again at once."""
    json_out = _merge(ctx, config, as_json)
    store = _store(ctx)
    try:
        inc = store.approve(incident_id)
    except KeyError:
        _fail(f"no incident {incident_id}")
        return
    except ValueError as exc:
        _fail(str(exc))
        return
    _say(json_out, f"incident {inc.id} approved ({inc.status.value})", id=inc.id, status=inc.status.value)


@incidents.command()
@click.option("--reason", required=True, help="Why (shown in `oneha incidents` and in every held incident).")
@_common
@click.pass_context
def pause(ctx: click.Context, reason: str, config: Path | None = None, as_json: bool | None = None) -> None:
    """Pause all recovery (maintenance): failures still open incidents, nothing is fenced or recovered."""
    json_out = _merge(ctx, config, as_json)
    store = _store(ctx)
    store.pause(reason)
    _say(json_out, "recovery paused: incidents open and wait; workers fence and recover nothing (within "
         "a second) until `oneha incidents resume`", paused=True, reason=reason)


@incidents.command()
@_common
@click.pass_context
def resume(ctx: click.Context, config: Path | None = None, as_json: bool | None = None) -> None:
    """Lift a pause: held and interrupted incidents are dispatched again at once."""
    json_out = _merge(ctx, config, as_json)
    store = _store(ctx)
    was = store.paused()
    ready = store.resume()
    state = "recovery resumed" if was is not None else "recovery was not paused"
    _say(json_out, f"{state}; {len(ready)} open incident(s) due now", paused=False, was_paused=was is not None,
         due_now=len(ready))


def _say(as_json: bool, text: str, **fields: Any) -> None:
    click.echo(json.dumps(fields) if as_json else text)
