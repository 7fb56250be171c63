"""The detector's Prometheus metrics (default registry; served on detect.metrics_port)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("oneha.detect.metrics")

HOSTS = Gauge("oneha_detect_hosts", "Hosts this detector probes.")
UNRESOLVED = Gauge("oneha_detect_hosts_unresolved", "Hosts whose management address does not resolve (not probed).")
ROUND = Histogram("oneha_detect_probe_round_seconds", "One probe round of every host.",
                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
MISSING = Gauge("oneha_detect_hosts_missing", "Hosts in a miss streak as this detector sees them.")
SUSPECT = Gauge("oneha_detect_hosts_suspect", "Hosts a quorum of detectors suspects.")
ALIVE = Gauge("oneha_detect_instances_alive", "Detector instances with a live view in Redis.")
STORM = Gauge("oneha_detect_self_suspect", "1 while this detector misses too many hosts and withdrew its votes.")
DECISIONS = Counter("oneha_detect_decisions", "Decisions on suspect hosts, by outcome.", ["outcome"])
PROVEN_DEAD = Counter("oneha_detect_proven_dead", "Hosts proven dead, by proof.", ["proof"])
ERRORS = Counter("oneha_detect_errors", "Failed oned, Redis or file operations of the detector.", ["component"])


def serve(port: int | None, bind: str) -> int | None:
    """The metrics endpoint; port 0 picks a free one. A taken port costs the metrics, not the detection."""
    if port is None:
        return None
    try:
        server, _thread = start_http_server(port, addr=bind)
    except OSError as exc:
        log.error("metrics: cannot listen", extra={"kv": {"bind": bind, "port": port, "error": exc.strerror,
                                                          "fix": "choose another detect.metrics_port"}})
        return None
    return int(server.server_address[1])
