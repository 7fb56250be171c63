"""What a flow needs at hand: settings, Redis, the incident store, the oned gateway, hooks, a task sender.

One `Runtime` per worker process, built lazily on the first task (`bootstrap.get_runtime`, which also starts the
process's heartbeat and metrics); tests build their own with `Runtime.build(settings, send=...)` and call the flows
as plain functions. This is the bottom layer of the flows: it imports no flow, no Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from oneha import redisconn
from oneha.incidents import Incident, IncidentStore, Status
from oneha.keys import Keys
from oneha.settings import Settings
from oneha.workers.hooks import Hooks
from oneha.workers.lock import Lease
from oneha.workers.oned import OnedGateway

log = logging.getLogger(__name__)



class Paused(Exception):
    """An operator paused recovery (`oneha incidents pause`): act on nothing, leave the incident to wait."""


Sender = Callable[[str, list[Any], str], None]  # task name, args, queue
BulkSender = Callable[[str, list[list[Any]], str], None]  # task name, args of each task (in order), queue


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    keys: Keys
    store: IncidentStore
    oned: OnedGateway
    hooks: Hooks
    send: Sender
    send_many: BulkSender | None = None
    _extended: dict[int, float] = field(default_factory=dict, repr=False)
    _extend_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _moving_marked_at: float = field(default=0.0, repr=False)
    _pause_seen: tuple[float, dict[str, Any] | None] = field(default=(-1e9, None), repr=False)

    @classmethod
    def build(cls, settings: Settings, send: Sender, send_many: BulkSender | None = None) -> Runtime:
        client = redisconn.client(settings.redis)
        keys = Keys(settings.redis.key_prefix)
        store = IncidentStore(client, keys, settings.audit.retention_s, settings.audit.max_incidents)
        hooks = Hooks()
        oned = OnedGateway.connect(settings.oned, settings.oned_session, client, keys, hooks)
        return cls(settings, client, keys, store, oned, hooks, send, send_many)

    def send_all(self, name: str, args_list: list[list[Any]], queue: str) -> None:
        """Send one task per args, in order (one broker connection for all of them when the sender allows)."""
        if self.send_many is not None:
            self.send_many(name, args_list, queue)
            return
        for args in args_list:
            self.send(name, args, queue)

    def lease(self, resource: Any, resource_id: int) -> Lease:
        r = self.settings.redis
        return Lease(self.redis, self.keys, resource, resource_id, self.settings.worker.lock_ttl_s,
                     r.wait_replicas, r.wait_timeout_ms)

    def extend(self, incident_id: int, extra_s: float = 0.0, force: bool = False) -> None:
        """Push the incident's watchdog (its due time) a lease ahead: we are working on it.

        At most once per third of a lease per incident and process (50 VM tasks of one incident need not write it
        50 times): when skipped, this process pushed it less than lease/3 ago, so it is still >= 2/3 of a lease
        ahead. If someone else moved it meanwhile, the worst case is one early re-dispatch, which is idempotent.
        """
        lease = self.settings.worker.task_lease_s
        now = time.monotonic()
        if not force and extra_s <= 0:
            with self._extend_lock:
                last = self._extended.get(incident_id)
                if last is not None and now - last < lease / 3:
                    return
                self._extended[incident_id] = now
                if len(self._extended) > 10_000:
                    self._extended.clear()
        self.store.schedule(incident_id, time.time() + lease + extra_s)

    def pause_reason(self) -> str | None:
        """Why recovery is paused, or None. Asks Redis at most every worker.pause_check_s per process, so the gate
        before each action costs no round trip on the critical path of a recovery."""
        now = time.monotonic()
        seen_at, pause = self._pause_seen
        if now - seen_at >= self.settings.worker.pause_check_s:
            pause = self.store.paused()
            self._pause_seen = (now, pause)
        if pause is None:
            return None
        return f"recovery paused by an operator: {pause.get('reason') or 'no reason given'}"

    def check_not_paused(self) -> None:
        reason = self.pause_reason()
        if reason is not None:
            raise Paused(reason)

    def mark_vm_queue_moving(self) -> None:
        """A task from the VM queue starts: say so in `keys.vm_queue_moving` (read by a host incident's re-run).

        At most one write per process per quarter lease (and per second): the reader only asks "within a lease?".
        """
        now = time.monotonic()
        lease = self.settings.worker.task_lease_s
        if now - self._moving_marked_at < min(1.0, lease / 4):
            return
        self._moving_marked_at = now
        self.redis.set(self.keys.vm_queue_moving, round(time.time(), 3), ex=max(1, int(lease * 2)))


@dataclass
class Flow:
    """One run of a flow for one incident."""

    rt: Runtime
    incident: Incident
    lease: Lease | None = None
    started: float = field(default_factory=time.monotonic)
    trail: list[list[Any]] | None = None  # steps collected for one audit entry (VM tasks of a host incident)

    def check_lease(self) -> None:
        """Right before a mutating call: our token still holds the lock, asked in Redis."""
        if self.lease is not None:
            self.lease.check()

    def check_lease_local(self) -> None:
        """Between actions (waits, reads): the last renewal confirmed by Redis still covers now. No round trip."""
        if self.lease is not None:
            self.lease.check_local()

    def emit(self, event: str, **fields: Any) -> None:
        """Report an event of this flow; the hooks write it to the audit trail (flows never write it themselves)."""
        self.rt.hooks.event(self, event, **fields)

    def recheck_later(self) -> None:
        """Look at the incident again in `storm_recheck_s` (its due time): what a held or paused flow waits on."""
        self.rt.store.schedule(self.incident.id, time.time() + self.rt.settings.worker.storm_recheck_s)

    def hold(self, reason: str, alert: str | None = None) -> str:
        """HELD (storm guard, operator's pause), looked at again every `storm_recheck_s`; `alert` said only when the
        incident becomes held, not at each re-check."""
        if alert is not None and self.incident.status is not Status.HELD:
            self.rt.hooks.alert(self, alert)
        self.rt.store.set_status(self.incident.id, Status.HELD, reason)
        self.recheck_later()
        return "held"
