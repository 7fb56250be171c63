"""Celery settings shared by the workers (consumers) and the subscriber (producer), chosen for safety.

Every process on the same broker must use the same transport options: with Redis, the shortest
visibility timeout of any client wins (REFERENCE §6).
"""

from __future__ import annotations

from typing import Any

from oneha.keys import VM_QUEUE
from oneha.settings import Settings

# A flow step never runs longer than this; both stay far below the visibility timeout, so a task still running is
# never delivered a second time by the broker. (A dead worker's incident is re-dispatched by the due-time
# watchdog long before the visibility timeout would.)
TASK_SOFT_TIME_LIMIT_S = 240
TASK_TIME_LIMIT_S = 300


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility_s = settings.broker.visibility_timeout_s
    assert visibility_s > TASK_TIME_LIMIT_S, "time limits must stay below the visibility timeout"
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": _transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": VM_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # Flows are idempotent (they re-read oned before acting), so acking after the run is safe and means a
        # message is not lost with a worker that dies mid-task.
        "task_acks_late": True,
        # A child killed mid-task: retried like Task.retry, bounded by the task's max_retries (Celery 5.7),
        # rather than requeued forever (task_reject_on_worker_lost) or dropped (acks_late alone).
        "task_retry_on_worker_lost": True,
        # Broker connection lost (Redis restarted): let running tasks finish. They are idempotent and re-check
        # their leases, so a redelivered copy stands back; cancelling would stop a recovery mid-step for nothing.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT_S,
        "task_time_limit": TASK_TIME_LIMIT_S,
        # Flower shows tasks from the workers' received/started/succeeded events. The producer's extra "task-sent"
        # event is left off: it costs ~0.3 ms per send, on the critical path of a host flow sending 50 VM tasks.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
    }


def warm_up_producer(app: Any, queues: tuple[str, ...]) -> None:
    """Connect to the broker and declare `queues` now rather than on the first send, which is on the critical path
    of a recovery (~15 ms). Raises what the broker raises: callers decide whether that matters."""
    with app.producer_or_acquire() as producer:
        for queue in queues:
            producer.maybe_declare(app.amqp.queues[queue])


def _transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.broker.visibility_timeout_s}
    master = settings.broker.sentinel_master or (settings.redis.sentinel_master if settings.broker.url is None
                                                  else None)
    if master:
        options["master_name"] = master  # kombu's sentinel:// transport asks the Sentinels for this master
    return options
