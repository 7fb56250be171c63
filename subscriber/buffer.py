"""Keeps the ZeroMQ path alive while Redis is down: a bounded FIFO of decoded events, replayed in order.

Overflow is counted and logged, never silent; whatever is lost the reconciler finds on its next pass once Redis is
back. Only the ZeroMQ input needs this: the bridge's events wait in the Redis stream, the reconciler re-reads oned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import redis

from oneha.backoff import Backoff
from oneha.opennebula import Event, event_size_bytes
from oneha.subscriber import metrics
from oneha.subscriber.intake import Intake
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.buffer")

REPLAY_CHUNK = 500


class BufferedIntake:
    def __init__(self, intake: Intake, capacity: int, backoff_base_s: float = 0.1, backoff_max_s: float = 5.0,
                 capacity_bytes: int = 64 << 20) -> None:
        self.intake = intake
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes  # estimated memory of the decoded events held (event_size_bytes)
        self._held_bytes = 0
        self._pending: deque[tuple[Event, str, float]] = deque()
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = Backoff(backoff_base_s, backoff_max_s)

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, event: Event, source: str, received_at: float) -> None:
        self.submit_many([(event, source, received_at)])

    def submit_many(self, batch: list[tuple[Event, str, float]]) -> None:
        """Called by the receiving thread; never raises for Redis trouble. A batch that failed half-way is
        buffered whole: reporting a failure twice only counts one more report on its incident."""
        with self._lock:
            if not self._pending:
                try:
                    self.intake.handle_many(batch)
                    return
                except redis.RedisError as exc:
                    self._fail(exc)
            # Keep order: once something is buffered, everything queues behind it until replayed.
            for event, source, received_at in batch:
                self._push(event, source, received_at)

    def flush(self) -> int:
        """Replay buffered events if the backoff allows; returns how many went through."""
        done = 0
        with self._lock:
            if not self._pending or time.monotonic() < self._retry_at:
                return 0
            while self._pending:
                chunk = [self._pending[i] for i in range(min(REPLAY_CHUNK, len(self._pending)))]
                try:
                    self.intake.handle_many(chunk)
                except redis.RedisError as exc:
                    self._fail(exc)
                    break
                for _ in chunk:
                    self._held_bytes -= event_size_bytes(self._pending.popleft()[0])
                done += len(chunk)
            if not self._pending:
                self._backoff.reset()
                log.info("buffer replayed", extra=kv(events=done))
        return done

    def _push(self, event: Event, source: str, received_at: float) -> None:
        size = event_size_bytes(event)
        if len(self._pending) >= self.capacity or self._held_bytes + size > self.capacity_bytes:
            metrics.EVENTS_DROPPED.labels("buffer_full").inc()
            log.warning("event dropped: buffer full (the reconciler will find it)",
                        extra=kv(capacity=self.capacity, capacity_bytes=self.capacity_bytes, source=source))
            return
        self._pending.append((event, source, received_at))
        self._held_bytes += size

    def _fail(self, exc: Exception) -> None:
        metrics.REDIS_ERRORS.labels("intake").inc()
        delay_s = self._backoff.next_s()
        self._retry_at = time.monotonic() + delay_s
        log.warning("redis unavailable, buffering events", extra=kv(
            error=type(exc).__name__, retry_in_s=round(delay_s, 2), buffered=len(self._pending)))
