"""Reads the bridge's Redis stream through a consumer group: every subscriber reads, each entry goes to one.

An entry is acknowledged only once its report() returned, i.e. once the incident exists in Redis: that is the
durable handover from the hook. A subscriber that dies holding entries leaves them pending; the others take them
over with XAUTOCLAIM when they have been idle for `claim_idle_s`. Malformed entries are acknowledged and counted,
or they would come back forever.

Every subscriber start is a new consumer name (host-pid-random), so the group would collect dead consumers for
ever: consumers idle for `stale_consumer_s` with nothing pending are deleted (their abandoned entries were claimed
by then). Check and delete run in one script, so a consumer that reads an entry meanwhile is never deleted with it;
a live but quiet consumer that is deleted loses nothing (it holds nothing) and is re-created by its next read.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from oneha.backoff import Backoff
from oneha.keys import BRIDGE_GROUP, Keys
from oneha.opennebula import (
    DEFAULT_MAX_EVENT_BYTES,
    ErrorKind,
    Event,
    EventError,
    HostEvent,
    OnedClient,
    VmEvent,
    classify_error,
    decode_template,
)
from oneha.subscriber import metrics
from oneha.subscriber.intake import Intake
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.stream")


# KEYS: stream. ARGV: group, min idle ms, our name. Delete the group's consumers idle that long with nothing pending.
_PRUNE_CONSUMERS = """
local deleted = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    deleted = deleted + 1
  end
end
return deleted
"""


class Retry(Exception):
    """The entry could not be handled now (oned unreachable): leave it pending, try again later."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StreamConsumer:
    def __init__(self, r: redis.Redis, keys: Keys, intake: Intake, oned: Callable[[], OnedClient],
                 stop: threading.Event, name: str | None = None, claim_idle_s: float = 30.0,
                 block_ms: int = 500, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 stale_consumer_s: float = 3600.0) -> None:
        self.r = r
        self.stream = keys.bridge_stream
        self.intake = intake
        self.oned = oned
        self.stop = stop
        self.name = name or consumer_name()
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.block_ms = block_ms
        self.max_event_bytes = max_event_bytes
        self.stale_consumer_ms = int(stale_consumer_s * 1000)
        self._prune = r.register_script(_PRUNE_CONSUMERS)
        self._group_ready = False
        self._retry_pending_at = 0.0

    def run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self.stop.is_set():
            try:
                self.poll_once()
                backoff.reset()
            except redis.RedisError as exc:
                metrics.REDIS_ERRORS.labels("stream").inc()
                self._group_ready = False
                delay_s = backoff.next_s()
                log.warning("stream: redis unavailable", extra=kv(error=type(exc).__name__,
                                                                   retry_in_s=delay_s))
                self.stop.wait(delay_s)

    def poll_once(self) -> int:
        """Claim abandoned entries, retry our own pending ones, read new ones. Returns entries handled."""
        self._ensure_group()
        done = 0
        now = time.monotonic()
        if now >= self._retry_pending_at:
            self._retry_pending_at = now + self.claim_idle_ms / 1000
            # Our own pending entries (a previous Retry) and other consumers' abandoned ones.
            done += self._handle(self.r.xreadgroup(BRIDGE_GROUP, self.name, {self.stream: "0"}, count=100))
            claimed = self.r.xautoclaim(self.stream, BRIDGE_GROUP, self.name, self.claim_idle_ms, "0-0",
                                        count=100)
            done += self._handle([(self.stream, claimed[1])])
            self.prune_consumers()
        done += self._handle(self.r.xreadgroup(BRIDGE_GROUP, self.name, {self.stream: ">"}, count=100,
                                               block=self.block_ms))
        return done

    def prune_consumers(self) -> int:
        """Delete consumers of the group idle for `stale_consumer_s` with nothing pending; how many."""
        deleted = int(self._prune(keys=[self.stream], args=[BRIDGE_GROUP, self.stale_consumer_ms, self.name]))
        if deleted:
            log.info("stream: stale consumers deleted", extra=kv(count=deleted))
        return deleted

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.stream, BRIDGE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _handle(self, response: Any) -> int:
        done = 0
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                if fields is None:  # deleted (trimmed) while pending
                    self.r.xack(self.stream, BRIDGE_GROUP, entry_id)
                    continue
                if self._entry(entry_id, fields):
                    done += 1
        return done

    def _entry(self, entry_id: Any, fields: dict[str, Any]) -> bool:
        received_at = _float(fields.get("t"), time.time())
        try:
            event = self.decode(fields)
        except EventError as exc:
            metrics.EVENTS_REJECTED.labels(exc.reason).inc()
            log.warning("bridge entry rejected", extra=kv(entry=entry_id, reason=exc.reason,
                                                          detail=str(exc)[:200]))
            self.r.xack(self.stream, BRIDGE_GROUP, entry_id)
            return False
        except Retry as exc:
            log.warning("bridge entry postponed", extra=kv(entry=entry_id, reason=str(exc)))
            return False
        self.intake.handle(event, "bridge", received_at)  # RedisError propagates: not acked, read again
        self.r.xack(self.stream, BRIDGE_GROUP, entry_id)
        return True

    def decode(self, fields: dict[str, Any]) -> Event:
        kind = fields.get("kind", "")
        data = fields.get("data", "")
        if kind == "template":
            return decode_template(data, self.max_event_bytes)
        if kind in ("hid", "vm_id"):
            try:
                rid = int(data)
            except ValueError:
                raise EventError("bad_id", data[:40]) from None
            return self._fetch(kind, rid)
        raise EventError("bad_entry", kind[:40])

    def _fetch(self, kind: str, rid: int) -> Event:
        """A bare id (oned.conf hooks): ask oned what the object is now."""
        try:
            if kind == "hid":
                host = self.oned().host_info(rid)
                return HostEvent(host.id, host.state, host)
            vm = self.oned().vm_info(rid)
            return VmEvent(vm.id, vm.state, vm.lcm_state, vm)
        except Exception as exc:
            metrics.ONED_ERRORS.labels("stream").inc()
            if classify_error(exc) is ErrorKind.TRANSIENT:
                raise Retry(f"oned: {type(exc).__name__}") from exc
            raise EventError("oned_" + classify_error(exc).value, type(exc).__name__) from exc


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
