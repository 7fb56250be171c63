"""A Redis client from `[redis]` settings: a plain `redis://` URL, or Redis Sentinel.

Sentinel URLs are written as kombu (Celery's broker) writes them, so one URL serves the store and the broker:
`sentinel://127.0.0.1:26379;sentinel://10.0.0.2:26379/0` (the db, if any, on the last one) with
`redis.sentinel_master` naming the master. The client asks the Sentinels for the current master on every new
connection, so after a failover it follows the promoted replica (a call in flight fails and is retried by the
caller's usual Redis-error handling).

`client()` is the one way oneha's services get a Redis client: replies decoded to `str` (so no caller converts
bytes), socket timeouts and health checks from `[redis]`. Tests, the lab and benches may build their own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from redis.sentinel import Sentinel

from oneha.settings import ConfigError, RedisSettings

SENTINEL_SCHEME = "sentinel://"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], int]:
    """`sentinel://h1:26379;sentinel://h2:26379/0` -> ([(h1, 26379), (h2, 26379)], 0)."""
    hosts: list[tuple[str, int]] = []
    db = 0
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigError(f"redis.url: {part!r} is not sentinel://host:port")
        hosts.append((parts.hostname, parts.port or 26379))
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return hosts, db


def connect(settings: RedisSettings, **kwargs: Any) -> redis.Redis:
    """The store's client. `kwargs` go to every connection (timeouts, decode_responses, health checks)."""
    if not settings.url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(settings.url, **kwargs)
    if not settings.sentinel_master:
        raise ConfigError("redis.url lists Sentinels: set redis.sentinel_master to the master's name")
    hosts, db = parse_sentinel_url(settings.url)
    timeouts = {k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0}, **timeouts)
    return sentinel.master_for(settings.sentinel_master, db=db, **kwargs)


def client(settings: RedisSettings) -> redis.Redis:
    """A service's client: `str` replies, bounded waits (a dead Redis is an error the caller handles, not a hang)."""
    # encoding_errors="replace": a foreign non-UTF-8 value (someone else's XADD) reads as U+FFFD and is rejected as
    # bad input by whoever parses it, instead of failing the whole read it came in (a consumer stuck on it).
    return connect(settings, decode_responses=True, encoding_errors="replace", socket_timeout=settings.socket_timeout_s,
                   socket_connect_timeout=settings.connect_timeout_s,
                   health_check_interval=settings.health_check_interval_s)
