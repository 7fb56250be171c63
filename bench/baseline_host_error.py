"""A baseline that does what OpenNebula's host_error.rb does (REFERENCE §1), for the bench to compare against.

Per failed host, sequentially: `one.host.info`, the fence command, `one.vmpool.info(-2, -1, -1, -1)`, then for each
VM whose last history is on the host and whose STATE is ACTIVE: `one.vm.info`, then the action (`recover 4` for -r,
`recover 3` for -d, `resched` for -m). Return values are not checked, nothing is confirmed, nothing is retried.
Hosts run in parallel up to 15 (the hook manager's concurrency). Plain xmlrpc.client, a new connection per call,
like the Ruby OCA.
"""

from __future__ import annotations

import base64
import subprocess
import time
import xml.etree.ElementTree as ET
import xmlrpc.client
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ACTIONS = {"recreate": ("one.vm.recover", 4), "delete": ("one.vm.recover", 3), "migrate": ("one.vm.action", "resched")}


def _call(url: str, method: str, *args: Any) -> Any:
    with xmlrpc.client.ServerProxy(url) as proxy:
        return getattr(proxy, method)(*args)


def host_error(url: str, session: str, host_id: int, action: str = "recreate",
               fence_argv: list[str] | None = None, wait_s: float = 0.0, marks: dict[str, float] | None = None) -> int:
    """One run of the hook for one host; returns the number of actions issued.

    `wait_s`: host_error.rb's `-p N` blocking sleep (N x 60 s since 5.12), after which it re-reads the host and
    gives up unless it is still ERROR. `marks` gets the wall times "fenced" and "issued" (the bench's timeline).
    """
    host_reply = _call(url, "one.host.info", session, host_id, False)
    if wait_s > 0:
        time.sleep(wait_s)  # what the hook does: the whole hook run blocks
        host_reply = _call(url, "one.host.info", session, host_id, False)
        if ET.fromstring(str(host_reply[1])).findtext("STATE") != "3":
            return 0  # "Host came back" (or DISABLED/OFFLINE)
    if fence_argv:
        proc = subprocess.run(fence_argv, input=base64.b64encode(str(host_reply[1]).encode()), check=False)
        if proc.returncode != 0:
            return 0  # fencing failed: no VM is touched
    if marks is not None:
        marks["fenced"] = time.time()
    pool = ET.fromstring(_call(url, "one.vmpool.info", session, -2, -1, -1, -1, "")[1])
    method, arg = ACTIONS[action]
    issued = 0
    for vm in pool.findall("VM"):
        hist = vm.findall("HISTORY_RECORDS/HISTORY")
        if not hist or hist[-1].findtext("HID") != str(host_id) or vm.findtext("STATE") != "3":
            continue
        vid = int(vm.findtext("ID") or -1)
        _call(url, "one.vm.info", session, vid, False)
        if method == "one.vm.action":
            _call(url, method, session, arg, vid)
        else:
            _call(url, method, session, vid, arg)
        issued += 1
    if marks is not None:
        marks["issued"] = time.time()
    return issued


def run_baseline(url: str, session: str, host_ids: list[int], action: str = "recreate", parallel: int = 15,
                 fence_argv: list[str] | None = None) -> dict[str, float]:
    """Run the hook for every failed host, up to `parallel` at once; the time to issue every action."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        issued = sum(pool.map(lambda h: host_error(url, session, h, action, fence_argv), host_ids))
    return {"issued": issued, "issue_s": time.monotonic() - started}
