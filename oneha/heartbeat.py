"""Liveness of oneha's processes, kept in Redis: `oneha incidents` and the lab read who is up and when seen last."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time

import redis

from oneha.keys import Keys

INTERVAL_S = 5.0


# Host name and pid alone do not tell processes apart: containers with host networking share the host's name, and
# each runs its service as the same pid of its own pid namespace (scaled compose workers). A random tag per process
# does (forked children differ by pid).
_TAG = secrets.token_hex(3)


def instance_name() -> str:
    """`host-pid-tag`, unique per process: names the heartbeat and the worker's default Celery node."""
    return f"{socket.gethostname()}-{os.getpid()}-{_TAG}"


def component_name(kind: str) -> str:
    return f"{kind}:{instance_name()}"


def beat(client: redis.Redis, keys: Keys, name: str) -> None:
    client.hset(keys.heartbeat, name, round(time.time(), 3))


def run(client: redis.Redis, keys: Keys, name: str, stop: threading.Event, interval_s: float = INTERVAL_S) -> None:
    """Beat until `stop` is set; Redis errors are ignored here (the process's own loops report them)."""
    while True:
        with contextlib.suppress(redis.RedisError):
            beat(client, keys, name)
        if stop.wait(interval_s):
            break
    with contextlib.suppress(redis.RedisError):
        client.hdel(keys.heartbeat, name)


def alive(client: redis.Redis, keys: Keys, max_age_s: float = 3 * INTERVAL_S) -> dict[str, float]:
    now = time.time()
    beats = {str(k if isinstance(k, str) else k.decode()): float(v) for k, v in client.hgetall(keys.heartbeat).items()}
    return {name: seen for name, seen in beats.items() if now - seen <= max_age_s}
