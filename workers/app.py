"""The Celery app of the workers. Configured lazily from oneha's settings the first time its config is read, so
importing this module is cheap; `celery -A oneha.workers.app:app flower` gets the very same settings (same visibility
timeout: with Redis the shortest one of any client wins, REFERENCE §6).

Settings (oneha/celeryconf.py explains each): late acks (every task is idempotent: it re-reads oned and Redis
before acting), `task_retry_on_worker_lost` bounded by each task's `max_retries`, prefetch 1, JSON only, time
limits below the visibility timeout, no long countdowns (the incident's due time is the long-term watchdog).
Routes put host tasks on `oneha.hosts` and VM tasks on `oneha.vms`, so a flood of VM tasks never delays the
decision about another failed host.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from oneha.celeryconf import celery_config
from oneha.keys import HOST_QUEUE, TASK_RECOVER_HOST, TASK_RECOVER_VM, TASK_VM_INCIDENT, VM_QUEUE
from oneha.settings import load_settings

app = Celery("oneha", include=["oneha.workers.tasks"])


def worker_config() -> dict[str, Any]:
    conf = celery_config(load_settings())
    conf["task_routes"] = {TASK_RECOVER_HOST: {"queue": HOST_QUEUE}, TASK_RECOVER_VM: {"queue": VM_QUEUE},
                           TASK_VM_INCIDENT: {"queue": VM_QUEUE}}
    return conf


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(worker_config())

