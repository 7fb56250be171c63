"""`oneha lab …`: run the lab cloud, poke it, and a fence command for it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import click

from oneha.lab.client import DEFAULT_URL, LabCallError, lab_call
from oneha.lab.sim import LabCloud

__all__ = ["DEFAULT_URL", "LabCallError", "lab", "lab_call"]  # lab_call, LabCallError: the lab's client, here too


@click.group(invoke_without_command=True)
@click.option("--keep", is_flag=True, help="Leave everything running after the scenario, until Ctrl-C.")
@click.option("--headless", is_flag=True, help="Plain progress lines instead of the live view.")
@click.option("--hosts", default=8, show_default=True, help="Hosts of the lab cloud (two clusters).")
@click.option("--vms", default=40, show_default=True, help="VMs of the lab cloud.")
@click.option("--workers", default=2, show_default=True, help="Worker processes (at least 2).")
@click.option("--port", default=2633, show_default=True, help="oned XML-RPC port (a free one if taken).")
@click.option("--events-port", default=2101, show_default=True, help="ZeroMQ port (a free one if taken).")
@click.option("--flower-port", default=5555, show_default=True, help="Flower port (a free one if taken).")
@click.option("--redis-url", default=None, help="Use this Redis instead of starting a private one.")
@click.option("--dry-run", is_flag=True, help="Workers decide and log, but change nothing in oned.")
@click.option("--no-detection", is_flag=True, help="Without the hosts' management side and oneha's detectors "
              "(oned's ERROR path only; also what runs where ports 22/443 of 127.50.x.y cannot be bound).")
@click.pass_context
def lab(ctx: click.Context, keep: bool, headless: bool, hosts: int, vms: int, workers: int, port: int,
        events_port: int, flower_port: int, redis_url: str | None, dry_run: bool, no_detection: bool) -> None:
    """The lab: with no subcommand, a cloud healing itself — the lab cloud, Redis, the subscriber, workers and
    Flower, a scripted scenario of failures, and a summary. Subcommands run or poke the lab cloud alone."""
    if ctx.invoked_subcommand is not None:
        return
    # Lazy imports, deliberately: `oneha lab sim` and `oneha lab ctl` need neither the demo nor the stack (Celery,
    # the subscriber), and `oneha` loads this module for its help.
    from oneha.lab.demo import main
    from oneha.lab.stack import StackOptions

    main(StackOptions(hosts=hosts, vms=vms, workers=max(2, workers), port=port, events_port=events_port,
                      flower_port=flower_port, redis_url=redis_url, dry_run=dry_run, detection=not no_detection),
         keep, headless)


@lab.command()
@click.option("--hosts", default=8, show_default=True, help="Number of hosts.")
@click.option("--vms", default=40, show_default=True, help="VMs created RUNNING, spread over the hosts.")
@click.option("--clusters", default=2, show_default=True, help="Clusters (even: shared system DS, odd: local).")
@click.option("--port", default=2633, show_default=True, help="XML-RPC port (0 = any free port).")
@click.option("--events-port", default=2101, show_default=True, help="ZeroMQ PUB port (0 = any free port).")
@click.option("--monitoring-interval", default=2.0, show_default=True, help="Seconds until a silent host is ERROR.")
@click.option("--step-delay", default=0.2, show_default=True, help="Seconds per transitional VM state.")
@click.option("--bind", default="127.0.0.1", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--missing-state", type=click.Choice(["POWEROFF", "UNKNOWN"]), default="POWEROFF", show_default=True,
              help="What oned makes of a VM whose domain vanished (the VM probe's MISSING_STATE).")
@click.option("--profile", default="fast", show_default=True,
              help="Timing profile: fast (the two options above), production (oned's own timelines: minutes), "
                   "or production/N (every duration / N).")
@click.option("--host-side", is_flag=True,
              help="Give every host its 127.50.x.y address with sshd/libvirtd listeners, a Redfish BMC (sushy-tools) "
                   "and a heartbeat file (needs root for ports 22 and 443).")
def sim(hosts: int, vms: int, clusters: int, port: int, events_port: int, monitoring_interval: float,
        step_delay: float, bind: str, seed: int, profile: str, host_side: bool,
        missing_state: str) -> None:
    """Run the lab cloud in the foreground until SIGINT/SIGTERM."""
    from oneha.lab.timeline import profile_named  # lazy: only `sim` needs the timelines

    try:
        timing = profile_named(profile)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from None
    side = None
    if host_side:
        from oneha.lab.hostside import HostSideOptions  # lazy: sushy-tools (Flask) only with --host-side

        side = HostSideOptions(seed=seed)
    cloud = LabCloud(hosts=hosts, vms=vms, clusters=clusters, monitoring_interval_s=monitoring_interval,
                     step_delay_s=step_delay, seed=seed, profile=timing, host_side=side,
                     missing_state=missing_state)
    cloud.start(port=port, events_port=events_port, bind=bind)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # The first line is for programs (tests/labkit.py parses it); the rest is for people.
    click.echo(f"LAB READY rpc={cloud.rpc_url} events={cloud.events_url} session={cloud.session}")
    click.echo(f"Lab cloud: {hosts} hosts, {vms} VMs, {clusters} clusters.")
    click.echo(f"  export ONE_XMLRPC={cloud.rpc_url}")
    click.echo(f"  export ONE_AUTH_SESSION={cloud.session}   # pyone.OneServer(ONE_XMLRPC, session=...)")
    click.echo(f"  export ONEHA_LAB_URL={cloud.rpc_url}      # for `oneha lab ctl`")
    click.echo(f"  events: ZeroMQ PUB at {cloud.events_url}")
    if cloud.host_side is not None:
        click.echo(f"  host side: host N at 127.50.0.N+1 (sshd 22, libvirtd 16509, Redfish BMC https 443); "
                   f"fence credentials in {cloud.host_side.cred_dir}, heartbeats in {cloud.host_side.heartbeat_dir}")
    click.echo("Stop with Ctrl-C.", nl=True)
    sys.stdout.flush()
    done.wait()
    cloud.stop()
    click.echo("Lab cloud stopped.")


def _url(url: str | None) -> str:
    return url or os.environ.get("ONEHA_LAB_URL", DEFAULT_URL)


def _run(url: str | None, method: str, *args: Any) -> None:
    try:
        result = lab_call(_url(url), method, *args)
    except LabCallError as exc:
        raise click.ClickException(f"{exc} (code {exc.code:#x})") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot reach the lab at {_url(url)}: {exc}") from exc
    click.echo(json.dumps(result, indent=2, sort_keys=True) if isinstance(result, dict | list) else result)


@lab.group()
@click.option("--url", default=None, help="Lab XML-RPC endpoint [env ONEHA_LAB_URL, default " + DEFAULT_URL + "].")
@click.pass_context
def ctl(ctx: click.Context, url: str | None) -> None:
    """Inject faults into a running lab and read its truth oracle."""
    ctx.obj = url


def _host_command(name: str, method: str, help_text: str) -> None:
    @ctl.command(name=name, help=help_text)
    @click.argument("host_id", type=int)
    @click.pass_obj
    def command(url: str | None, host_id: int) -> None:
        _run(url, method, host_id)


_host_command("kill-host", "lab.host.kill", "Power loss: the host and its VMs stop.")
_host_command("partition-host", "lab.host.partition", "The front-end loses the host; its VMs keep running.")
_host_command("revive-host", "lab.host.revive", "Power on / reconnect the host.")
_host_command("fence-host", "lab.host.fence", "Power the host off, as a fence command would.")


@ctl.command(name="crash-vm")
@click.argument("vm_id", type=int)
@click.option("--reason", type=click.Choice(["missing", "crashed", "watchdog", "io-error"]), default="missing",
              show_default=True, help="missing: the domain is gone (oned: POWEROFF, or UNKNOWN if the lab's "
                                      "MISSING_STATE says so); the others: libvirt reports it crashed (UNKNOWN).")
@click.pass_obj
def crash_vm(url: str | None, vm_id: int, reason: str) -> None:
    """The VM's domain dies on a healthy host; oned notices on its next VM probe."""
    _run(url, "lab.vm.crash", vm_id, reason)


@ctl.command(name="fail-vm")
@click.argument("vm_id", type=int)
@click.option("--state", default="BOOT_FAILURE", show_default=True, help="Failure LCM state.")
@click.option("--sticky", is_flag=True, help="Every later pass through that stage fails too.")
@click.pass_obj
def fail_vm(url: str | None, vm_id: int, state: str, sticky: bool) -> None:
    """Put a VM into a failure LCM state."""
    _run(url, "lab.vm.fail", vm_id, state, sticky)


@ctl.command()
@click.option("--latency-ms", type=float, default=None)
@click.option("--error-rate", type=float, default=None)
@click.option("--event-drop-rate", type=float, default=None)
@click.option("--hang/--no-hang", default=None)
@click.pass_obj
def faults(url: str | None, latency_ms: float | None, error_rate: float | None, event_drop_rate: float | None,
           hang: bool | None) -> None:
    """Set (and show) the API fault knobs."""
    knobs = {k: v for k, v in (("latency_ms", latency_ms), ("error_rate", error_rate),
                               ("event_drop_rate", event_drop_rate), ("hang", hang)) if v is not None}
    _run(url, "lab.faults", knobs)


@ctl.command()
@click.pass_obj
def oracle(url: str | None) -> None:
    """Where VMs really run; duplicates; lost VMs; the timeline."""
    _run(url, "lab.oracle")


@ctl.command()
@click.option("--reset", is_flag=True, help="Reset the counters after reading them.")
@click.pass_obj
def stats(url: str | None, reset: bool) -> None:
    """API calls per method and the most concurrent one.* calls."""
    _run(url, "lab.stats", reset)


@lab.command(name="fence-command")
def fence_command() -> None:
    """A fence command with fence_host.sh's contract: base64 host XML on stdin, exit 0 when fenced."""
    from oneha.opennebula import EventError, HostEvent, decode_template  # lazy: see `lab`

    if os.environ.get("ONEHA_LAB_FENCE_FAIL") == "1":
        raise click.ClickException("fencing failed (ONEHA_LAB_FENCE_FAIL=1)")
    try:
        event = decode_template(sys.stdin.read())
    except EventError as exc:
        raise click.ClickException(f"cannot read the host from stdin: {exc}") from exc
    if not isinstance(event, HostEvent):
        raise click.ClickException("stdin holds a VM, not a host")
    _run(None, "lab.host.fence", event.host_id)
