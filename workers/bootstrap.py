"""The worker process around the flows: its one `Runtime`, its heartbeat and metrics endpoint, its warm-up, and
the Celery signals that start them.

Imported by `tasks` (the Celery app's `include`), so the signals are connected when the worker loads its tasks,
before it is ready. `runtime` below it knows nothing of Celery or of this process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals
from prometheus_client import start_http_server

from oneha import heartbeat
from oneha.celeryconf import warm_up_producer
from oneha.keys import VM_QUEUE
from oneha.settings import load_settings
from oneha.workers.app import app
from oneha.workers.hooks import TASK_RETRIES
from oneha.workers.runtime import Runtime

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime.build(load_settings(), _send, _send_many)
        return _runtime


def _send(name: str, args: list[Any], queue: str) -> None:
    app.send_task(name, args=args, queue=queue)


def _send_many(name: str, args_list: list[list[Any]], queue: str) -> None:
    with app.producer_or_acquire() as producer:
        for args in args_list:
            app.send_task(name, args=args, queue=queue, producer=producer)


def _warm_up() -> None:
    """Pay the first task's one-off costs at start (the broker connection for the VM tasks a host task sends), not
    during the first recovery. The flows are imported with the tasks already."""
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
        try:
            server, _ = start_http_server(port, addr=bind)
        except OSError as exc:
            log.error("worker metrics: cannot listen on %s:%d (%s); give each worker on this machine its own port "
                      "(oneha worker --instance N, or ONEHA_WORKER__METRICS_PORT)", bind, port, exc.strerror)
        else:
            log.info("worker metrics on http://%s:%d/metrics", bind, server.server_port)
    _warm_up()


@signals.task_retry.connect(weak=False)
def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    name = getattr(sender, "name", None) or getattr(request, "task", "unknown")
    TASK_RETRIES.labels(str(name)).inc()


@signals.worker_ready.connect(weak=False)
def _on_ready(sender: Any = None, **_: Any) -> None:
    start_metrics_and_heartbeat(str(getattr(sender, "hostname", "worker")))
