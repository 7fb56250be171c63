"""Thin Celery tasks, named by the constants in oneha/keys.py; the logic lives in plain functions.

Retries: only for transient failures (oned unreachable after the gateway's own retries, Redis hiccups), with
exponential backoff and full jitter, capped at 30 s (no long countdowns: REFERENCE §6), bounded by `max_retries`.
Past that the incident stays due and the dispatcher's watchdog sends it again after its lease. Redis being
unreachable is ridden out in place first (`_through_redis_outage`): Redis is the broker too, so a retry could
not even be published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Task

from oneha.backoff import Backoff, full_jitter
from oneha.keys import TASK_RECOVER_HOST, TASK_RECOVER_VM, TASK_VM_INCIDENT
from oneha.workers.app import app
from oneha.workers.bootstrap import get_runtime
from oneha.workers.host_flow import recover_host as host_flow
from oneha.workers.lock import LeaseLost
from oneha.workers.oned import is_transient
from oneha.workers.runtime import Paused
from oneha.workers.vm_flows import handle_vm_incident
from oneha.workers.vm_task import recover_host_vm

log = logging.getLogger(__name__)
MAX_RETRIES = 5
REDIS_OUTAGE_S = 30.0  # a Redis restart or Sentinel failover is ridden out in place for this long


def run_task(task: Task, fn: Callable[..., str], *args: Any) -> str:
    try:
        return _through_redis_outage(task, fn, *args)
    except LeaseLost as exc:
        log.warning("%s%s: %s; stopping (another worker holds it now)", task.name, list(args), exc)
        return "lease_lost"
    except Paused as exc:  # a VM task of a host incident: the VM stays pending, the host incident re-sends it
        log.warning("%s%s: %s; stopping before acting", task.name, list(args), exc)
        return "paused"
    except Exception as exc:
        if is_transient(exc) or isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            countdown = full_jitter(task.request.retries, 1.0, 30.0)
            log.warning("%s%s: transient failure (%s), retry in %.1fs", task.name, list(args), exc, countdown)
            raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from None
        raise


def _through_redis_outage(task: Task, fn: Callable[..., str], *args: Any) -> str:
    """Run the flow; if Redis is unreachable, run it again in place once it is back (up to REDIS_OUTAGE_S).

    Redis is also the broker: `task.retry` would fail to publish and Celery would drop the message, leaving the
    work to the incident watchdog a lease later. The flows are idempotent, so running one again from the start
    is safe, and the message stays unacknowledged meanwhile.
    """
    deadline = time.monotonic() + REDIS_OUTAGE_S
    backoff = Backoff(0.2, 5.0)
    while True:
        try:
            rt = get_runtime()
            if task.name != TASK_RECOVER_HOST:
                rt.mark_vm_queue_moving()
            return fn(rt, *args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            delay_s = backoff.next_s()
            if time.monotonic() + delay_s > deadline:
                raise
            log.warning("%s%s: redis unavailable (%s), again in %.1fs", task.name, list(args),
                        type(exc).__name__, delay_s)
            time.sleep(delay_s)  # backoff while Redis is down


@app.task(bind=True, name=TASK_RECOVER_HOST, max_retries=MAX_RETRIES, acks_late=True)
def recover_host(self: Task, incident_id: int) -> str:
    return run_task(self, host_flow, int(incident_id))


@app.task(bind=True, name=TASK_RECOVER_VM, max_retries=MAX_RETRIES, acks_late=True)
def recover_vm(self: Task, incident_id: int, vm_id: int) -> str:
    return run_task(self, recover_host_vm, int(incident_id), int(vm_id))


@app.task(bind=True, name=TASK_VM_INCIDENT, max_retries=MAX_RETRIES, acks_late=True)
def vm_incident(self: Task, incident_id: int) -> str:
    return run_task(self, handle_vm_incident, int(incident_id))
