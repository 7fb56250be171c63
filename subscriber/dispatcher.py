"""Hands due incidents to the workers: claim_due -> status QUEUED (if it was WAITING) -> send_task by name.

The claim pushes the incident's due time to the end of a lease, so the dispatcher is also the watchdog of dead
workers: a worker extends the lease while it works; an incident whose lease ran out is due again and sent again
(the flows are idempotent). Several dispatchers (active-active subscribers) never send one incident twice within a
lease: the claim is atomic.

QUEUED is set *before* sending, with a compare-and-set from WAITING: after the send a worker may already have moved
the incident on (RUNNING), and a host that came back may have cancelled it meanwhile; neither must be overwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from oneha.celeryconf import warm_up_producer
from oneha.incidents import Incident, IncidentStore, Kind, is_closed
from oneha.keys import HOST_QUEUE, TASK_RECOVER_HOST, TASK_VM_INCIDENT, VM_QUEUE
from oneha.subscriber import metrics
from oneha.subscriber.logs import kv

log = logging.getLogger("oneha.subscriber.dispatcher")



def route(kind: Kind) -> tuple[str, str]:
    """(task name, queue) of an incident kind."""
    if kind is Kind.HOST:
        return TASK_RECOVER_HOST, HOST_QUEUE
    return TASK_VM_INCIDENT, VM_QUEUE


class Dispatcher:
    def __init__(self, store: IncidentStore, celery: Any, lease_s: float, interval_s: float,
                 stop: threading.Event, wake: threading.Event | None = None, retry_s: float = 5.0) -> None:
        self.store = store
        self.retry_s = retry_s  # a failed send (broker down) is retried this soon rather than after a whole lease
        self.celery = celery
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.stop = stop
        self.wake = wake or threading.Event()
        self.sent = 0

    def run(self) -> None:
        self.warm_up()
        while not self.stop.is_set():
            try:
                self.tick()
            except redis.RedisError as exc:
                metrics.REDIS_ERRORS.labels("dispatcher").inc()
                log.warning("dispatch: redis unavailable", extra=kv(error=type(exc).__name__))
            # Woken early when an incident with no grace period is opened.
            self.wake.wait(self.interval_s)
            self.wake.clear()

    def warm_up(self) -> None:
        """Connect to the broker and declare the queues now, not on the first incident (~15 ms saved there)."""
        try:
            warm_up_producer(self.celery, (HOST_QUEUE, VM_QUEUE))
        except Exception as exc:  # the broker may be down at start: the first send will connect (and retry)
            log.warning("broker not reachable yet", extra=kv(error=type(exc).__name__))

    def tick(self) -> int:
        sent = 0
        for incident_id in self.store.claim_due(self.lease_s):
            incident = self.store.get(incident_id)
            if incident is None or not incident.status.is_open:
                self.store.unschedule(incident_id)
                continue
            if self._dispatch(incident):
                sent += 1
        return sent

    def _dispatch(self, incident: Incident) -> bool:
        previous = self.store.mark_queued(incident.id)
        if previous is None or is_closed(previous):
            return False  # closed between the claim and now
        name, queue = route(incident.kind)
        try:
            self.celery.send_task(name, args=[incident.id], queue=queue)
        except Exception as exc:  # broker trouble: kombu raises its own OperationalError family
            log.warning("send_task failed", extra=kv(incident=incident.id, task=name, error=type(exc).__name__))
            self.store.schedule(incident.id, time.time() + self.retry_s)
            return False
        metrics.TASKS_SENT.labels(name).inc()
        self.sent += 1
        what = "queued" if previous == "waiting" else f"re-dispatched (was {previous}, lease ran out)"
        self.store.audit(incident.id, "dispatched", task=name, queue=queue, status_before=previous)
        log.info("incident " + what, extra=kv(incident=incident.id, task=name, queue=queue))
        return True


def make_celery(settings: Any) -> Any:
    """The subscriber is a Celery producer only; tasks go by name, so nothing of workers/ is imported."""
    from celery import Celery

    from oneha.celeryconf import celery_config

    app = Celery("oneha-subscriber")
    app.conf.update(celery_config(settings))
    return app
