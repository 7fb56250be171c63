"""Issue 11, defect 2: the subscriber's memory is bounded in bytes, not in messages.

A real `oneha subscribe` process listens to the lab's publisher and to a hostile one. The hostile publisher sends
100,000 frames: the campaign's 0.7 MB documents with 50,000 elements, documents with tens of thousands of XML
attributes, frames over the size limit, and small garbage. Meanwhile a lab host really fails. The subscriber's RSS
(read from /proc while the flood runs) must stay under RSS_BOUND_MB, the host's ERROR event must become an incident
through ZeroMQ (the reconciler is kept out of the way), and its VMs must be recovered, none twice.
Before the fix the same flood took it to 646 MB here (libzmq queued up to 100,000 messages of any size; the
campaign saw 5.4 GB), and the 50,000-element document even opened an incident for host 7.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from oneha.incidents import Kind
from oneha.waiting import wait_until
from tests.labkit import call, running_lab
from tests.test_subscriber_kit import publisher
from tests.test_workers_e2e import assert_recovered_elsewhere
from tests.workerkit import worker_stack

pytestmark = pytest.mark.slow

LAB = {"monitoring_interval_s": 0.5, "step_delay_s": 0.05}
RSS_BOUND_MB = 300  # at rest ~60 MB; zmq_queue_bytes (128 MiB) + parsing + slack. Before the fix: 646 MB
KILL_AT_MB = 2500  # the unbounded (old) subscriber is stopped here: the test has failed already
FRAMES = 100_000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def hostile_frames() -> list[list[bytes]]:
    """The kinds of the campaign, one copy each (sent again and again, zero-copy)."""
    key = b"EVENT STATE HOST/ERROR//7 "
    head = (b"<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>HOST</HOOK_OBJECT>"
            b"<RESOURCE_ID>7</RESOURCE_ID><HOST><ID>7</ID><STATE>3</STATE>")
    elements = head + b"<TEMPLATE>" + b"".join(b"<A%d>x</A%d>" % (i, i) for i in range(50_000)) + \
        b"</TEMPLATE></HOST></HOOK_MESSAGE>"
    attributes = head + b"<TEMPLATE " + b" ".join(b'a%d="x"' % i for i in range(40_000)) + \
        b"/></HOST></HOOK_MESSAGE>"
    oversized = base64.b64encode(b"<HOOK_MESSAGE>" + b"A" * (3 << 20) + b"</HOOK_MESSAGE>")
    return [[key, base64.b64encode(elements)], [key, base64.b64encode(attributes)], [key, oversized],
            [key, b"!!not base64!!"], [key, base64.b64encode(b"<HOOK_MESSAGE><x></HOOK_MESSAGE>")], [key]]


def flood(sock: zmq.Socket[bytes], frames: list[list[bytes]], n: int) -> None:
    big_elements, big_attributes, oversized, *small = frames
    for i in range(n):
        if i % 40 == 0:
            chosen = big_elements  # 2,500 of them, like the campaign's
        elif i % 40 == 20:
            chosen = big_attributes
        elif i % 1000 == 1:
            chosen = oversized
        else:
            chosen = small[i % len(small)]
        sock.send_multipart(chosen, copy=False)  # a PUB drops past its high-water mark: oned's does the same


@pytest.fixture()
def hostile_publisher() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    # XPUB: subscriptions are seen, so the flood is not sent blind; its default high-water mark (1000) drops the
    # rest, as oned's PUB does
    with publisher(zmq.XPUB, sndhwm=1000) as pair:
        yield pair


class RssWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            if self.peak > KILL_AT_MB:
                os.kill(self.pid, signal.SIGKILL)
                return


def test_hostile_flood_keeps_rss_bounded_and_a_real_failure_is_recovered(tmp_path: Path, redis_url: str,
                                                                          hostile_publisher) -> None:
    pub, hostile_url = hostile_publisher
    with running_lab(hosts=3, **LAB) as lab:
        url = lab.rpc_url
        vms = [call(url, "lab.vm.create", {"HOST": 1, "STATE": "RUNNING"}) for _ in range(4)]
        # The reconciler is slowed down so that only the ZeroMQ path can open the incident.
        subscriber = {"zmq_endpoints": [lab.events_url, hostile_url], "reconcile_interval_s": 600.0,
                      "full_scan_interval_s": 600.0, "dispatch_interval_s": 0.1, "metrics_port": 0}
        with worker_stack(tmp_path, redis_url, url, workers=1, dispatcher=False, subscriber=subscriber) as stack:
            proc = stack.workers.start_subscriber()
            watch = RssWatch(proc.pid)
            try:
                wait_until(lambda: pub.poll(100) and pub.recv().startswith(b"\x01"), 30, what="subscription")
                wait_until(lambda: any(str(k).startswith("subscriber:") for k in
                                       stack.client.hkeys(stack.store.keys.heartbeat)), 30, what="subscriber up")
                baseline = rss_mb(proc.pid)
                watch.start()
                frames = hostile_frames()
                started = time.monotonic()
                flood(pub, frames, FRAMES // 2)
                call(url, "lab.host.kill", 1)  # a real failure in the middle of the flood
                flood(pub, frames, FRAMES // 2)
                sent_s = time.monotonic() - started

                def host_incident():
                    return next((i for i in stack.store.recent(100)
                                 if i.kind is Kind.HOST and i.resource_id == 1), None)

                incident = wait_until(host_incident, 30, what="host 1 incident from its ZeroMQ event")
                assert incident.source == "zmq"
                stack.wait_closed(incident.id, timeout_s=60)
                assert stack.store.get(incident.id).status.value == "recovered"  # type: ignore[union-attr]
                assert assert_recovered_elsewhere(url, vms, 1)["lost"] == []
            finally:
                watch.stop.set()
                stack.workers.stop()  # SIGTERM (then SIGKILL) to the subscriber too: it is in the pool's list
            print(f"\nsubscriber RSS: {baseline:.0f} MB at rest, peak {watch.peak:.0f} MB during {FRAMES} hostile "
                  f"frames (sent in {sent_s:.1f} s); bound {RSS_BOUND_MB} MB")
            assert watch.peak < RSS_BOUND_MB, (tmp_path / "subscriber.log").read_text()[-3000:]
            assert proc.returncode == 0
