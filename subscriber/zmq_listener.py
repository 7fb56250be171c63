"""The ZeroMQ input: a SUB socket on every one_hm publisher (REFERENCE §2).

Subscriptions: only the `EVENT STATE ...` key form (HOST_PREFIXES + VM_PREFIXES). oned publishes every change under
both forms from the same send; subscribing to both would double the traffic and the parsing for no new information
(both copies are lost together when a publisher or this subscriber is down), and the dedup in Redis would only
throw the second copy away. The decoder still accepts both forms (tests, other tools).

Reconnects are zmq's job (ZMQ_RECONNECT_IVL/_MAX); a socket monitor counts them. What the publisher drops past its
high-water mark is invisible to a subscriber; the reconciler is the answer to every kind of loss.

Memory is bounded in bytes, not only in messages: ZMQ_MAXMSGSIZE caps each frame at the largest event accepted (in
base64), and the receive high-water mark of each publisher's socket is its share of the byte budget
(`zmq_queue_bytes`) divided by that, so what libzmq queues stays within the budget. A batch handed to the sink is
bounded by an estimate of the decoded events' memory and by time (`[subscriber] zmq_batch_*`).

Reconnecting (libzmq 4.3.5, checked): a frame over MAXMSGSIZE makes libzmq drop the connection as a protocol error,
and after a protocol error libzmq does NOT reconnect: the endpoint would stay silent for good. Reconnecting on the
same socket (disconnect + connect) is not safe either: the old pipe, terminated while a message of it is half read,
makes fq_t point at the other pipe and abort the process ("Assertion failed: !_more (src/fq.cpp:80)", seen under a
hostile flood). So each publisher has its own SUB socket, and on EVENT_DISCONNECTED that socket is drained of the
complete messages it holds, closed, and replaced by a new one connected to the same endpoint (for an ordinary
connection loss this only does what libzmq would have done). What was in flight is left to the reconciler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from oneha.opennebula import (
    HOST_PREFIXES,
    VM_PREFIXES,
    Event,
    EventError,
    decode_event,
    event_size_bytes,
    max_frame_bytes,
)
from oneha.settings import SubscriberSettings
from oneha.subscriber import metrics
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.zmq")

Sink = Callable[[list[tuple[Event, str, float]]], None]
POLL_MS = 200  # SIGTERM is noticed within this long
MIN_RCVHWM = 16


class _RateLimit:
    """At most one log line per reason per second: hostile traffic must not become a log flood."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}
        self.lock = threading.Lock()

    def allow(self, reason: str) -> int | None:
        """None: stay quiet; else log now, with how many were suppressed since the last line."""
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(reason, -1e9) < 1.0:
                self.suppressed[reason] = self.suppressed.get(reason, 0) + 1
                return None
            self.last[reason] = now
            return self.suppressed.pop(reason, 0)


_limit = _RateLimit()


def reject(reason: str, detail: str = "", source: str = "zmq") -> None:
    metrics.EVENTS_REJECTED.labels(reason).inc()
    suppressed = _limit.allow(reason)
    if suppressed is not None:
        log.warning("event rejected", extra=kv(reason=reason, source=source, detail=detail[:200],
                                               similar_suppressed=suppressed))


def decode_frames(frames: Sequence[bytes], max_bytes: int) -> Event | None:
    """Frames -> event, or None after counting why not. Never raises on bad input."""
    if len(frames) != 2:
        reject("frame_count", str(len(frames)))
        return None
    try:
        return decode_event(frames[0], frames[1], max_bytes)
    except EventError as exc:
        reject(exc.reason, str(exc))
    except Exception as exc:  # a decoder bug must not take the subscriber down
        reject("decode_error", type(exc).__name__)
    return None


class ZmqListener:
    def __init__(self, endpoints: Sequence[str], sink: Sink, stop: threading.Event, rcvhwm: int = 100_000,
                 max_event_bytes: int = 1 << 20, idle: Callable[[], object] | None = None,
                 context: zmq.Context[zmq.Socket[bytes]] | None = None, queue_bytes: int | None = None,
                 tuning: SubscriberSettings | None = None) -> None:
        self.endpoints = list(endpoints)
        self.tuning = tuning or SubscriberSettings()  # the zmq_batch_* bounds
        self.sink = sink
        self.stop = stop
        self.max_event_bytes = max_event_bytes
        per_socket = None if queue_bytes is None else queue_bytes // max(1, len(self.endpoints))
        self.rcvhwm = receive_hwm(rcvhwm, max_event_bytes, per_socket)  # one socket per endpoint shares the budget
        self.idle = idle  # called between batches (buffer replay), in this thread
        self.context = context or zmq.Context.instance()
        self.connected = threading.Event()  # set after the first successful connection (tests, readiness)
        self.received = 0

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        # libzmq allocates a frame of the size its header announces: without this cap one frame could take GBs.
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(self.max_event_bytes) + 1)
        for prefix in (*HOST_PREFIXES, *VM_PREFIXES):
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        return sock

    def run(self) -> None:
        # One SUB socket per publisher, each replaced whole when its connection drops (see the module docstring).
        poller = zmq.Poller()
        subs = [self._open(endpoint, poller) for endpoint in self.endpoints]
        seen: set[str] = set()
        log.info("zmq listening", extra=kv(endpoints=self.endpoints))
        try:
            while not self.stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                for i, (sock, monitor) in enumerate(subs):
                    if sock in ready:
                        self._drain(sock)
                    if monitor in ready and self._monitor(monitor, seen):
                        self._drain(sock)  # what arrived complete before the drop
                        _close(sock, monitor, poller)
                        subs[i] = self._open(self.endpoints[i], poller)
                if self.idle is not None:
                    self.idle()
        finally:
            for sock, monitor in subs:
                _close(sock, monitor, poller)
            log.info("zmq stopped", extra=kv(received=self.received))

    def _open(self, endpoint: str, poller: zmq.Poller) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        sock = self._socket()
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        return sock, monitor

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        """Take what is waiting (up to zmq_batch_messages) and hand it over as one batch: one Redis round trip per
        burst."""
        batch: list[tuple[Event, str, float]] = []
        held = 0
        t = self.tuning
        until = time.monotonic() + t.zmq_batch_s
        for _ in range(t.zmq_batch_messages):
            if held > t.zmq_batch_bytes or time.monotonic() > until:
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            received_at = time.time()
            event = decode_frames(frames, self.max_event_bytes)
            self.received += 1  # after decoding: a message counted as received is also counted as rejected or not
            if event is not None:
                batch.append((event, "zmq", received_at))
                held += event_size_bytes(event)
        if self.received:
            metrics.LAST_EVENT.set(time.time())
        if batch:
            self.sink(batch)

    def _monitor(self, monitor: zmq.Socket[bytes], seen: set[str]) -> bool:
        """Count (re)connections; True when the connection dropped and the socket must be replaced."""
        dropped = False
        while monitor.poll(0):
            msg = recv_monitor_message(monitor)
            endpoint = msg.get("endpoint", b"")
            name = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)
            if msg["event"] == zmq.EVENT_CONNECTED:
                if name in seen:
                    metrics.ZMQ_RECONNECTS.inc()
                    log.info("zmq reconnected", extra=kv(endpoint=name))
                seen.add(name)
                self.connected.set()
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("zmq disconnected (publisher gone, or a frame over the size limit); reconnecting",
                            extra=kv(endpoint=name))
                dropped = True
        return dropped


def _close(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes], poller: zmq.Poller) -> None:
    poller.unregister(sock)
    poller.unregister(monitor)
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)


def receive_hwm(rcvhwm: int, max_event_bytes: int, queue_bytes: int | None) -> int:
    """The receive high-water mark (messages) that keeps libzmq's queue within `queue_bytes`: each message may be
    as large as the largest accepted frame. 0 (unbounded) only when no byte budget is given (benchmarks)."""
    if queue_bytes is None:
        return rcvhwm
    by_bytes = max(MIN_RCVHWM, queue_bytes // max_frame_bytes(max_event_bytes))
    return by_bytes if rcvhwm == 0 else min(rcvhwm, by_bytes)
