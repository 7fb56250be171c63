"""The beacon (contract point 3): a TCP port every agent connects to once per beat; any detector accepting is "a
detector sees me". Nothing is read or written: the accepted connection is the whole message."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("oneha.detect.beacon")


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def serve(bind: str, port: int) -> asyncio.Server | None:
    """Listen; None (logged) when the port cannot be taken: the agents then count one detector less."""
    try:
        server = await asyncio.start_server(_accept, bind, port, reuse_address=True)
    except OSError as exc:
        log.error("beacon: cannot listen", extra={"kv": {"bind": bind, "port": port, "error": exc.strerror}})
        return None
    log.info("beacon listening", extra={"kv": {"bind": bind, "port": server.sockets[0].getsockname()[1]}})
    return server
