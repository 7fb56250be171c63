"""Does a detector see this host? A TCP connection to any one detector's beacon port (contract point 3).

All connections start at once, non-blocking, and the first completed handshake answers: the check takes at most
`timeout_s` however many detectors there are and whichever of them hang. Addresses are IPs (settings.parse_endpoint):
no DNS in the loop.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Sequence

Endpoint = tuple[str, int]


def any_accepts(endpoints: Sequence[Endpoint], timeout_s: float, source: str | None = None) -> bool:
    """True as soon as one endpoint accepts a TCP connection (from `source`, if given), within `timeout_s`."""
    selector = selectors.DefaultSelector()
    pending: list[socket.socket] = []
    try:
        for addr, port in endpoints:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            pending.append(sock)
            sock.setblocking(False)
            try:
                if source is not None:
                    sock.bind((source, 0))
                code = sock.connect_ex((addr, port))
            except OSError:
                continue
            if code == 0:
                return True
            if code not in (errno.EINPROGRESS, errno.EAGAIN):
                continue  # refused or unreachable at once
            selector.register(sock, selectors.EVENT_WRITE)
        return _first_accept(selector, time.monotonic() + timeout_s)
    finally:
        selector.close()
        for sock in pending:
            with contextlib.suppress(OSError):
                sock.close()


def _first_accept(selector: selectors.BaseSelector, deadline: float) -> bool:
    while selector.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for key, _ in selector.select(left):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            selector.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                return True
    return False
