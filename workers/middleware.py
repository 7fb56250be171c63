"""What every task goes through, in one ordered list (the dramatiq-middleware idea): `run(task, call)`.

Each middleware wraps the rest of the chain: `around_task(task, call)` runs `call()` (the next middleware, the
flow last) and decides what its failure or its result means. The order matters and is read top down in
`workers.tasks.middleware_chain()`: retry outermost (it sees what the others let through), the Redis-outage ride-out
inside it (a retry could not even be published while Redis, the broker, is down), the VM-queue mark innermost
(re-done with the flow when Redis comes back). Metrics and audit entries of steps are `workers.hooks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Task

from oneha.backoff import Backoff, full_jitter
from oneha.workers.bootstrap import get_runtime
from oneha.workers.lock import LeaseLost
from oneha.workers.oned import is_transient
from oneha.workers.runtime import Paused

log = logging.getLogger("oneha.workers.tasks")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
Call = Callable[[], str]


class Middleware:
    def around_task(self, task: Task, call: Call) -> str:
        return call()


def run(middleware: Sequence[Middleware], task: Task, call: Call) -> str:
    """`call` through `middleware`, the first one outermost."""
    for mw in reversed(middleware):
        call = _bind(mw, task, call)
    return call()


def _bind(mw: Middleware, task: Task, call: Call) -> Call:
    return lambda: mw.around_task(task, call)


def _where(task: Task) -> str:
    return f"{task.name}{list(task.request.args or [])}"


class RetryTransient(Middleware):
    """Transient failures (oned unreachable after the gateway's own retries, Redis hiccups) are retried with
    exponential backoff and full jitter, capped at 30 s, at most `max_retries` times."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def around_task(self, task: Task, call: Call) -> str:
        try:
            return call()
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, REDIS_DOWN)):
                raise
            countdown = full_jitter(task.request.retries, 1.0, 30.0)
            log.warning("%s: transient failure (%s), retry in %.1fs", _where(task), exc, countdown)
            raise task.retry(exc=exc, countdown=countdown, max_retries=self.max_retries) from None


class StopQuietly(Middleware):
    """A lost lease (another worker holds it now) or a pause (the VM stays pending, its host incident sends it
    again) ends the task without a retry: its result names why."""

    def around_task(self, task: Task, call: Call) -> str:
        try:
            return call()
        except LeaseLost as exc:
            log.warning("%s: %s; stopping (another worker holds it now)", _where(task), exc)
            return "lease_lost"
        except Paused as exc:
            log.warning("%s: %s; stopping before acting", _where(task), exc)
            return "paused"


class RideOutRedis(Middleware):
    """If Redis is unreachable, run the rest again in place once it is back (for up to `outage_s`).

    Redis is also the broker: `task.retry` would fail to publish and Celery would drop the message, leaving the
    work to the incident watchdog a lease later. The flows are idempotent, so running one again from the start
    is safe, and the message stays unacknowledged meanwhile.
    """

    def __init__(self, outage_s: float) -> None:
        self.outage_s = outage_s

    def around_task(self, task: Task, call: Call) -> str:
        deadline = time.monotonic() + self.outage_s
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return call()
            except REDIS_DOWN as exc:
                delay_s = backoff.next_s()
                if time.monotonic() + delay_s > deadline:
                    raise
                log.warning("%s: redis unavailable (%s), again in %.1fs", _where(task), type(exc).__name__, delay_s)
                time.sleep(delay_s)  # backoff while Redis is down


class MarkVmQueueMoving(Middleware):
    """A task declared `moves_vm_queue=True` (a task of the VM queue) says so as it starts (`keys.vm_queue_moving`,
    read by a host incident's re-run)."""

    def around_task(self, task: Task, call: Call) -> str:
        if getattr(task, "moves_vm_queue", False):
            get_runtime().mark_vm_queue_moving()
        return call()


def flow_call(fn: Callable[..., str], *args: Any) -> Call:
    """The innermost call: the flow with the process's runtime (built on first use, inside the ride-out)."""
    return lambda: fn(get_runtime(), *args)
