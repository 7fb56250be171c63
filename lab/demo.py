"""`oneha lab` with no subcommand: start the whole stack, play the scenario with a live view, print the summary."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter, deque
from types import FrameType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from oneha.incidents import IncidentStore
from oneha.lab.scenario import Scenario, Summary, describe
from oneha.lab.stack import Stack, StackOptions, wait_ready

HOST_STYLE = {"MONITORED": "green", "ERROR": "bold red", "DISABLED": "yellow", "OFFLINE": "yellow"}


def run_demo(options: StackOptions, keep: bool, headless: bool, console: Console) -> int:
    """Returns the exit code: 0 when every failure was handled as expected with 0 duplicates and 0 lost."""
    stop = threading.Event()
    _stop_on_signals(stop)
    with Stack(options) as stack:
        for notice in stack.notices:
            console.print(f"[yellow]{notice}[/]")
        _print_endpoints(stack, console, headless)
        wait_ready(stack)
        summary = _play(stack, headless, console)
        _print_summary(summary, console)
        if keep:
            _print_explore_hints(stack, console)
            console.print("--keep: everything stays up; Ctrl-C stops it all.")
            stop.wait()
    console.print("stopped: every process the lab started has exited.")
    return 0 if summary.ok else 1


def _play(stack: Stack, headless: bool, console: Console) -> Summary:
    if headless:
        return Scenario(stack, progress=lambda line: console.print(line)).play()
    log: deque[str] = deque(maxlen=12)
    scenario = Scenario(stack, progress=log.append)
    result: list[Summary] = []
    worker = threading.Thread(target=lambda: result.append(scenario.play()), daemon=True)
    worker.start()
    with Live(_view(stack, scenario, log), console=console, refresh_per_second=4) as live:
        while worker.is_alive():
            worker.join(0.25)
            live.update(_view(stack, scenario, log))
    if not result:
        raise RuntimeError("the scenario stopped without a summary")
    return result[0]


def _view(stack: Stack, scenario: Scenario, log: deque[str]) -> Group:
    detected = _detector_states(scenario.store) if stack.detection else None
    return Group(_hosts_table(stack, detected), _incidents_table(scenario.store),
                 Panel("\n".join(log) or "starting…", title="scenario"))


def _detector_states(store: IncidentStore) -> dict[int, dict[str, Any]]:
    """What the detectors say of each host (oneha/detect/states.py: absent = ok)."""
    raw = store.r.hgetall(store.keys.detect_states)
    return {int(k): json.loads(v) for k, v in raw.items()}


def _hosts_table(stack: Stack, detected: dict[int, dict[str, Any]] | None = None) -> Table:
    assert stack.lab is not None
    cloud = stack.lab.cloud
    table = Table(title="lab cloud: hosts", expand=True)
    columns = ["host", "cluster", "state (oned)", "power", "VMs (oned)", "VMs really running"]
    for col in columns + (["detector"] if detected is not None else []):
        table.add_column(col)
    with cloud.lock:
        really = Counter(h for hosts in cloud.running.values() for h in hosts)
        for host in sorted(cloud.hosts.values(), key=lambda h: h.id):
            state = host.state.name
            row = [str(host.id), str(host.cluster_id), f"[{HOST_STYLE.get(state, 'white')}]{state}[/]",
                   host.power, str(len(host.vm_ids)), str(really.get(host.id, 0))]
            if detected is not None:
                row.append(_detector_cell(detected.get(host.id)))
            table.add_row(*row)
    return table


def _detector_cell(entry: dict[str, Any] | None) -> str:
    """ok -> suspect -> proven dead (by what) -> recovering; or isolated (alerted, never recovered)."""
    if entry is None or entry.get("state") == "ok":
        return "[green]ok[/]"
    state = str(entry.get("state"))
    if state == "dead":
        return f"[bold red]proven dead[/] ({entry.get('proof') or '?'})"
    style = {"suspect": "yellow", "isolated": "magenta"}.get(state, "white")
    return f"[{style}]{state}[/] {str(entry.get('detail', ''))[:40]}"


def _incidents_table(store: IncidentStore) -> Table:
    table = Table(title="incidents", expand=True)
    for col in ("id", "kind", "resource", "status", "reports", "detail"):
        table.add_column(col)
    for inc in store.recent(8):
        style = "green" if inc.status.value in ("recovered", "cancelled") else "yellow"
        table.add_row(str(inc.id), inc.kind.value, str(inc.resource_id), f"[{style}]{inc.status.value}[/]",
                      str(inc.reports), inc.detail[:60])
    return table


def _print_endpoints(stack: Stack, console: Console, headless: bool) -> None:
    assert stack.lab is not None
    lines = [
        f"oned (lab):  ONE_XMLRPC={stack.lab.rpc_url}  session {stack.lab.session}",
        f"events:      {stack.lab.events_url}",
        f"redis:       {stack.redis_url}",
        f"config:      {stack.workdir / 'oneha.toml'}  (logs beside it)",
    ]
    if stack.flower_url:
        user, password = stack.flower_auth
        lines.append(f"Flower:      {stack.flower_url}  (user {user}, password {password})")
    if headless:  # one line each, never wrapped: scripts and tests read them
        for line in lines:
            console.print(line, soft_wrap=True, highlight=False)
    else:
        console.print(Panel("\n".join(lines), title="oneha lab"))


def _print_explore_hints(stack: Stack, console: Console) -> None:
    assert stack.lab is not None
    config = stack.workdir / "oneha.toml"
    for line in (f"  ONEHA_CONFIG={config} oneha incidents list --all",
                 f"  ONEHA_CONFIG={config} oneha incidents show 1",
                 f"  ONEHA_LAB_URL={stack.lab.rpc_url} oneha lab ctl kill-host 3",
                 f"  ONEHA_LAB_URL={stack.lab.rpc_url} oneha lab ctl oracle"):
        console.print(line, soft_wrap=True, highlight=False)


def _print_summary(summary: Summary, console: Console) -> None:
    table = Table(title="summary", expand=True)
    for col in ("failure", "what", "detected after", "settled after", "actions", "result"):
        table.add_column(col)
    for out in summary.outcomes:
        table.add_row(out.name, out.what, _secs(out.detected_s), _secs(out.settled_s),
                      ", ".join(f"{n} x {a}" for a, n in sorted(out.actions.items())) or "-",
                      "[green]ok[/]" if out.ok else f"[red]{describe(out)}[/]")
    console.print(table)
    style = "green" if not summary.duplicates else "red"
    console.print(f"[{style}]duplicates: {len(summary.duplicates)}[/]  "
                  f"[{'green' if not summary.lost else 'red'}]lost: {len(summary.lost)}[/]  (from the lab oracle)")


def _secs(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "-"


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            return
        stop.set()
        raise KeyboardInterrupt  # unwinds the `with Stack` block, which stops every child process

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(options: StackOptions, keep: bool, headless: bool) -> None:
    console = Console(force_terminal=False, width=160) if headless else Console()
    started = time.monotonic()
    try:
        code = run_demo(options, keep, headless, console)
    except KeyboardInterrupt:
        console.print("interrupted: every process the lab started has been stopped.")
        code = 130
    console.print(f"({time.monotonic() - started:.0f}s)")
    sys.exit(code)
