"""The lab's XML-RPC client: call a `lab.*` (or `one.*`) method of a running lab cloud and unwrap oned's reply.

Used by `oneha lab ctl`, the demo's scenario, the tests and the bench.
"""

from __future__ import annotations

import os
import xmlrpc.client
from typing import Any

from oneha.lab.sim import DEFAULT_SESSION

DEFAULT_URL = "http://127.0.0.1:2633/RPC2"


class LabCallError(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def lab_call(url: str, method: str, *args: Any, session: str | None = None, timeout_s: float = 10.0) -> Any:
    """Call a lab.* (or one.*) method and unwrap oned's `[ok, value, code, …]` reply."""
    session = session or os.environ.get("ONEHA_LAB_SESSION", DEFAULT_SESSION)
    transport = _TimeoutTransport(timeout_s)
    with xmlrpc.client.ServerProxy(url, transport=transport) as proxy:
        reply = getattr(proxy, method)(session, *args)
    if not reply[0]:
        raise LabCallError(str(reply[1]), int(reply[2]))
    return reply[1]


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def make_connection(self, host: Any) -> Any:
        conn = super().make_connection(host)
        conn.timeout = self.timeout_s
        return conn
