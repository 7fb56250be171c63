"""What a flow needs at hand: settings, Redis, the incident store, the oned gateway, hooks, a task sender.

One `Runtime` per worker process, built lazily on the first task (`get_runtime`); tests build their own with
`Runtime.build(settings, send=...)` and call the flows as plain functions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from oneha import heartbeat, redisconn
from oneha.incidents import Incident, IncidentStore, Status
from oneha.keys import Keys
from oneha.settings import Settings, load_settings
from oneha.workers.hooks import Hooks
from oneha.workers.lock import Lease
from oneha.workers.oned import OnedGateway

log = logging.getLogger(__name__)

PAUSE_CHECK_S = 0.5  # how stale a process's view of the pause flag may be: a pause acts within this


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
        client = redisconn.connect(settings.redis, decode_responses=True, health_check_interval=30)
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
        """Why recovery is paused, or None. Asks Redis at most every PAUSE_CHECK_S per process, so the gate before
        each action costs no round trip on the critical path of a recovery."""
        now = time.monotonic()
        seen_at, pause = self._pause_seen
        if now - seen_at >= PAUSE_CHECK_S:
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


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from oneha.workers.app import app

            def send(name: str, args: list[Any], queue: str) -> None:
                app.send_task(name, args=args, queue=queue)

            def send_many(name: str, args_list: list[list[Any]], queue: str) -> None:
                with app.producer_or_acquire() as producer:
                    for args in args_list:
                        app.send_task(name, args=args, queue=queue, producer=producer)

            _runtime = Runtime.build(load_settings(), send, send_many)
        return _runtime


def _warm_up() -> None:
    """Pay the first task's one-off costs at start (flow imports, broker connection for the VM tasks a host task
    sends), not during the first recovery."""
    import oneha.workers.host_flow
    import oneha.workers.vm_flows  # noqa: F401
    from oneha.celeryconf import warm_up_producer
    from oneha.keys import VM_QUEUE
    from oneha.workers.app import app

    try:
        warm_up_producer(app, (VM_QUEUE,))
    except Exception as exc:  # the first send connects (and retries) anyway
        log.warning("broker not reachable at start: %s", type(exc).__name__)


def start_metrics_and_heartbeat(hostname: str) -> None:
    """In a worker process: beat `keys.heartbeat` so tools see the worker, and serve Prometheus metrics.

    The heartbeat comes first and does not depend on the metrics port: a port already taken (two workers on one
    machine with the same port) costs the metrics of this worker, said in one error line, not its presence."""
    rt = get_runtime()
    # The worker runs until its process ends: the stop event is never set, the hash entry simply ages out.
    threading.Thread(target=heartbeat.run, args=(rt.redis, rt.keys, f"worker:{hostname}", threading.Event()),
                     name="oneha-heartbeat", daemon=True).start()
    port, bind = rt.settings.worker.metrics_port, rt.settings.worker.metrics_bind
    if port is not None:
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(port, addr=bind)
        except OSError as exc:
            log.error("worker metrics: cannot listen on %s:%d (%s); give each worker on this machine its own port "
                      "(oneha worker --instance N, or ONEHA_WORKER__METRICS_PORT)", bind, port, exc.strerror)
        else:
            log.info("worker metrics on http://%s:%d/metrics", bind, server.server_port)
    _warm_up()
