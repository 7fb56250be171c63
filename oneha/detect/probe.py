"""One probe round of every host's management ports, on one asyncio event loop (no thread per host).

A port answers when the TCP connection is accepted; port 22 must also send the "SSH-" banner within the timeout: a hung
kernel still completes TCP handshakes (they wait in the listener's backlog) but nothing reads or writes. A host
answers when every port answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

SSH_PORT = 22
SSH_PREFIX = b"SSH-"


async def check_port(address: str, port: int, timeout_s: float, source: str | None = None) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                address, port, local_addr=(source, 0) if source else None)
            try:
                if port == SSH_PORT:
                    return await reader.readexactly(len(SSH_PREFIX)) == SSH_PREFIX
                return True
            finally:
                writer.transport.abort()  # no FIN handshake to wait for: the next round comes soon
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def check_host(address: str, ports: Sequence[int], timeout_s: float, source: str | None,
                     limit: asyncio.Semaphore) -> bool:
    async def one(port: int) -> bool:
        async with limit:
            return await check_port(address, port, timeout_s, source)

    results = await asyncio.gather(*(one(p) for p in ports))
    return all(results)


async def probe_round(addresses: Mapping[int, str], ports: Sequence[int], timeout_s: float,
                      source: str | None = None, concurrency: int = 2000) -> dict[int, bool]:
    """host id -> answered, for every host, concurrently (at most `concurrency` connections in flight)."""
    limit = asyncio.Semaphore(concurrency)
    ids = list(addresses)
    results = await asyncio.gather(*(check_host(addresses[h], ports, timeout_s, source, limit) for h in ids))
    return dict(zip(ids, results, strict=True))


def raise_open_files_limit(wanted: int) -> int:
    """Each probe is a socket: lift the soft open-files limit towards `wanted` (never above the hard one)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return 0
