"""Thin Celery tasks, named by the constants in oneha/keys.py; the logic lives in plain functions.

Every task runs its flow through `middleware_chain()` (workers/middleware.py). Retries: only for transient failures,
with exponential backoff and full jitter, capped at 30 s (no long countdowns: REFERENCE §6), bounded by
`worker.task_max_retries`. Past that the incident stays due and the dispatcher's watchdog sends it again after
its lease.
Redis being unreachable is ridden out in place first: Redis is the broker too, so a retry could not even be
published. The tasks of the VM queue declare `moves_vm_queue=True`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery import Task

from oneha.keys import TASK_RECOVER_HOST, TASK_RECOVER_VM, TASK_VM_INCIDENT
from oneha.settings import load_settings
from oneha.workers import middleware
from oneha.workers.app import app
from oneha.workers.host_flow import recover_host as host_flow
from oneha.workers.middleware import MarkVmQueueMoving, RetryTransient, RideOutRedis, StopQuietly
from oneha.workers.vm_flows import handle_vm_incident
from oneha.workers.vm_task import recover_host_vm


@functools.cache
def middleware_chain() -> tuple[middleware.Middleware, ...]:
    """The chain every task runs through, built once per process from `[worker]` (task_max_retries,
    redis_outage_s): retry outermost, then lost lease / pause, Redis outage, the VM-queue mark."""
    w = load_settings().worker
    return (RetryTransient(w.task_max_retries), StopQuietly(), RideOutRedis(w.redis_outage_s), MarkVmQueueMoving())


def run_task(task: Task, fn: Callable[..., str], *args: Any) -> str:
    """The task's flow through `middleware_chain()` (retry, lost lease and pause, Redis outage, VM-queue mark)."""
    return middleware.run(middleware_chain(), task, middleware.flow_call(fn, *args))


@app.task(bind=True, name=TASK_RECOVER_HOST, acks_late=True)
def recover_host(self: Task, incident_id: int) -> str:
    return run_task(self, host_flow, int(incident_id))


@app.task(bind=True, name=TASK_RECOVER_VM, acks_late=True,
          moves_vm_queue=True)
def recover_vm(self: Task, incident_id: int, vm_id: int) -> str:
    return run_task(self, recover_host_vm, int(incident_id), int(vm_id))


@app.task(bind=True, name=TASK_VM_INCIDENT, acks_late=True,
          moves_vm_queue=True)
def vm_incident(self: Task, incident_id: int) -> str:
    return run_task(self, handle_vm_incident, int(incident_id))
