"""Wires the subscriber: ZeroMQ listener, bridge-stream consumer, dispatcher and reconciler, one thread each.

SIGTERM/SIGINT set one stop event; every loop waits on it (or polls with a short timeout), so all threads end
within about a second, sockets are closed, and the process exits 0.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from functools import cached_property
from types import FrameType
from typing import Any

from oneha import heartbeat, redisconn
from oneha.incidents import IncidentStore
from oneha.keys import Keys
from oneha.opennebula import OnedClient, make_server
from oneha.settings import Settings
from oneha.subscriber import metrics
from oneha.subscriber.buffer import BufferedIntake
from oneha.subscriber.dispatcher import Dispatcher, make_celery
from oneha.subscriber.hostcheck import HostCheck
from oneha.subscriber.intake import Intake
from oneha.subscriber.logs import kv
from oneha.subscriber.reconciler import Reconciler
from oneha.subscriber.stream import StreamConsumer
from oneha.subscriber.zmq_listener import ZmqListener

log = logging.getLogger("oneha.subscriber")

ALL = ("zmq", "stream", "dispatcher", "reconciler")


def freeze_gc() -> None:
    """Put everything alive after start-up (modules, settings, clients: ~50,000 objects) out of the cyclic
    collector's reach. Otherwise the first full collection walks them all, and it comes during the first burst of
    events, when allocation is highest: measured as an 11-16 ms stop of the receiving thread, which alone made the
    p99 latency of the subscriber bench. Cheap to call again after a late import (the Celery app)."""
    gc.collect()
    gc.freeze()


class Service:
    def __init__(self, settings: Settings, components: Iterable[str] = ALL, celery: Any | None = None,
                 oned: Callable[[], OnedClient] | None = None) -> None:
        self.settings = settings
        self.components = tuple(components)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.r = redisconn.client(settings.redis)
        self.store = IncidentStore(self.r, Keys(settings.redis.key_prefix), settings.audit.retention_s,
                                   settings.audit.max_incidents)
        check = HostCheck(self.oned, on_contradicted_failure=lambda: self.reconciler.poke())
        self.intake = Intake(self.store, settings.policy, on_opened=self.wake, check=check)
        sub = settings.subscriber
        self.buffer = BufferedIntake(self.intake, sub.buffer_events, capacity_bytes=sub.buffer_bytes)
        self._celery = celery
        self._oned_factory = oned
        self.threads: list[threading.Thread] = []
        self.metrics_port: int | None = None
        self.listener = ZmqListener(sub.zmq_endpoints, self.buffer.submit_many, self.stop_event, sub.zmq_rcvhwm,
                                    sub.max_event_bytes, idle=self.buffer.flush, queue_bytes=sub.zmq_queue_bytes,
                                    tuning=sub)
        self.stream = StreamConsumer(self.r, self.store.keys, self.intake, self.oned, self.stop_event,
                                     max_event_bytes=sub.max_event_bytes,
                                     stale_consumer_s=sub.bridge_stale_consumer_s)
        broker_is_redis = settings.broker_url.startswith("redis")  # (a Sentinel broker: no queue-length check)
        broker = redisconn.client(settings.broker_redis()) if broker_is_redis else None
        self.fatal: str | None = None  # why the service stopped by itself (exit code 2)
        self.reconciler = Reconciler(self.oned, self.intake, self.store, sub.reconcile_interval_s,
                                     sub.full_scan_interval_s, self.stop_event, broker, on_refused=self._refused,
                                     tuning=sub)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        celery = self._celery if self._celery is not None else make_celery(self.settings)
        return Dispatcher(self.store, celery, self.settings.worker.task_lease_s,
                          self.settings.subscriber.dispatch_interval_s, self.stop_event, self.wake,
                          retry_s=self.settings.subscriber.dispatch_retry_s)

    @cached_property
    def _client(self) -> OnedClient:
        o = self.settings.oned
        # The session is read here and handed to pyone only; it is never logged (ConfigError names the file).
        server = make_server(o.endpoint, self.settings.oned_session, o.connect_timeout_s, o.read_timeout_s,
                             o.https_verify)
        return OnedClient(server)

    def oned(self) -> OnedClient:
        return self._oned_factory() if self._oned_factory is not None else self._client

    def start(self, serve_metrics: bool = False) -> Service:
        if serve_metrics:
            self.metrics_port = metrics.serve(self.settings.subscriber.metrics_port,
                                              self.settings.subscriber.metrics_bind)
        loops: dict[str, Callable[[], None]] = {
            "zmq": self.listener.run, "stream": self.stream.run,
            "dispatcher": self._run_dispatcher, "reconciler": self.reconciler.run,
        }
        freeze_gc()
        name = heartbeat.component_name("subscriber")
        threading.Thread(target=heartbeat.run, args=(self.r, self.store.keys, name, self.stop_event),
                         name="oneha-heartbeat", daemon=True).start()
        for name in self.components:
            thread = threading.Thread(target=self._guard(name, loops[name]), name=f"oneha-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("subscriber started", extra=kv(components=list(self.components),
                                                metrics_port=self.metrics_port))
        return self

    def _run_dispatcher(self) -> None:
        dispatcher = self.dispatcher  # builds the Celery app (a big import) in this thread, once
        gc.freeze()
        dispatcher.run()

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        """A loop that dies of a bug is restarted, not left dead while the process looks alive."""
        def run() -> None:
            while not self.stop_event.is_set():
                try:
                    loop()
                except Exception:
                    log.exception("loop crashed; restarting", extra=kv(component=name))
                    self.stop_event.wait(1.0)
        return run

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        self.wake.set()
        for thread in self.threads:
            thread.join(timeout_s)
        self.r.close()
        log.info("subscriber stopped")

    def _refused(self, reason: str) -> None:
        """A permanent error found after start: stop, and exit 2 so that systemd does not restart us in a loop."""
        if self.fatal is None:
            self.fatal = reason
            log.error("stopping: permanent error, exit code 2",
                      extra=kv(reason=reason, fix=f"check the user:password in {self.settings.oned.auth_file}"))
        self.stop_event.set()

    def run_until_signalled(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0) or a permanent error (returns 2)."""
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received, stopping", extra=kv(signal=signal.Signals(signum).name))
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.start(serve_metrics=True)
        while not self.stop_event.wait(0.5):
            pass
        self.stop()
        return 2 if self.fatal else 0
