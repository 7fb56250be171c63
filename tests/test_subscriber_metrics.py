"""The subscriber's Prometheus endpoint, scraped over HTTP, and a publisher restart (oned restarted, or the Raft
leader moved) that the SUB socket survives: counted as a reconnect, and events after it still become incidents."""

from __future__ import annotations

import threading

import redis
import requests
import zmq

from oneha.incidents import IncidentStore
from oneha.redis_server import free_port
from oneha.subscriber.reconciler import Reconciler
from oneha.subscriber.service import Service
from oneha.waiting import wait_until
from tests.test_subscriber_kit import host_message, incidents, metric, settings, sync


def scrape(port: int) -> str:
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def sample(text: str, name: str) -> float:
    """The value of a sample line `name value` (name with its labels, exactly as exported)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def bind_pub(port: int) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    wait_until(lambda: _bound(sock, port), 10, what=f"PUB socket on port {port}")
    return sock


def _bound(sock: zmq.Socket[bytes], port: int) -> bool:
    try:
        sock.bind(f"tcp://127.0.0.1:{port}")
    except zmq.ZMQError:
        return False
    return True


def test_metrics_endpoint_and_reconnect_after_a_publisher_restart(redis_url: str) -> None:
    zmq_port, metrics_port = free_port(), free_port()
    base = settings(redis_url, [f"tcp://127.0.0.1:{zmq_port}"])
    cfg = base.model_copy(update={"subscriber": base.subscriber.model_copy(update={"metrics_port": metrics_port})})
    pub = bind_pub(zmq_port)
    svc = Service(cfg, components=("zmq",)).start(serve_metrics=True)
    try:
        sync(pub, svc)
        pub.send_multipart(list(host_message(1, "ERROR", 3)))
        wait_until(lambda: incidents(redis_url), 5, what="the first incident")
        text = scrape(metrics_port)
        assert sample(text, 'oneha_incidents_opened_total{kind="host"}') >= 1
        assert sample(text, 'oneha_events_received_total{kind="host_error",source="zmq"}') >= 1
        assert "oneha_enqueue_latency_seconds_count" in text
        reconnects = sample(text, "oneha_zmq_reconnects_total")

        pub.close(linger=0)  # the publisher goes away and comes back on the same endpoint
        pub = bind_pub(zmq_port)
        wait_until(lambda: sample(scrape(metrics_port), "oneha_zmq_reconnects_total") > reconnects, 15,
                   what="the reconnect to be counted")
        sync(pub, svc)
        pub.send_multipart(list(host_message(2, "ERROR", 3)))
        wait_until(lambda: {i.resource_id for i in incidents(redis_url)} >= {1, 2}, 5,
                   what="an incident from after the reconnect")
    finally:
        svc.stop()
        pub.close(linger=0)


def test_recovery_paused_gauge_follows_pause_and_resume(redis_url: str) -> None:
    """The gauge behind the OnehaRecoveryPaused alert: a forgotten pause must not go unnoticed."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store = IncidentStore(r)
    reconciler = Reconciler(lambda: None, None, store, 30.0, 300.0, threading.Event())  # type: ignore[arg-type]
    store.pause("maintenance")
    reconciler.gauges()
    assert metric("oneha_recovery_paused") == 1
    store.resume()
    reconciler.gauges()
    assert metric("oneha_recovery_paused") == 0
