"""`oneha worker`: one node of the recovery worker pool (a Celery worker on the configured broker).

Pool: threads by default. The flows are I/O-bound (oned calls, Redis, waiting for VMs to move), so threads give
concurrency cheaply on a small machine; one process keeps the Prometheus metrics in one registry (prefork would need
PROMETHEUS_MULTIPROC_DIR) and lets the batched VM reader merge the reads of all concurrent tasks into one
`one.vmpool.infoset` call. Celery does not enforce time limits in the threads pool, so every wait in the flows has
its own deadline and every oned call its own timeout. `--pool prefork` works too, with per-child metrics.

Exit status: 0 only when asked to stop (SIGTERM/SIGINT/SIGQUIT), 2 for a bad configuration, and anything else
non-zero. A worker that ends on its own — Celery winding down after the broker vanished, kombu failing to restore
unacknowledged messages with Redis gone (`'NoneType' object has no attribute 'hostname'` in
kombu/transport/redis.py, a known upstream bug) — exits `EXIT_UNASKED` (3), never 0, so it is never mistaken
for a clean stop; the systemd unit restarts it (`Restart=always`, `RestartPreventExitStatus=2`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from oneha.keys import HOST_QUEUE, VM_QUEUE

EXIT_UNASKED = 3  # the worker ended without being asked to stop


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML configuration file [env ONEHA_CONFIG].")
@click.option("--concurrency", type=int, default=None, help="Tasks at once (default: 16 threads, or CPUs).")
@click.option("--queues", default=f"{HOST_QUEUE},{VM_QUEUE}", show_default=True, help="Queues to consume.")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads", show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default oneha@<host>-<pid>-<random tag>).")
@click.option("--instance", default=None, envvar="ONEHA_WORKER_INSTANCE", help=(
    "Instance of the systemd unit (oneha-worker@N): a number N serves metrics on worker.metrics_port + N - 1, "
    "so several workers on one machine each have their own port (unless ONEHA_WORKER__METRICS_PORT is set)."))
def worker(config_file: Path | None, concurrency: int | None, queues: str, pool: str, loglevel: str,
           hostname: str | None, instance: str | None) -> None:
    """Start a recovery worker (Celery) on the configured broker."""
    # Lazy imports, deliberately: `oneha` loads this module for every subcommand (and --help), which must not pay
    # for Celery and the flows; the app is looked up when the command runs (tests replace it).
    from oneha.clikit import settings_or_exit

    if config_file is not None:  # the Celery app loads its settings from the environment
        os.environ["ONEHA_CONFIG"] = str(config_file.resolve())
    settings = settings_or_exit(None, need_oned=True)
    port = instance_metrics_port(settings.worker.metrics_port, instance)
    if port is not None and "ONEHA_WORKER__METRICS_PORT" not in os.environ:
        os.environ["ONEHA_WORKER__METRICS_PORT"] = str(port)  # read again by the worker's own settings
    if concurrency is None:
        concurrency = 16 if pool == "threads" else (os.cpu_count() or 2)
    from oneha.heartbeat import instance_name
    from oneha.workers.app import app

    name = hostname or f"oneha@{instance_name()}"
    argv = ["worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={queues}",
            f"--loglevel={loglevel}", f"--hostname={name}", "--without-mingle", "--without-gossip"]
    # Threads here mostly wait on sockets (Redis, oned, the broker). With CPU-bound neighbours in the process (XML
    # parsing), a thread whose reply has arrived waits for the GIL up to the switch interval (5 ms by default) once
    # per round trip; 1 ms keeps those waits short at a small cost in switches.
    sys.setswitchinterval(0.001)
    if settings.worker.dry_run:
        click.echo("oneha worker: DRY RUN: nothing will be changed in oned", err=True)
    sys.exit(run_worker(app, argv))


def run_worker(app: Any, argv: list[str]) -> int:
    """Run the Celery worker; its exit status, except that an exit nobody asked for is never 0."""
    from celery import signals  # lazy: see `worker`


    asked: list[str] = []

    def stopping(sig: str = "", **_: Any) -> None:
        asked.append(sig)

    signals.worker_shutting_down.connect(stopping, weak=False)
    try:
        app.worker_main(argv)
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if status == 0 and not asked:
        click.echo(f"oneha worker: stopped without being asked to (broker or Redis lost?); exit {EXIT_UNASKED} so "
                   "that it is restarted", err=True)
        return EXIT_UNASKED
    return status


def instance_metrics_port(base: int | None, instance: str | None) -> int | None:
    """The metrics port of worker instance N (1, 2, ...): base + N - 1. None: keep the configured port."""
    if base is None or base == 0 or instance is None or not instance.isdigit() or int(instance) < 1:
        return None
    return base + int(instance) - 1
