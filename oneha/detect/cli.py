"""`oneha detect`: one detector instance (run several, on different machines: docs/detection.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from oneha.clikit import config_option, settings_or_exit

if TYPE_CHECKING:
    from oneha.detect.service import Detector


@click.command()
@config_option
def detect(config: Path | None) -> None:
    """Probe every host's management ports, agree on suspects with the other detectors, prove death, report it."""
    settings = settings_or_exit(config, need_oned=True)
    # Imported here: `oneha` must start fast for the other subcommands.
    import redis

    from oneha import redisconn
    from oneha.detect.metrics import serve
    from oneha.detect.probe import raise_open_files_limit
    from oneha.detect.service import Detector
    from oneha.opennebula import OnedClient, make_server
    from oneha.subscriber.logs import configure

    configure()
    client = redisconn.client(settings.redis)
    try:
        client.ping()
    except redis.AuthenticationError as exc:  # a wrong password will not fix itself: exit 2, like the other services
        click.echo(f"oneha: Redis refused us: {exc}", err=True)
        sys.exit(2)
    except redis.RedisError as exc:  # Redis down: start anyway, every round retries (and proves nothing meanwhile)
        click.echo(f"oneha: warning: Redis not reachable at start ({type(exc).__name__}); retrying", err=True)
    o = settings.oned
    oned = OnedClient(make_server(o.endpoint, settings.oned_session, o.connect_timeout_s, o.read_timeout_s,
                                  o.https_verify))
    raise_open_files_limit(4 * settings.detect.probe_concurrency + 256)
    serve(settings.detect.metrics_port, settings.detect.metrics_bind)
    asyncio.run(_run(Detector(settings, client, oned)))


async def _run(detector: Detector) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Fence commands (one per host being decided, for up to their timeout), heartbeat reads and Redis calls run in
    # threads: the default pool (CPUs + 4) could make four hosts failing at once wait for each other's BMC.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="detect"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await detector.run(stop)
