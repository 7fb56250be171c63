"""A Redis lease lock with renewal and a fencing token (REFERENCE §6: locks are for efficiency, tokens for safety).

`acquire` takes a new token (INCR `keys.fencing_token`) and sets the lock to it with SET NX PX. A background thread
renews the lease while the holder works; `check()` (called right before every mutating oned call) verifies, in
Redis, that the lock still holds *our* token and renews it at the same time; otherwise it raises `LeaseLost`, so a
worker that was paused or partitioned past its lease stops instead of acting next to the new holder.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis

from oneha.keys import Keys, Resource

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Our token no longer holds the lock: someone else may be acting; stop."""


# KEYS: lock. ARGV: token, ttl ms. Renew only if the lock is ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One holder's lease on a host or VM. Use as a context manager (renewal thread, release on exit)."""

    def __init__(self, client: redis.Redis, keys: Keys, resource: Resource, resource_id: int, ttl_s: float) -> None:
        self.r = client
        self.key = keys.lock(resource, resource_id)
        self.token_key = keys.fencing_token(resource, resource_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token: str | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        token = str(self.r.incr(self.token_key))
        if self.r.set(self.key, token, nx=True, px=self.ttl_ms):
            self.token = token
            return True
        return False

    def check(self) -> None:
        """Raise LeaseLost unless our token still holds the lock; renew it on the way."""
        if self.token is None or not self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            raise LeaseLost(f"{self.key}: lease lost (token {self.token})")

    def held(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True

    def start_renewal(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"renew {self.key}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                if not self.held():
                    log.warning("%s: lease lost, renewal stops", self.key)
                    return
            except redis.RedisError as exc:  # next round retries; check() before acting decides
                log.warning("%s: renewal failed: %s", self.key, type(exc).__name__)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        if self.token is not None:
            with contextlib.suppress(redis.RedisError):  # else the lease expires on its own
                self._release(keys=[self.key], args=[self.token])
        self.token = None

    def __enter__(self) -> Lease:
        self.start_renewal()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
