"""The subscriber's Prometheus metrics, in the default registry so one scrape shows every component.

Several service instances in one process (tests) share these counters; that is what a scrape of that process means.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("oneha.subscriber.metrics")

EVENTS_RECEIVED = Counter("oneha_events_received", "Events accepted for intake, by input and kind.",
                          ["source", "kind"])
EVENTS_REJECTED = Counter("oneha_events_rejected", "Malformed or hostile input, dropped.", ["reason"])
EVENTS_DROPPED = Counter("oneha_events_dropped", "Valid events lost (e.g. buffer full while Redis was down).",
                         ["reason"])
EVENTS_IGNORED = Counter("oneha_events_ignored", "Valid events deliberately not reported (policy, opt-out).",
                         ["reason"])
EVENT_DISAGREEMENTS = Counter("oneha_event_disagreements", (
    "Host events contradicted by oned when re-read (ignored): forged or stale events."), ["source", "event"])
INCIDENTS_OPENED = Counter("oneha_incidents_opened", "Incidents opened by this subscriber.", ["kind"])
INCIDENTS_CANCELLED = Counter("oneha_incidents_cancelled", "Incidents cancelled within their grace period.",
                              ["kind"])
DUPLICATES = Counter("oneha_duplicates_suppressed", "Reports that collapsed into an open or handled incident.",
                     ["source"])
# Event received (by any input) -> its incident durably in Redis (report() returned). Sub-millisecond to
# seconds: the buckets start low because this is the subscriber's own hot path.
ENQUEUE_LATENCY = Histogram("oneha_enqueue_latency_seconds", "Event received to incident stored in Redis.",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30))
RECONCILE_DURATION = Histogram("oneha_reconcile_duration_seconds", "One reconcile pass.", ["scan"],
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ZMQ_RECONNECTS = Counter("oneha_zmq_reconnects", "ZeroMQ connections re-established after a disconnect.")
LAST_EVENT = Gauge("oneha_subscriber_last_event_timestamp_seconds", "When the last event was received.")
INCIDENTS_OPEN = Gauge("oneha_incidents_open", "Open incidents by kind and status.", ["kind", "status"])
RECOVERY_PAUSED = Gauge("oneha_recovery_paused", "1 while an operator has paused recovery (`oneha incidents pause`).")
QUEUE_LENGTH = Gauge("oneha_queue_length", "Messages waiting in a Celery queue.", ["queue"])
TASKS_SENT = Counter("oneha_tasks_sent", "Celery tasks sent for due incidents.", ["task"])
ONED_ERRORS = Counter("oneha_subscriber_oned_errors", "Failed oned calls of the subscriber.", ["component"])
REDIS_ERRORS = Counter("oneha_subscriber_redis_errors", "Failed Redis operations of the subscriber.", ["component"])


def serve(port: int | None, bind: str = "127.0.0.1") -> int | None:
    """Start the metrics endpoint; port 0 picks a free port. Returns the port, or None when disabled."""
    if port is None:
        return None
    try:
        server, _thread = start_http_server(port, addr=bind)
    except OSError as exc:  # a taken port costs the metrics, not the recovery (the scrape's `up` shows it)
        log.error("metrics: cannot listen", extra={"kv": {"bind": bind, "port": port, "error": exc.strerror,
                                                          "fix": "choose another subscriber.metrics_port"}})
        return None
    actual = int(server.server_address[1])
    log.info("metrics listening", extra={"kv": {"bind": bind, "port": actual}})
    return actual
